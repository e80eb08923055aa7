//! Storage dtypes and their codecs. All math is f32; these convert chunks of stored bytes to f32 and back.
//!
//! `half` has no SIMD path for bf16, so bf16 uses our own branch-free codec (a shift to decode; round to nearest
//! even to encode), written as plain loops over fixed-size elements that the compiler vectorises. f16 uses
//! `half`'s slice conversions, which use F16C when the CPU has it.

use half::f16;
use half::slice::HalfFloatSliceExt;
use multiversion::multiversion;

use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors header name.
    pub fn st_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// mergekit's / torch's name, used in configs and on the Python side.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parse either naming (`bfloat16` / `BF16`, ...).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float32" | "F32" => Ok(DType::F32),
            "float16" | "F16" => Ok(DType::F16),
            "bfloat16" | "BF16" => Ok(DType::BF16),
            other => {
                Err(CoreError::param(format!("unsupported dtype '{other}' (supported: float32, float16, bfloat16)")))
            }
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// The safetensors name of a dtype the engine copies but never merges (integers, booleans, f64, 8-bit floats),
/// given either naming: torch's (`int64`) or safetensors' (`I64`).
pub fn stored_name(s: &str) -> Option<&'static str> {
    const NAMES: [(&str, &str); 13] = [
        ("int64", "I64"),
        ("int32", "I32"),
        ("int16", "I16"),
        ("int8", "I8"),
        ("uint8", "U8"),
        ("uint16", "U16"),
        ("uint32", "U32"),
        ("uint64", "U64"),
        ("bool", "BOOL"),
        ("float64", "F64"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("complex64", "C64"),
    ];
    NAMES.iter().find(|(torch, st)| s == *torch || s == *st).map(|(_, st)| *st)
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Round to nearest, ties to even; NaN stays a (quiet) NaN with its sign.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = ((bits >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Decode `out.len()` elements of `dtype` from little-endian `bytes` (which may be unaligned: stored tensors
/// only promise the alignment their writer chose).
#[multiversion(targets = "simd")]
pub fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F16 => {
            const STRIPE: usize = 256;
            let mut tmp = [f16::ZERO; STRIPE];
            for (o, c) in out.chunks_mut(STRIPE).zip(bytes.chunks(STRIPE * 2)) {
                let t = &mut tmp[..o.len()];
                for (h, b) in t.iter_mut().zip(c.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                t.convert_to_f32_slice(o);
            }
        }
    }
}

/// [`decode`], also telling whether any stored value is a NaN or an infinity (exponent bits all ones). The test
/// is an OR folded into the same loop over the same loaded bits, so it vectorises with the conversion and costs
/// nothing measurable; the decoded values are the same as [`decode`]'s.
#[multiversion(targets = "simd")]
pub fn decode_checked(dtype: DType, bytes: &[u8], out: &mut [f32]) -> bool {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 => {
            let mut bad = 0u32;
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                bad |= u32::from(b & 0x7f80_0000 == 0x7f80_0000);
                *o = f32::from_bits(b);
            }
            bad != 0
        }
        DType::BF16 => {
            let mut bad = 0u16;
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let b = u16::from_le_bytes([c[0], c[1]]);
                bad |= u16::from(b & 0x7f80 == 0x7f80);
                *o = bf16_to_f32(b);
            }
            bad != 0
        }
        DType::F16 => {
            let mut bad = 0u16;
            for c in bytes.chunks_exact(2) {
                bad |= u16::from(u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00);
            }
            decode(DType::F16, bytes, out);
            bad != 0
        }
    }
}

