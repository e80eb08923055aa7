//! Counter-based randomness for DARE: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
//! SC'11). A draw is a pure function of (seed, tensor name, model, element index), so a mask is the same at any
//! thread count or chunk size, and one tensor's mask does not depend on which tensors were merged before it
//! (mergekit draws from one global torch stream, so its masks change with the schedule).
//! Written here (40 lines) rather than taken from a crate: we need exactly this keying, and it is checked
//! against the Random123 known-answer vectors below.

use multiversion::multiversion;

use crate::kernels::isa::{self, Isa};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds.
#[inline(always)]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, ctr[0]);
        let (hi1, lo1) = mulhilo(M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The random stream of one (seed, tensor, model): uniform draws indexed by element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    key: [u32; 2],
    model: u32,
}

impl Stream {
    pub fn new(seed: u64, tensor_name: &str, model: u32) -> Self {
        let k = splitmix64(seed ^ splitmix64(fnv1a64(tensor_name.as_bytes())));
        Stream { key: [k as u32, (k >> 32) as u32], model }
    }

    /// The four 32-bit words of block `b`; element `j` uses word `j % 4` of block `j / 4`.
    #[inline(always)]
    pub fn block(&self, b: u64) -> [u32; 4] {
        philox4x32_10([b as u32, (b >> 32) as u32, self.model, 0], self.key)
    }

    /// Fill `keep[i]` with whether element `start + i` is kept with probability `density`:
    /// u = (word >> 8) / 2^24 is uniform on [0, 1), and the element is kept iff u < density.
    pub fn keep_mask(&self, start: usize, density: f64, keep: &mut [bool]) {
        let thresh = (density * 16_777_216.0).ceil().min(16_777_216.0) as u32;
        keep_mask(self, start, thresh, keep);
    }

    /// Like `keep_mask` with a probability per element (DELLA): element `start + i` is kept iff u < `probs[i]`,
    /// with the same draw `u` that `keep_mask` uses for that element.
    pub fn keep_mask_each(&self, start: usize, probs: &[f32], keep: &mut [bool]) {
        keep_mask_each(self, start, probs, keep);
    }

    /// Standard normal draws for elements `start..start + out.len()` (the randomized SVD's Gaussian sketch):
    /// element `j` uses two words of block `j / 2` through Box–Muller, so any split of the range gives the same
    /// values. u1 = (w + 1) / 2^32 lies in (0, 1], so the logarithm is finite.
    pub fn normals(&self, start: u64, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let j = start + i as u64;
            let w = self.block(j / 2);
            let (a, b) = if j % 2 == 0 { (w[0], w[1]) } else { (w[2], w[3]) };
            let u1 = (f64::from(a) + 1.0) / 4_294_967_296.0;
            let u2 = f64::from(b) / 4_294_967_296.0;
            *o = ((-2.0 * crate::math::ln(u1)).sqrt() * crate::math::cos(std::f64::consts::TAU * u2)) as f32;
        }
    }

    /// `count` indices drawn uniformly from `[0, n)` with replacement (arcee_fusion's quantile sample), in draw
    /// order, into `out` (cleared first; a buffer kept from call to call costs no page faults); draw `d` uses two
    /// 32-bit words of block `d / 2`.
    pub fn sample_indices_into(&self, n: u64, count: usize, out: &mut Vec<u64>) {
        // 64 random bits modulo n: the bias is below n / 2^64, far from measurable.
        let draw = |hi: u32, lo: u32| ((u64::from(hi) << 32) | u64::from(lo)) % n;
        out.clear();
        out.reserve(count);
        // each block once, for its two draws
        for b in 0..(count / 2) as u64 {
            let w = self.block(b);
            out.push(draw(w[0], w[1]));
            out.push(draw(w[2], w[3]));
        }
        if count % 2 == 1 {
            let w = self.block((count / 2) as u64);
            out.push(draw(w[0], w[1]));
        }
    }
}

fn keep_mask(s: &Stream, start: usize, thresh: u32, keep: &mut [bool]) {
    keep_mask_on(isa::active(), s, start, thresh, keep);
}

