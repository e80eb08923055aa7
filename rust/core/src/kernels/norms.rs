//! L1 norms that do not depend on how the work was split: f64 sums over fixed blocks of `BLOCK` elements at
//! absolute positions, each summed in eight interleaved lanes combined in a fixed order, then added in block order.

use multiversion::multiversion;

use super::isa::{self, Isa};
pub const BLOCK: usize = 4096;

/// (Σ|x|, Σ|x| over kept elements) of one block. Eight accumulators per sum (element j goes to lane j mod 8),
/// added up in lane order at the end: a fixed order, so the result is the same on every instruction set, and
/// independent chains, so the loop is not bound by the latency of one long chain of f64 additions.
///
/// The compiler leaves the masked sum scalar (a byte to a 64-bit mask, lane by lane), which made this a fifth of a
/// DARE merge's time, so AVX2 has its own loop ([`l1_lanes_avx2`]): the same additions into the same lanes in the
/// same order, so the same bits.
pub fn l1_pair(vals: &[f32], keep: &[bool]) -> (f64, f64) {
    const L: usize = 8;
    let n = vals.len().min(keep.len()) / L * L;
    let (mut all, mut kept) = ([0f64; L], [0f64; L]);
    #[cfg(target_arch = "x86_64")]
    let done = if isa::active() >= Isa::Avx2 {
        // SAFETY: `active()` is never wider than what this CPU has, so it has AVX2.
        unsafe { l1_lanes_avx2(&vals[..n], &keep[..n], &mut all, &mut kept) };
        n
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    l1_lanes(&vals[done..n], &keep[done..n], &mut all, &mut kept);
    for (l, (&v, &k)) in vals[n..].iter().zip(&keep[n..]).enumerate() {
        let a = f64::from(v.abs());
        all[l] += a;
        kept[l] += if k { a } else { 0.0 };
    }
    (all.iter().sum(), kept.iter().sum())
}

/// [`l1_pair`]'s lanes over whole groups of eight (`vals.len()` a multiple of 8), portable.
#[multiversion(targets = "simd")]
fn l1_lanes(vals: &[f32], keep: &[bool], all: &mut [f64; 8], kept: &mut [f64; 8]) {
    for (v, k) in vals.chunks_exact(8).zip(keep.chunks_exact(8)) {
        for l in 0..8 {
            let a = f64::from(v[l].abs());
            all[l] += a;
            // An exact select written as a bit mask (all ones or zero).
            kept[l] += f64::from_bits(a.to_bits() & u64::from(k[l]).wrapping_neg());
        }
    }
}

/// [`l1_lanes`] with AVX2: lanes 0–3 and 4–7 in two registers per sum; a kept flag (a 0/1 byte) widened to a
/// 64-bit lane and negated is the all-ones mask that selects |x| or +0.0, as in the portable loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn l1_lanes_avx2(vals: &[f32], keep: &[bool], all: &mut [f64; 8], kept: &mut [f64; 8]) {
    use std::arch::x86_64::{
        _mm256_add_pd, _mm256_and_pd, _mm256_and_ps, _mm256_castps256_ps128, _mm256_castsi256_pd, _mm256_castsi256_ps,
        _mm256_cvtepu8_epi64, _mm256_cvtps_pd, _mm256_extractf128_ps, _mm256_loadu_pd, _mm256_loadu_ps,
        _mm256_set1_epi32, _mm256_setzero_si256, _mm256_storeu_pd, _mm256_sub_epi64, _mm_cvtsi64_si128, _mm_srli_si128,
    };
    assert!(vals.len() == keep.len() && vals.len() % 8 == 0, "whole groups of eight");
    // SAFETY: every load and store is in bounds: `i + 8 <= len` for `vals` and `keep` (equal lengths, a multiple
    // of 8), and lanes 0..8 of `all` and `kept`.
    unsafe {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let zero = _mm256_setzero_si256();
        let (mut a0, mut a1) = (_mm256_loadu_pd(all.as_ptr()), _mm256_loadu_pd(all.as_ptr().add(4)));
        let (mut k0, mut k1) = (_mm256_loadu_pd(kept.as_ptr()), _mm256_loadu_pd(kept.as_ptr().add(4)));
        let mut i = 0;
        while i < vals.len() {
            let v = _mm256_and_ps(_mm256_loadu_ps(vals.as_ptr().add(i)), abs);
            let (lo, hi) = (_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
            a0 = _mm256_add_pd(a0, lo);
            a1 = _mm256_add_pd(a1, hi);
            // bool is one byte, 0 or 1: eight flags are one 64-bit load.
            let b = _mm_cvtsi64_si128(keep.as_ptr().add(i).cast::<i64>().read_unaligned());
            let m0 = _mm256_castsi256_pd(_mm256_sub_epi64(zero, _mm256_cvtepu8_epi64(b)));
            let m1 = _mm256_castsi256_pd(_mm256_sub_epi64(zero, _mm256_cvtepu8_epi64(_mm_srli_si128(b, 4))));
            k0 = _mm256_add_pd(k0, _mm256_and_pd(lo, m0));
            k1 = _mm256_add_pd(k1, _mm256_and_pd(hi, m1));
            i += 8;
        }
        _mm256_storeu_pd(all.as_mut_ptr(), a0);
        _mm256_storeu_pd(all.as_mut_ptr().add(4), a1);
        _mm256_storeu_pd(kept.as_mut_ptr(), k0);
        _mm256_storeu_pd(kept.as_mut_ptr().add(4), k1);
    }
}

/// Σ a·b in f64, in the same eight fixed lanes as `l1_pair` (so the same on every instruction set).
#[multiversion(targets = "simd")]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let mut a8 = a.chunks_exact(L);
    let mut b8 = b.chunks_exact(L);
    for (x, y) in (&mut a8).zip(&mut b8) {
        for l in 0..L {
            acc[l] += f64::from(x[l]) * f64::from(y[l]);
        }
    }
    for (l, (&x, &y)) in a8.remainder().iter().zip(b8.remainder()).enumerate() {
        acc[l] += f64::from(x) * f64::from(y);
    }
    acc.iter().sum()
}

