//! The vector instruction set of the hand-dispatched hot kernels (the TIES family's trim, mask and election),
//! detected once at run time, and a way to force a narrower one (`FERROMERGE_ISA=baseline|avx2|avx512`, or
//! [`set_override`] in tests) so every path can be compared against the others.
//!
//! Every path is the same safe Rust source compiled with different `#[target_feature]`s (the compiler vectorises
//! it for the widest vectors the path allows), except the trim's bracket scan, which has hand-written AVX2
//! intrinsics (`select::bracket_collect_avx2`, tested against the portable scan on every path; the AVX-512 path
//! runs that AVX2 scan). The bytes cannot depend on the path: each element goes through the
//! same IEEE operations in the same order (Rust never contracts a·b+c into an FMA on its own), and counts and
//! collected indices are exact integers.

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction sets a kernel is compiled for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64; whatever the target guarantees elsewhere).
    Baseline,
    /// x86-64 AVX2 + FMA (FMA only as a feature flag: no code here fuses a multiply-add).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Isa> {
        Isa::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }

    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "baseline" | "scalar" => Some(Isa::Baseline),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// The widest instruction set this CPU has (among those a kernel is compiled for), found once.
pub fn detected() -> Isa {
    static DETECTED: AtomicU8 = AtomicU8::new(0);
    if let Some(isa) = Isa::from_code(DETECTED.load(Ordering::Relaxed)) {
        return isa;
    }
    let isa = detect();
    DETECTED.store(isa.code(), Ordering::Relaxed);
    isa
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// 0: not decided yet; otherwise `Isa::code` of the path in use.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The path the kernels take: the detected one, narrowed by `FERROMERGE_ISA` or [`set_override`]. Never wider
/// than [`detected`]: that is what makes calling a `#[target_feature]` path sound.
#[inline]
pub fn active() -> Isa {
    if let Some(isa) = Isa::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return isa;
    }
    let det = detected();
    let isa = std::env::var("FERROMERGE_ISA").ok().and_then(|s| Isa::parse(&s)).map_or(det, |f| f.min(det));
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    isa
}

/// Force a path (narrowed to what the CPU has; `None`: back to the detected one). Returns the path now in use.
/// For tests and benchmarks: the bytes are the same on every path, only the speed changes.
pub fn set_override(isa: Option<Isa>) -> Isa {
    let det = detected();
    let isa = isa.map_or(det, |f| f.min(det));
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    isa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_order() {
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("scalar"), Some(Isa::Baseline));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Baseline < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        for isa in Isa::ALL {
            assert_eq!(Isa::from_code(isa.code()), Some(isa));
        }
        assert_eq!(Isa::from_code(0), None);
    }
}