/// [`Stream::keep_mask`] on path `isa` (narrowed to what this CPU has): whole groups of eight blocks through
/// [`keep_blocks_avx2`] where AVX2 is there, the rest one block at a time; the same bits either way.
#[multiversion(targets = "simd")]
fn keep_mask_on(isa: Isa, s: &Stream, start: usize, thresh: u32, keep: &mut [bool]) {
    // A ragged head up to a block boundary, then whole blocks (a straight loop), then a ragged tail.
    let head = ((4 - start % 4) % 4).min(keep.len());
    let (first, rest) = keep.split_at_mut(head);
    for (i, k) in first.iter_mut().enumerate() {
        let j = start + i;
        *k = (s.block((j / 4) as u64)[j % 4] >> 8) < thresh;
    }
    let mut block0 = ((start + head) / 4) as u64;
    #[cfg(target_arch = "x86_64")]
    let rest = if isa.min(isa::detected()) >= Isa::Avx2 {
        // SAFETY: narrowed to `detected()`, so this CPU has AVX2.
        let done = unsafe { keep_blocks_avx2(s, block0, thresh, rest) };
        block0 += (done / 4) as u64;
        &mut rest[done..]
    } else {
        rest
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let whole = (rest.len() / 4) as u64;
    let mut blocks = rest.chunks_exact_mut(4);
    for (b, ks) in (&mut blocks).enumerate() {
        let w = s.block(block0 + b as u64);
        for (k, x) in ks.iter_mut().zip(w) {
            *k = (x >> 8) < thresh;
        }
    }
    let tail = blocks.into_remainder();
    if !tail.is_empty() {
        let w = s.block(block0 + whole);
        for (k, x) in tail.iter_mut().zip(w) {
            *k = (x >> 8) < thresh;
        }
    }
}

/// Philox4x32-10 of eight consecutive blocks at once, one block per 32-bit lane of each AVX2 vector (word k of
/// block `b0 + l` in lane l of vector k): the scalar rounds with the 32×32→64 products taken on the even lanes
/// and, shifted down, the odd lanes (`_mm256_mul_epu32`), so every word equals [`philox4x32_10`]'s. Writes
/// whether each element is kept for the largest multiple of 32 elements of `keep` (element `4·b0 + i` at
/// `keep[i]`) and returns how many it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn keep_blocks_avx2(s: &Stream, b0: u64, thresh: u32, keep: &mut [bool]) -> usize {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_blend_epi32, _mm256_cmpgt_epi32, _mm256_loadu_si256,
        _mm256_mul_epu32, _mm256_packs_epi16, _mm256_packs_epi32, _mm256_set1_epi32, _mm256_set1_epi8,
        _mm256_setr_epi32, _mm256_setr_epi8, _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_slli_epi64,
        _mm256_srli_epi32, _mm256_srli_epi64, _mm256_storeu_si256, _mm256_xor_si256,
    };
    // (high, low) halves of m·a per lane (a closure: it inherits this function's target features).
    let mulhilo = |m: __m256i, a: __m256i| {
        let even = _mm256_mul_epu32(a, m);
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        (hi, lo)
    };
    let groups = keep.len() / 32;
    let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
    let model = _mm256_set1_epi32(s.model as i32);
    let keys: [(__m256i, __m256i); 10] = std::array::from_fn(|r| {
        let r = r as u32;
        (
            _mm256_set1_epi32(s.key[0].wrapping_add(r.wrapping_mul(W0)) as i32),
            _mm256_set1_epi32(s.key[1].wrapping_add(r.wrapping_mul(W1)) as i32),
        )
    });
    // thresh <= 2^24 and (word >> 8) < 2^24: a signed compare is exact.
    let th = _mm256_set1_epi32(thresh as i32);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // After the packs, byte 4k + i of each 128-bit half is word k of the half's block i; element order wants
    // byte 4i + k (a 4×4 transpose).
    let order = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
    );
    let one = _mm256_set1_epi8(1);
    let counters = |b: u64| {
        if (b as u32) <= u32::MAX - 7 {
            (_mm256_add_epi32(_mm256_set1_epi32(b as u32 as i32), lanes), _mm256_set1_epi32((b >> 32) as u32 as i32))
        } else {
            // The eight counters cross a multiple of 2^32.
            let lo: [u32; 8] = std::array::from_fn(|l| (b + l as u64) as u32);
            let hi: [u32; 8] = std::array::from_fn(|l| ((b + l as u64) >> 32) as u32);
            // SAFETY: both arrays are 32 bytes; loadu has no alignment requirement.
            unsafe { (_mm256_loadu_si256(lo.as_ptr().cast()), _mm256_loadu_si256(hi.as_ptr().cast())) }
        }
    };
    // Two groups of eight blocks side by side: one group's rounds are a chain of dependent multiplies, two
    // independent chains keep the multiplier busy (and fit the 16 vector registers).
    let run = |b: u64, out: &mut [bool]| {
        let mut c = [[_mm256_setzero_si256(); 4]; 2];
        for (i, ci) in c.iter_mut().enumerate() {
            let (lo, hi) = counters(b + 8 * i as u64);
            *ci = [lo, hi, model, _mm256_setzero_si256()];
        }
        for &(k0, k1) in &keys {
            for ci in &mut c {
                let (hi0, lo0) = mulhilo(m0, ci[0]);
                let (hi1, lo1) = mulhilo(m1, ci[2]);
                *ci = [
                    _mm256_xor_si256(_mm256_xor_si256(hi1, ci[1]), k0),
                    lo1,
                    _mm256_xor_si256(_mm256_xor_si256(hi0, ci[3]), k1),
                    lo0,
                ];
            }
        }
        for (ci, o) in c.iter().zip(out.chunks_exact_mut(32)) {
            let kept = ci.map(|w| _mm256_cmpgt_epi32(th, _mm256_srli_epi32::<8>(w)));
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(kept[0], kept[1]), _mm256_packs_epi32(kept[2], kept[3]));
            let bytes = _mm256_and_si256(_mm256_shuffle_epi8(packed, order), one);
            // SAFETY: `o` is 32 bools, each byte written is 0 or 1 (a valid bool); storeu needs no alignment.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), bytes) };
        }
    };
    let mut pairs = keep[..groups * 32].chunks_exact_mut(64);
    for (p, out) in (&mut pairs).enumerate() {
        run(b0 + 16 * p as u64, out);
    }
    let odd = pairs.into_remainder();
    if !odd.is_empty() {
        // One group left: draw a pair into a scratch buffer and keep the first half.
        let mut pair = [false; 64];
        run(b0 + 16 * (groups / 2) as u64, &mut pair);
        odd.copy_from_slice(&pair[..32]);
    }
    groups * 32
}