/// For every pair i ≤ j of `vs` (all of one length), `out[k] += dot(vs[i], vs[j])`, k the pair's place in the
/// upper triangle row by row (`merge::gram`): the same bits as [`dot`] pair by pair (the same products added into
/// the same eight lanes in the same order), but in one sweep over the elements, so each vector is loaded once
/// instead of once per pair (a Gram pass of three task vectors called `dot` six times over the chunk).
pub fn gram_upper(vs: &[&[f32]], out: &mut [f64]) {
    match vs.len() {
        2 => gram2(vs, out),
        3 => gram3(vs, out),
        4 => gram4(vs, out),
        q => {
            let mut k = 0;
            for i in 0..q {
                for j in i..q {
                    out[k] += dot(vs[i], vs[j]);
                    k += 1;
                }
            }
        }
    }
}

#[multiversion(targets = "simd")]
fn gram2(vs: &[&[f32]], out: &mut [f64]) {
    gram_fixed::<2, 3>(vs, out);
}

#[multiversion(targets = "simd")]
fn gram3(vs: &[&[f32]], out: &mut [f64]) {
    gram_fixed::<3, 6>(vs, out);
}

#[multiversion(targets = "simd")]
fn gram4(vs: &[&[f32]], out: &mut [f64]) {
    gram_fixed::<4, 10>(vs, out);
}

/// One step of [`gram_fixed`]: the products of lanes `..width` of every pair added into its accumulators.
#[inline(always)]
fn gram_lanes<const Q: usize, const P: usize>(acc: &mut [[f64; 8]; P], x: &[[f64; 8]; Q], width: usize) {
    let mut k = 0;
    for i in 0..Q {
        for j in i..Q {
            for l in 0..width {
                acc[k][l] += x[i][l] * x[j][l];
            }
            k += 1;
        }
    }
}

