//! The transcendental functions the kernels use, from the `libm` crate (a pure-Rust port of musl's libm).
//!
//! Why not `f64::exp` and friends: std calls the platform's C library, whose results are not the same bits
//! everywhere: glibc picks an FMA variant of `exp`, `log`, `sin`, `cos`, `acos`, `pow` at run time on CPUs that
//! have FMA, and its implementations change between versions (and macOS's and Windows' differ again). A slerp
//! coefficient or an arcee_fusion KL one ulp apart moves output bytes, and output must not depend on the CPU. The
//! `libm` crate is plain Rust arithmetic (no FMA contraction), pinned by Cargo.lock, so every machine computes the
//! same bits. `sqrt` stays std's: IEEE 754 makes it exact everywhere. tests/api/test_lint.py keeps std's
//! transcendental methods out of the core.
//!
//! [`expf_vec`] and [`lnf_vec`] are this module's own, for loops that take one or more per element: libm's are
//! scalar calls with branches, which no compiler vectorises; these are branch-free f32 arithmetic that does, to
//! within 2 ulp of libm's (tested over every exponent).

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

/// ln 2 in two f32 parts for [`expf_vec`]'s range reduction and [`lnf_vec`]'s e·ln2: the high part, 355/512, has
/// nine significant bits, so its product with any exponent |k| < 2⁸ is exact.
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;

/// expf(x) in branch-free IEEE f32 arithmetic (adds, multiplies, integer bit moves; no FMA, no library call), so
/// that a loop over it vectorises (16 lanes on AVX-512) and gives the same bits on every CPU and code path. For the
/// hot loops where a scalar `exp` per element was the cost (arcee_fusion's softmax: two per element). Within 2 ulp
/// of libm's `expf` on [−87, 88]; 0 below −87.33 (where the result would be subnormal); +inf above 88.72; NaN for
/// NaN.
///
/// How: x = k·ln2 + r with k = round(x/ln2) (adding 1.5·2²³ rounds to nearest and leaves k in the low bits), ln2
/// split in two ([`LN2_HI`]) so r is exact to ~1e−11; e^r by a degree-7
/// polynomial (Taylor coefficients; truncation under 5e−9 relative on |r| ≤ 0.347); 2^k put in the exponent.
#[inline(always)]
pub fn expf_vec(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5·2^23
    const LO: f32 = -87.33;
    const HI: f32 = 88.72;
    // clamped so 2^k stays a normal number; the out-of-range results are chosen below
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let kf = t - SHIFT;
    let k = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    // 1 + r + r²/2! + ... + r⁷/7!, Horner
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // 2^k in two factors: k reaches 128 at the top of the range, one past the largest exponent
    let k1 = k >> 1;
    let y = p * f32::from_bits(((k1 + 127) as u32) << 23) * f32::from_bits(((k - k1 + 127) as u32) << 23);
    if x.is_nan() {
        x
    } else if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// lnf(x) in branch-free IEEE f32 arithmetic like [`expf_vec`] (same bits everywhere, vectorises). Within 2 ulp of
/// libm's `logf` for every positive normal and subnormal x; 0 → −inf, +inf → +inf, negative or NaN → NaN.
///
/// How: x = m·2^e with m in [√½, √2) (subnormals scaled by 2²⁴ first), ln m = 2·atanh(s) with
/// s = (m − 1)/(m + 1), |s| ≤ 0.172, by its series to s⁹ (truncation under 3e−9 relative), e·ln2 with ln2 split
/// in two so that the large exponents lose nothing.
#[inline(always)]
pub fn lnf_vec(x: f32) -> f32 {
    let sub = x < f32::MIN_POSITIVE;
    let xs = if sub { x * 16_777_216.0 } else { x }; // 2^24
    let bits = xs.to_bits();
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (((bits >> 23) & 0xff) as i32 - 127 + i32::from(big) - if sub { 24 } else { 0 }) as f32;
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    // 2·atanh(s) = 2s + s·z·(2/3 + 2z/5 + 2z²/7 + 2z³/9): the correction is under 2% of 2s (which is exact from
    // s), so its rounding hardly shows and the result is within about an ulp
    let mut q = 2.0 / 9.0;
    for c in [2.0 / 7.0, 2.0 / 5.0, 2.0 / 3.0] {
        q = q * z + c;
    }
    let y = e * LN2_HI + (e * LN2_LO + (2.0 * s + s * z * q));
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::INFINITY
    } else {
        y
    }
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
            assert!((i64::from(lnf(f).to_bits()) - i64::from(f.ln().to_bits())).unsigned_abs() <= 1, "lnf({f})");
        }
    }

    fn ulpsf(a: f32, b: f32) -> u64 {
        (i64::from(a.to_bits()) - i64::from(b.to_bits())).unsigned_abs()
    }

    #[test]
    fn expf_vec_within_two_ulp_of_libm() {
        // every 29th f32 of [-87.33, 88.72]: dense in the softmax range and across every exponent of x
        let mut n = 0;
        for bits in (0u32..0x8000_0000).step_by(29) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if !(-87.33..=88.72).contains(&x) {
                    continue;
                }
                let (v, r) = (expf_vec(x), libm::expf(x));
                assert!(ulpsf(v, r) <= 2, "expf_vec({x:e}) = {v:e} against {r:e}");
                n += 1;
            }
        }
        assert!(n > 10_000_000);
        assert_eq!(expf_vec(0.0), 1.0);
        assert_eq!(expf_vec(-0.0), 1.0);
        assert_eq!(expf_vec(-87.5), 0.0);
        assert_eq!(expf_vec(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf_vec(88.75), f32::INFINITY);
        assert!(expf_vec(f32::NAN).is_nan());
    }

    #[test]
    fn lnf_vec_within_two_ulp_of_libm_over_every_exponent() {
        // every 7th f32 bit pattern from the smallest subnormal to the largest finite
        for b in (1u32..0x7f80_0000).step_by(7) {
            let x = f32::from_bits(b);
            let (v, r) = (lnf_vec(x), lnf(x));
            assert!(ulpsf(v, r) <= 2, "lnf_vec({x:e}) = {v:e} against {r:e}");
        }
        assert_eq!(lnf_vec(1.0), 0.0);
        assert_eq!(lnf_vec(0.0), f32::NEG_INFINITY);
        assert_eq!(lnf_vec(-0.0), f32::NEG_INFINITY);
        assert_eq!(lnf_vec(f32::INFINITY), f32::INFINITY);
        assert!(lnf_vec(-1.0).is_nan() && lnf_vec(f32::NAN).is_nan());
    }
}