/// `u < ceil(p·2^24)` (clamped to [0, 2^24]) for an integer u in [0, 2^24) is `u < p·2^24`, and p·2^24 is exact
/// in f32 (a power-of-two scaling; an overflow to infinity compares the same), as is u: one compare, no rounding
/// call, so the loop vectorises (NaN p keeps nothing either way).
#[inline(always)]
fn below(word: u32, p: f32) -> bool {
    ((word >> 8) as f32) < p * 16_777_216.0
}

#[multiversion(targets = "simd")]
fn keep_mask_each(s: &Stream, start: usize, probs: &[f32], keep: &mut [bool]) {
    // One Philox block serves four consecutive elements: a ragged head up to a block boundary, whole blocks,
    // a ragged tail (as `keep_mask`).
    let n = keep.len().min(probs.len());
    let head = ((4 - start % 4) % 4).min(n);
    for (i, (k, &p)) in keep[..head].iter_mut().zip(probs).enumerate() {
        let j = start + i;
        *k = below(s.block((j / 4) as u64)[j % 4], p);
    }
    let block0 = ((start + head) / 4) as u64;
    let mut blocks = keep[head..n].chunks_exact_mut(4);
    let mut ps = probs[head..n].chunks_exact(4);
    for (b, (ks, p4)) in (&mut blocks).zip(&mut ps).enumerate() {
        let w = s.block(block0 + b as u64);
        for ((k, x), &p) in ks.iter_mut().zip(w).zip(p4) {
            *k = below(x, p);
        }
    }
    let whole = ((n - head) / 4) as u64;
    let (tail, ptail) = (blocks.into_remainder(), ps.remainder());
    if !tail.is_empty() {
        let w = s.block(block0 + whole);
        for ((k, x), &p) in tail.iter_mut().zip(w).zip(ptail) {
            *k = below(x, p);
        }
    }
}