/// [`gram_upper`] for `Q` vectors and their `P` = Q(Q+1)/2 pairs; inlined into each instruction set's copy.
#[inline(always)]
fn gram_fixed<const Q: usize, const P: usize>(vs: &[&[f32]], out: &mut [f64]) {
    const L: usize = 8;
    let n = vs[0].len();
    let vs: [&[f32]; Q] = std::array::from_fn(|i| &vs[i][..n]);
    let mut acc = [[0f64; L]; P];
    let whole = n / L * L;
    for e in (0..whole).step_by(L) {
        let x: [[f64; L]; Q] = std::array::from_fn(|i| {
            let c: &[f32; L] = vs[i][e..e + L].try_into().expect("eight lanes");
            c.map(f64::from)
        });
        gram_lanes::<Q, P>(&mut acc, &x, L);
    }
    let x: [[f64; L]; Q] =
        std::array::from_fn(|i| std::array::from_fn(|l| vs[i].get(whole + l).map_or(0.0, |&v| f64::from(v))));
    gram_lanes::<Q, P>(&mut acc, &x, n - whole);
    for (o, a) in out.iter_mut().zip(&acc) {
        *o += a.iter().sum::<f64>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Gram sweep gives the bits of `dot` pair by pair, for every number of vectors, with and without a tail.
    #[test]
    fn gram_upper_is_dot_pair_by_pair() {
        let mut next = crate::rng::xorshift(0x2545_f491_4f6c_dd1d);
        for q in 1..=5 {
            for len in [0usize, 1, 7, 8, 9, 64, 4103] {
                let vs: Vec<Vec<f32>> = (0..q)
                    .map(|_| {
                        (0..len)
                            .map(|j| match j % 89 {
                                0 => -0.0,
                                1 => f32::from_bits(1),
                                _ => f32::from_bits((next() as u32) & 0xbf7f_ffff),
                            })
                            .collect()
                    })
                    .collect();
                let views: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
                let start: Vec<f64> = (0..q * (q + 1) / 2).map(|k| k as f64 * 0.25).collect();
                let mut got = start.clone();
                gram_upper(&views, &mut got);
                let mut want = start;
                let mut k = 0;
                for i in 0..q {
                    for j in i..q {
                        want[k] += dot(&vs[i], &vs[j]);
                        k += 1;
                    }
                }
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "q {q}, len {len}");
            }
        }
    }

    /// Every path gives the same bits as the portable lanes, on lengths with and without a tail, with signed
    /// zeros, subnormals, infinities and NaN among the values.
    #[test]
    fn l1_pair_is_the_same_on_every_path() {
        let mut next = crate::rng::xorshift(0x9e37_79b9_7f4a_7c15);
        for len in [0usize, 1, 7, 8, 9, 63, 64, 4096, 4103] {
            let vals: Vec<f32> = (0..len)
                .map(|j| match j % 97 {
                    0 => -0.0,
                    1 => f32::from_bits(1),
                    2 => f32::INFINITY,
                    3 if len > 4000 => f32::NAN,
                    _ => f32::from_bits((next() as u32) & 0xbf7f_ffff),
                })
                .collect();
            let keep: Vec<bool> = (0..len).map(|_| next() % 3 != 0).collect();
            let mut want = ([0f64; 8], [0f64; 8]);
            let whole = len / 8 * 8;
            for j in 0..whole {
                let a = f64::from(vals[j].abs());
                want.0[j % 8] += a;
                want.1[j % 8] += if keep[j] { a } else { 0.0 };
            }
            for j in whole..len {
                let a = f64::from(vals[j].abs());
                want.0[j - whole] += a;
                want.1[j - whole] += if keep[j] { a } else { 0.0 };
            }
            let want: (f64, f64) = (want.0.iter().sum(), want.1.iter().sum());
            for path in Isa::ALL {
                isa::set_override(Some(path));
                let got = l1_pair(&vals, &keep);
                assert_eq!(
                    (got.0.to_bits(), got.1.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "len {len} on {path:?}"
                );
            }
            isa::set_override(None);
        }
    }
}