/// How many NaN and how many infinite values the little-endian stored `bytes` of `dt` hold (whole elements): an
/// all-ones exponent, with a non-zero mantissa for a NaN. Counted on the stored bits, no decode; bytes without
/// any are recognised first by a vectorised scan ([`any_nonfinite`]), the exact count runs only where there are.
pub fn count_nonfinite(dt: DType, bytes: &[u8]) -> (u64, u64) {
    if !any_nonfinite(dt, bytes) {
        return (0, 0);
    }
    fn count<const N: usize>(bytes: &[u8], exp: u32, man: u32) -> (u64, u64) {
        let (mut nan, mut inf) = (0u64, 0u64);
        for c in bytes.chunks_exact(N) {
            let mut w = [0u8; 4];
            w[..N].copy_from_slice(c);
            let v = u32::from_le_bytes(w);
            let special = v & exp == exp;
            nan += u64::from(special && v & man != 0);
            inf += u64::from(special && v & man == 0);
        }
        (nan, inf)
    }
    match dt {
        DType::BF16 => count::<2>(bytes, 0x7f80, 0x007f),
        DType::F16 => count::<2>(bytes, 0x7c00, 0x03ff),
        DType::F32 => count::<4>(bytes, 0x7f80_0000, 0x007f_ffff),
    }
}

/// Whether the stored `bytes` of `dt` hold a NaN or an infinity (an all-ones exponent): an OR over the elements
/// without an early exit, which the compiler vectorises (the per-element count does not; it took a third of a
/// passthrough's time).
#[multiversion(targets = "simd")]
fn any_nonfinite(dt: DType, bytes: &[u8]) -> bool {
    match dt {
        DType::BF16 | DType::F16 => {
            let exp = if dt == DType::BF16 { 0x7f80 } else { 0x7c00 };
            let mut bad = 0u16;
            for c in bytes.chunks_exact(2) {
                bad |= u16::from(u16::from_le_bytes([c[0], c[1]]) & exp == exp);
            }
            bad != 0
        }
        DType::F32 => {
            let mut bad = 0u32;
            for c in bytes.chunks_exact(4) {
                bad |= u32::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000);
            }
            bad != 0
        }
    }
}

/// [`decode_checked`] minus `base`: `out[j] = decode(bytes[j]) - base[j]`, the same IEEE subtraction as decoding
/// and then subtracting in a second loop (so the same bytes), in one pass that writes `out` once instead of
/// writing, reading and writing it again (task vectors are decoded this way in every pass of the TIES family).
#[multiversion(targets = "simd")]
pub fn decode_sub_checked(dtype: DType, bytes: &[u8], base: &[f32], out: &mut [f32]) -> bool {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    let base = &base[..out.len()];
    match dtype {
        DType::F32 => {
            let mut bad = 0u32;
            for ((o, c), &b) in out.iter_mut().zip(bytes.chunks_exact(4)).zip(base) {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                bad |= u32::from(x & 0x7f80_0000 == 0x7f80_0000);
                *o = f32::from_bits(x) - b;
            }
            bad != 0
        }
        DType::BF16 => {
            let mut bad = 0u16;
            for ((o, c), &b) in out.iter_mut().zip(bytes.chunks_exact(2)).zip(base) {
                let x = u16::from_le_bytes([c[0], c[1]]);
                bad |= u16::from(x & 0x7f80 == 0x7f80);
                *o = bf16_to_f32(x) - b;
            }
            bad != 0
        }
        DType::F16 => {
            let bad = decode_checked(DType::F16, bytes, out);
            out.iter_mut().zip(base).for_each(|(o, &b)| *o -= b);
            bad
        }
    }
}

/// Encode f32 values into `dtype` little-endian bytes.
#[multiversion(targets = "simd")]
pub fn encode(dtype: DType, vals: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), vals.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (c, v) in out.chunks_exact_mut(4).zip(vals) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(vals) {
                c.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        DType::F16 => {
            const STRIPE: usize = 256;
            let mut tmp = [f16::ZERO; STRIPE];
            for (c, v) in out.chunks_mut(STRIPE * 2).zip(vals.chunks(STRIPE)) {
                let t = &mut tmp[..v.len()];
                t.convert_from_f32_slice(v);
                for (b, h) in c.chunks_exact_mut(2).zip(t.iter()) {
                    b.copy_from_slice(&h.to_bits().to_le_bytes());
                }
            }
        }
    }
}