/// A xorshift64 stream from `seed` (made odd, so never the stuck all-zero state): the random cases of the crate's
/// unit tests (variety, not quality; the merges' own randomness is [`Stream`]).
#[cfg(test)]
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_indices_are_draw_d_from_block_d_over_two() {
        let s = Stream::new(7, "t", 0);
        let mut out = vec![99];
        for (n, count) in [(10u64, 7usize), (1 << 40, 8), (3, 1), (5, 0)] {
            s.sample_indices_into(n, count, &mut out);
            assert_eq!(out.len(), count);
            for (d, &i) in out.iter().enumerate() {
                let w = s.block((d / 2) as u64);
                let (hi, lo) = if d % 2 == 0 { (w[0], w[1]) } else { (w[2], w[3]) };
                assert_eq!(i, ((u64::from(hi) << 32) | u64::from(lo)) % n);
            }
        }
    }

    /// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn mask_independent_of_split_and_keyed() {
        let s = Stream::new(7, "model.layers.0.mlp.up_proj.weight", 1);
        let mut whole = vec![false; 1003];
        s.keep_mask(0, 0.3, &mut whole);
        let mut parts = vec![false; 1003];
        let (a, b) = parts.split_at_mut(401);
        s.keep_mask(0, 0.3, a);
        s.keep_mask(401, 0.3, b);
        assert_eq!(whole, parts);
        let frac = whole.iter().filter(|&&k| k).count() as f64 / whole.len() as f64;
        assert!((frac - 0.3).abs() < 0.06, "{frac}");
        let mut other = vec![false; 1003];
        Stream::new(7, "model.layers.0.mlp.up_proj.weight", 2).keep_mask(0, 0.3, &mut other);
        assert_ne!(whole, other);
        Stream::new(8, "model.layers.0.mlp.up_proj.weight", 1).keep_mask(0, 0.3, &mut other);
        assert_ne!(whole, other);
        let mut all = vec![false; 10];
        s.keep_mask(0, 1.0, &mut all);
        assert!(all.iter().all(|&k| k));
    }

    /// Every path draws the scalar mask: starts on and off block and group boundaries, lengths around the
    /// 32-element groups, counters that cross a multiple of 2^32 blocks, densities 0, 1 and in between.
    #[test]
    fn keep_mask_same_on_every_path() {
        let s = Stream::new(11, "model.layers.3.self_attn.q_proj.weight", 2);
        let cross = 4 * ((1usize << 32) - 5);
        for start in [0usize, 1, 3, 4, 31, 32, 33, 1000, cross, cross + 2] {
            for len in [0usize, 1, 5, 31, 32, 33, 64, 95, 257, 1030] {
                for density in [0.0, 0.1, 0.5, 0.9, 1.0] {
                    let thresh = (density * 16_777_216.0f64).ceil().min(16_777_216.0) as u32;
                    let want: Vec<bool> =
                        (start..start + len).map(|j| (s.block((j / 4) as u64)[j % 4] >> 8) < thresh).collect();
                    for isa in Isa::ALL {
                        let mut got = vec![false; len];
                        keep_mask_on(isa, &s, start, thresh, &mut got);
                        assert_eq!(got, want, "{isa:?} start {start} len {len} density {density}");
                    }
                }
            }
        }
    }

    /// The per-element mask is the rounded-threshold rule `u < clamp(ceil(p·2^24), 0, 2^24)` at every split,
    /// including probabilities outside [0, 1], NaN and ones within one ulp of a threshold.
    #[test]
    fn keep_mask_each_is_the_ceil_threshold_rule() {
        let s = Stream::new(3, "t", 2);
        let mut probs: Vec<f32> = (0..1031).map(|i| (i as f32 * 0.618_034).fract() * 1.2 - 0.1).collect();
        probs[5] = f32::NAN;
        probs[6] = f32::INFINITY;
        probs[7] = f32::NEG_INFINITY;
        probs[8] = 1e-30;
        for start in [0usize, 1, 2, 3, 1_000_003] {
            // Thresholds exactly at and one ulp around the element's own draw.
            let mut p = probs.clone();
            for (i, q) in p.iter_mut().enumerate().skip(9).step_by(7) {
                let u = (s.block(((start + i) / 4) as u64)[(start + i) % 4] >> 8) as f32 / 16_777_216.0;
                *q = [u, f32::from_bits(u.to_bits() + 1), f32::from_bits(u.to_bits().max(1) - 1)][i % 3];
            }
            let want: Vec<bool> = p
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let j = start + i;
                    let thresh = (f64::from(q) * 16_777_216.0).ceil().clamp(0.0, 16_777_216.0) as u32;
                    (s.block((j / 4) as u64)[j % 4] >> 8) < thresh
                })
                .collect();
            for split in [0usize, 1, 5, 600, p.len()] {
                let mut got = vec![false; p.len()];
                let (a, b) = got.split_at_mut(split);
                s.keep_mask_each(start, &p[..split], a);
                s.keep_mask_each(start + split, &p[split..], b);
                assert_eq!(got, want, "start {start} split {split}");
            }
        }
    }
}
