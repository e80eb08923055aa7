//! The transcendental functions the kernels use, from the `libm` crate (a pure-Rust port of musl's libm).
//!
//! Why not `f64::exp` and friends: std calls the platform's C library, whose results are not the same bits
//! everywhere: glibc picks an FMA variant of `exp`, `log`, `sin`, `cos`, `acos`, `pow` at run time on CPUs that
//! have FMA, and its implementations change between versions (and macOS's and Windows' differ again). A slerp
//! coefficient or an arcee_fusion KL one ulp apart moves output bytes, and output must not depend on the CPU. The
//! `libm` crate is plain Rust arithmetic (no FMA contraction), pinned by Cargo.lock, so every machine computes the
//! same bits. `sqrt` stays std's: IEEE 754 makes it exact everywhere. tests/api/test_lint.py keeps std's
//! transcendental methods out of the core.

#[inline]
pub fn exp(x: f64) -> f64 {
    libm::exp(x)
}

#[inline]
pub fn ln(x: f64) -> f64 {
    libm::log(x)
}

#[inline]
pub fn lnf(x: f32) -> f32 {
    libm::logf(x)
}

#[inline]
pub fn sin(x: f64) -> f64 {
    libm::sin(x)
}

#[inline]
pub fn cos(x: f64) -> f64 {
    libm::cos(x)
}

#[inline]
pub fn acos(x: f64) -> f64 {
    libm::acos(x)
}

#[inline]
pub fn powf(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_std_within_an_ulp() {
        let ulps = |a: f64, b: f64| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
        for i in 1..2000 {
            let x = f64::from(i) * 0.0137 - 7.0;
            assert!(ulps(exp(x), x.exp()) <= 1, "exp({x})");
            assert!(ulps(sin(x), x.sin()) <= 1, "sin({x})");
            assert!(ulps(cos(x), x.cos()) <= 1, "cos({x})");
            let y = x.abs() + 1e-3;
            assert!(ulps(ln(y), y.ln()) <= 1, "ln({y})");
            assert!(ulps(powf(y, -0.25), y.powf(-0.25)) <= 1, "pow({y})");
            let c = (x / 7.0).clamp(-1.0, 1.0);
            assert!(ulps(acos(c), c.acos()) <= 1, "acos({c})");
            let f = y as f32;
            assert!((lnf(f).to_bits() as i64 - f.ln().to_bits() as i64).unsigned_abs() <= 1, "lnf({f})");
        }
    }
}