/// Round f32 values in place to what `dtype` can hold (mergekit's `dtype:` casts inputs before merging).
#[multiversion(targets = "simd")]
pub fn round_to(dtype: DType, vals: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => vals.iter_mut().for_each(|v| *v = bf16_to_f32(f32_to_bf16(*v))),
        DType::F16 => vals.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nan_and_infinities_of_each_float_dtype() {
        let bf16: Vec<u8> =
            [0x7f80u16, 0xff80, 0x7fc0, 0xffc1, 0x3f80, 0x8000, 0x0001].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_nonfinite(DType::BF16, &bf16), (2, 2));
        let f16: Vec<u8> = [0x7c00u16, 0xfc00, 0x7e00, 0x3c00, 0x7bff].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_nonfinite(DType::F16, &f16), (1, 2));
        let f32s: Vec<u8> = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MAX, 1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_nonfinite(DType::F32, &f32s), (1, 2));
    }

    /// The vectorised scan before the count: one special value anywhere in a long run of finite ones (the
    /// largest finite values included) is found and counted, and none gives (0, 0).
    #[test]
    fn one_nonfinite_value_anywhere_is_counted() {
        for (dt, finite, nan, inf) in [
            (DType::BF16, 0x7f7fu32, 0x7f81u32, 0xff80u32),
            (DType::F16, 0x7bff, 0x7c01, 0xfc00),
            (DType::F32, 0x7f7f_ffff, 0x7f80_0001, 0xff80_0000),
        ] {
            let n = 1037;
            let put = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes()[..dt.size()]);
            let mut all = Vec::new();
            (0..n).for_each(|_| put(&mut all, finite));
            assert_eq!(count_nonfinite(dt, &all), (0, 0), "{dt:?}");
            for at in [0, 1, 31, 32, 500, n - 1] {
                for (special, want) in [(nan, (1, 0)), (inf, (0, 1))] {
                    let mut v = all.clone();
                    v[at * dt.size()..(at + 1) * dt.size()].copy_from_slice(&special.to_le_bytes()[..dt.size()]);
                    assert_eq!(count_nonfinite(dt, &v), want, "{dt:?} at {at}");
                }
            }
        }
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        for b in [0u16, 0x3f80, 0xbf80, 0x7f7f, 0x0001, 0x8000, 0x7f80, 0xff80] {
            assert_eq!(f32_to_bf16(bf16_to_f32(b)), b);
        }
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down to 1.0).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 1 + 3·2^-8 is halfway too, the even neighbour is above.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // The largest finite f32 rounds up to infinity, as in torch.
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        for x in [1.5f32, -3.25, 1e-30, 6.5e4, -0.0] {
            assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn decode_checked_flags_exactly_the_nonfinite_values() {
        let finite = [0.0f32, -0.0, 1.0, -2.5, 3.0e38, f32::MIN_POSITIVE, 1e-40, 6.0e4];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for bad in [None, Some(f32::NAN), Some(f32::INFINITY), Some(f32::NEG_INFINITY)] {
                for at in [0usize, 3, 299] {
                    let mut vals: Vec<f32> = (0..300).map(|i| finite[i % finite.len()]).collect();
                    if dt == DType::F16 {
                        // 3e38 is infinite in f16: keep the finite cases finite after encoding.
                        for v in &mut vals {
                            *v = v.clamp(-6.0e4, 6.0e4);
                        }
                    }
                    if let Some(b) = bad {
                        vals[at] = b;
                    }
                    let mut bytes = vec![0u8; vals.len() * dt.size()];
                    encode(dt, &vals, &mut bytes);
                    let (mut a, mut b) = (vec![0f32; vals.len()], vec![0f32; vals.len()]);
                    decode(dt, &bytes, &mut a);
                    let flagged = decode_checked(dt, &bytes, &mut b);
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    assert_eq!(flagged, bad.is_some(), "{dt:?} {bad:?} at {at}");
                }
            }
        }
    }

    #[test]
    fn codecs_round_trip_every_dtype() {
        // Values with at most 8 significant bits: exact in bf16, f16 and f32.
        let vals: Vec<f32> = (0..257).map(|i| (i as f32 - 128.0) * 0.125).collect();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8; vals.len() * dt.size()];
            encode(dt, &vals, &mut bytes);
            let mut back = vec![0f32; vals.len()];
            decode(dt, &bytes, &mut back);
            assert_eq!(back, vals, "{dt:?}");
        }
    }
}
