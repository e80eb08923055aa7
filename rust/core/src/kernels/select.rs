//! Exact top-k selection by magnitude without sorting: a two-pass radix select over the f32 bit patterns of |x|.
//! For non-negative floats the bit pattern orders like the value, so the k-th largest |x| is found from a
//! histogram of the high 15 bits (sign cleared) and then one of the low 16 bits inside the bucket that holds it.
//! Elements equal to the threshold are kept lowest index first, which makes the kept set a pure function of
//! the values (independent of chunking and threads), and lets each element decide alone:
//! keep = |x| > t  or  (|x| == t and index <= last_tie).

use multiversion::multiversion;

use crate::kernels::combine::{self, Scale};
use crate::kernels::isa;
pub const HIGH_BINS: usize = 1 << 15;
pub const LOW_BINS: usize = 1 << 16;

#[inline(always)]
pub fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Counts are u32 to halve the tables' cache footprint (the scatter is the hot loop); `merge` refuses tensors
/// of 2^32 elements or more for magnitude trimming, so they cannot overflow.
#[multiversion(targets = "simd")]
pub fn hist_high(vals: &[f32], hist: &mut [u32; HIGH_BINS]) {
    for &v in vals {
        // The mask proves the index in bounds, so the loop carries no bounds check.
        hist[((abs_bits(v) >> 16) as usize) & (HIGH_BINS - 1)] += 1;
    }
}

#[multiversion(targets = "simd")]
pub fn hist_low(vals: &[f32], high: u32, hist: &mut [u32; LOW_BINS]) {
    for &v in vals {
        let b = abs_bits(v);
        if b >> 16 == high {
            hist[(b & 0xffff) as usize] += 1;
        }
    }
}

/// Walk a histogram from the top: the bin holding the `k`-th largest (1-based) and how many of the
/// selection fall in that bin (the rest lie in higher bins).
pub fn find_bin(hist: &[u32], k: u64) -> (usize, u64) {
    let mut above = 0u64;
    for b in (0..hist.len()).rev() {
        let h = u64::from(hist[b]);
        if above + h >= k {
            return (b, k - above);
        }
        above += h;
    }
    unreachable!("k is at most the number of elements")
}

/// The rule that decides which elements a magnitude trim keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimRule {
    pub threshold_bits: u32,
    /// Elements equal to the threshold are kept up to and including this index.
    pub last_tie: usize,
    pub keep_all: bool,
}

impl TrimRule {
    pub const ALL: TrimRule = TrimRule { threshold_bits: 0, last_tie: usize::MAX, keep_all: true };
    /// Keeps nothing: no |x| bit pattern (at most 0x7fff_ffff) reaches the threshold.
    pub const NONE: TrimRule = TrimRule { threshold_bits: u32::MAX, last_tie: 0, keep_all: false };

    #[inline(always)]
    pub fn keeps(&self, index: usize, x: f32) -> bool {
        let b = abs_bits(x);
        self.keep_all || b > self.threshold_bits || (b == self.threshold_bits && index <= self.last_tie)
    }

    /// [`TrimRule::keeps`] for `vals` (elements `start..`): the chunk splits where ties stop being kept, so
    /// neither part compares indices (a 64-bit compare per element, which halved the loop's vector width).
    pub fn mask(&self, start: usize, vals: &[f32], keep: &mut [bool]) {
        if self.keep_all {
            keep.fill(true);
            return;
        }
        // Elements [0, cut) of the chunk have index <= last_tie.
        let cut = self.last_tie.saturating_add(1).saturating_sub(start).min(vals.len());
        let (t, (v0, v1), (k0, k1)) = (self.threshold_bits, vals.split_at(cut), keep.split_at_mut(cut));
        trim_mask(t, true, v0, k0);
        trim_mask(t, false, v1, k1);
    }

    /// `x ← weight·(scale(x)·keep)` with this rule's keep mask (element `start + j` at `x[j]`): what
    /// [`TrimRule::mask`] then [`combine::weigh`] compute, in one loop and without a keep buffer.
    pub fn weigh(&self, start: usize, x: &mut [f32], scale: Scale, weight: f32) {
        if self.keep_all {
            combine::weigh_at_least(x, 0, scale, weight);
            return;
        }
        let t = self.threshold_bits;
        // keep = |x| >= t for indices up to the last kept tie, |x| > t (i.e. >= t + 1) after it; t = u32::MAX
        // (keep nothing) stays u32::MAX, which no |x| bit pattern reaches.
        let strict = t.saturating_add(1);
        let cut = self.last_tie.saturating_add(1).saturating_sub(start).min(x.len());
        let (x0, x1) = x.split_at_mut(cut);
        combine::weigh_at_least(x0, t, scale, weight);
        combine::weigh_at_least(x1, strict, scale, weight);
    }
}

/// keep = |x| > t, or |x| == t where `ties` holds.
#[multiversion(targets = "simd")]
fn trim_mask(t: u32, ties: bool, vals: &[f32], keep: &mut [bool]) {
    if ties {
        keep.iter_mut().zip(vals).for_each(|(k, &v)| *k = abs_bits(v) >= t);
    } else {
        keep.iter_mut().zip(vals).for_each(|(k, &v)| *k = abs_bits(v) > t);
    }
}

/// The index of the `nth` (1-based) element equal to `bits` in `vals`, which starts at element `start`.
pub fn nth_equal(vals: &[f32], bits: u32, nth: u64, start: usize) -> Option<usize> {
    let mut seen = 0u64;
    for (j, &v) in vals.iter().enumerate() {
        if abs_bits(v) == bits {
            seen += 1;
            if seen == nth {
                return Some(start + j);
            }
        }
    }
    None
}

#[multiversion(targets = "simd")]
pub fn count_equal(vals: &[f32], bits: u32) -> u64 {
    vals.iter().filter(|&&v| abs_bits(v) == bits).count() as u64
}

/// Append the elements of `vals` (element `start` onwards) whose |x| lies in high bin `high`, packed as
/// `low16 << 48 | index` (indices stay below 2^48), in index order.
#[multiversion(targets = "simd")]
pub fn collect_bin(vals: &[f32], high: u32, start: usize, out: &mut Vec<u64>) {
    for (j, &v) in vals.iter().enumerate() {
        let b = abs_bits(v);
        if b >> 16 == high {
            out.push(u64::from(b & 0xffff) << 48 | (start + j) as u64);
        }
    }
}

/// Finish a selection from the collected elements of the threshold's bin (in index order): the `need`-th largest
/// low half is the threshold; of the elements equal to it, the lowest-indexed ones are kept.
pub fn select_in_bin(cands: &[u64], high: u32, need: u64) -> TrimRule {
    let mut hist = [0u32; LOW_BINS];
    for &c in cands {
        hist[(c >> 48) as usize] += 1;
    }
    let (lo, ties_kept) = find_bin(&hist, need);
    let bits = (high << 16) | lo as u32;
    let mut last_tie = usize::MAX;
    if ties_kept < u64::from(hist[lo]) {
        let mut seen = 0u64;
        for &c in cands {
            if (c >> 48) as usize == lo {
                seen += 1;
                if seen == ties_kept {
                    last_tie = (c & ((1 << 48) - 1)) as usize;
                    break;
                }
            }
        }
    }
    TrimRule { threshold_bits: bits, last_tie, keep_all: false }
}

/// Largest element index a bracket key can carry (indices are stored as `MAX_INDEX - index`, so a larger key is a
/// larger magnitude or, at equal magnitude, a lower index: exactly the keep order).
const INDEX_BITS: u32 = 33;
const MAX_INDEX: u64 = (1 << INDEX_BITS) - 1;

/// How many frequent values a bracket counts instead of collecting.
pub const SPECIALS: usize = 4;

// The lane loops index several arrays at the same lane: plain indices read (and vectorise) best; `&` between
// booleans keeps the lane loop branch-free.
#[allow(clippy::needless_range_loop, clippy::needless_bitwise_bool)]
#[inline(always)]
fn bracket_collect_impl<const GROUP: usize>(
    vals: &[f32],
    lo: u32,
    hi: u32,
    specials: &[u32; SPECIALS],
    start: usize,
    out: &mut Vec<u64>,
    counts: &mut [u64; SPECIALS],
) -> u64 {
    // Portable: the baseline path, and the tails of the vector ones.
    let width = hi.wrapping_sub(lo);
    let collect = |b: u32, index: usize, out: &mut Vec<u64>| {
        if b.wrapping_sub(lo) <= width && !specials.contains(&b) {
            out.push((u64::from(b) << INDEX_BITS) | (MAX_INDEX - index as u64));
        }
    };
    // Per-lane counters (a lane sees at most len/GROUP elements, and chunks are far below 2^32 groups).
    let mut above = [0u32; GROUP];
    let mut eq = [[0u32; GROUP]; SPECIALS];
    let mut groups = vals.chunks_exact(GROUP);
    for (g, group) in (&mut groups).enumerate() {
        let mut hit = 0u32;
        for l in 0..GROUP {
            let b = abs_bits(group[l]);
            above[l] += u32::from(b > hi);
            let mut special = false;
            for p in 0..SPECIALS {
                let e = b == specials[p];
                eq[p][l] += u32::from(e);
                special |= e;
            }
            hit |= u32::from((b.wrapping_sub(lo) <= width) & !special);
        }
        if hit != 0 {
            let first = start + g * GROUP;
            for (j, &v) in group.iter().enumerate() {
                collect(abs_bits(v), first + j, out);
            }
        }
    }
    let mut total = above.iter().map(|&a| u64::from(a)).sum::<u64>();
    for (c, e) in counts.iter_mut().zip(&eq) {
        *c += e.iter().map(|&x| u64::from(x)).sum::<u64>();
    }
    let rest = groups.remainder();
    let first = start + vals.len() - rest.len();
    for (j, &v) in rest.iter().enumerate() {
        let b = abs_bits(v);
        total += u64::from(b > hi);
        match specials.iter().position(|&s| s == b) {
            Some(p) => counts[p] += 1,
            None => collect(b, first + j, out),
        }
    }
    total
}

/// Count the elements whose |x| bit pattern is above `hi`; of those in `[lo, hi]`, count the ones equal to a
/// special value (in `counts`) and collect the keys of the others. The specials lie in `[lo, hi]` (or are
/// `u32::MAX`, matching nothing).
///
/// Groups of 16 (8 with AVX2) are scanned with compares that vectorise, into per-lane counters that are summed once at
/// the end (no reduction per group): above `hi`; equal to each special; in the bracket as `b - lo <= hi - lo` in
/// wrapping arithmetic and equal to no special. Only a group holding such an element is walked element by
/// element to collect its keys, in index order. Dispatched per instruction set ([`crate::kernels::isa`]): AVX2
/// intrinsics (also taken on AVX-512 CPUs: no AVX-512 variant yet, see docs/benchmarks.md), else portable code.
#[allow(clippy::too_many_arguments)]
pub fn bracket_collect(
    vals: &[f32],
    lo: u32,
    hi: u32,
    specials: &[u32; SPECIALS],
    start: usize,
    out: &mut Vec<u64>,
    counts: &mut [u64; SPECIALS],
) -> u64 {
    bracket_collect_on(isa::active(), vals, lo, hi, specials, start, out, counts)
}

/// [`bracket_collect`] on path `isa` (narrowed to what this CPU has).
#[allow(clippy::too_many_arguments)]
pub fn bracket_collect_on(
    isa: isa::Isa,
    vals: &[f32],
    lo: u32,
    hi: u32,
    specials: &[u32; SPECIALS],
    start: usize,
    out: &mut Vec<u64>,
    counts: &mut [u64; SPECIALS],
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa.min(isa::detected()) >= isa::Isa::Avx2 {
        // SAFETY: narrowed to `detected()`, so this CPU has AVX2.
        return unsafe { bracket_collect_avx2(vals, lo, hi, specials, start, out, counts) };
    }
    bracket_collect_impl::<16>(vals, lo, hi, specials, start, out, counts)
}

/// [`bracket_collect`] with AVX2 intrinsics, 8 lanes at a time: five lane counters (≤ hi, each special) and the
/// compare operands stay in the 16 registers; unsigned compares through min/max (`hi` may be `u32::MAX`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn bracket_collect_avx2(
    vals: &[f32],
    lo: u32,
    hi: u32,
    specials: &[u32; SPECIALS],
    start: usize,
    out: &mut Vec<u64>,
    counts: &mut [u64; SPECIALS],
) -> u64 {
    use std::arch::x86_64::{
        __m256i, _mm256_and_si256, _mm256_andnot_si256, _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmpeq_epi32,
        _mm256_loadu_ps, _mm256_max_epu32, _mm256_min_epu32, _mm256_movemask_ps, _mm256_or_si256, _mm256_set1_epi32,
        _mm256_setzero_si256, _mm256_storeu_si256, _mm256_sub_epi32,
    };
    const L: usize = 8;
    let width = hi.wrapping_sub(lo);
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let (hi_v, lo_v, width_v) =
        (_mm256_set1_epi32(hi as i32), _mm256_set1_epi32(lo as i32), _mm256_set1_epi32(width as i32));
    let sv = specials.map(|x| _mm256_set1_epi32(x as i32));
    let mut le = _mm256_setzero_si256();
    let mut eq = [_mm256_setzero_si256(); SPECIALS];
    let mut groups = vals.chunks_exact(L);
    let n_groups = groups.len();
    for (g, group) in (&mut groups).enumerate() {
        // SAFETY: `group` holds exactly 8 f32 (chunks_exact); loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_ps(group.as_ptr()) };
        let b = _mm256_and_si256(_mm256_castps_si256(v), abs);
        // b <= hi  <=>  max(b, hi) == hi; each true lane is -1, so subtracting counts it.
        le = _mm256_sub_epi32(le, _mm256_cmpeq_epi32(_mm256_max_epu32(b, hi_v), hi_v));
        let mut special = _mm256_setzero_si256();
        for p in 0..SPECIALS {
            let e = _mm256_cmpeq_epi32(b, sv[p]);
            eq[p] = _mm256_sub_epi32(eq[p], e);
            special = _mm256_or_si256(special, e);
        }
        // In the bracket: (b - lo) <= width unsigned  <=>  min(b - lo, width) == b - lo.
        let x = _mm256_sub_epi32(b, lo_v);
        let inside = _mm256_cmpeq_epi32(_mm256_min_epu32(x, width_v), x);
        let hit = _mm256_andnot_si256(special, inside);
        if _mm256_movemask_ps(_mm256_castsi256_ps(hit)) != 0 {
            let first = start + g * L;
            for (j, &v) in group.iter().enumerate() {
                let b = abs_bits(v);
                if b.wrapping_sub(lo) <= width && !specials.contains(&b) {
                    out.push((u64::from(b) << INDEX_BITS) | (MAX_INDEX - (first + j) as u64));
                }
            }
        }
    }
    let lanes = |v: __m256i| {
        let mut a = [0u32; L];
        // SAFETY: `a` is 32 bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), v) };
        a.iter().map(|&x| u64::from(x)).sum::<u64>()
    };
    let mut above = (n_groups * L) as u64 - lanes(le);
    for (c, e) in counts.iter_mut().zip(eq) {
        *c += lanes(e);
    }
    let rest = groups.remainder();
    above += bracket_collect_impl::<L>(rest, lo, hi, specials, start + vals.len() - rest.len(), out, counts);
    above
}

/// Where the `r`-th largest of a bracket lies.
pub enum Selected {
    Rule(TrimRule),
    /// On a special value: the threshold is `bits`, and the last tie kept is its `nth` occurrence in the chunk
    /// `[chunk_start, chunk_start + chunk_len)`, which the caller finds by rescanning that chunk.
    Special {
        bits: u32,
        chunk_start: usize,
        chunk_len: usize,
        nth: u64,
    },
}

/// The `r`-th largest (1-based, lowest index first among equals) of a bracket's elements: the collected keys
/// `cands` plus the special values, counted per chunk in `chunk_counts` (sorted by chunk start). `None` when
/// the bracket holds fewer than `r` elements (the sample misled).
pub fn select_with_specials(
    cands: Vec<u64>,
    specials: &[u32; SPECIALS],
    chunk_counts: &[(usize, usize, [u64; SPECIALS])],
    r: u64,
) -> Option<Selected> {
    let totals: Vec<(u32, usize)> =
        (0..SPECIALS).filter(|&p| specials[p] != u32::MAX).map(|p| (specials[p], p)).collect();
    let special_total = |p: usize| chunk_counts.iter().map(|c| c.2[p]).sum::<u64>();
    // The specials cut the value range into intervals; count the collected keys in each (keys never equal a
    // special), walk intervals and specials from the top, and select inside the one interval that holds the
    // r-th largest: linear time, where a sort of every candidate was n·log n. The same element as a merge-walk
    // of the sorted keys, since keys are distinct (they carry the index) and ordered exactly like the keep order.
    let mut order: Vec<(u32, usize)> = totals;
    order.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
    let interval = |key: u64| {
        let cb = (key >> INDEX_BITS) as u32;
        order.iter().filter(|&&(sb, _)| sb > cb).count()
    };
    let mut counts = vec![0u64; order.len() + 1];
    if order.is_empty() {
        counts[0] = cands.len() as u64;
    } else {
        for &k in &cands {
            counts[interval(k)] += 1;
        }
    }
    let mut kept = 0u64;
    for (t, &count) in counts.iter().enumerate() {
        if kept + count >= r {
            let mut inside: Vec<u64> =
                if order.is_empty() { cands } else { cands.into_iter().filter(|&k| interval(k) == t).collect() };
            let at = (r - kept - 1) as usize;
            let key = *inside.select_nth_unstable_by(at, |a, b| b.cmp(a)).1;
            return Some(Selected::Rule(TrimRule {
                threshold_bits: (key >> INDEX_BITS) as u32,
                last_tie: (MAX_INDEX - (key & MAX_INDEX)) as usize,
                keep_all: false,
            }));
        }
        kept += count;
        let &(sb, p) = order.get(t)?;
        let total = special_total(p);
        if kept + total >= r {
            let mut nth = r - kept;
            for &(start, len, counts) in chunk_counts {
                if counts[p] >= nth {
                    return Some(Selected::Special { bits: sb, chunk_start: start, chunk_len: len, nth });
                }
                nth -= counts[p];
            }
            unreachable!("the totals cover nth");
        }
        kept += total;
    }
    None
}

#[cfg(test)]
mod isa_tests {
    use super::*;
    use crate::kernels::isa::Isa;
    use crate::rng::xorshift;

    /// Every path of `bracket_collect` returns what the portable one does (above, keys in order, special counts),
    /// on values from a coarse grid (ties and specials common), with brackets up to `hi = u32::MAX`.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn bracket_collect_same_on_every_path() {
        let mut r = xorshift(7);
        for case in 0..300 {
            let n = (r() % 200) as usize;
            let vals: Vec<f32> = (0..n).map(|_| ((r() % 33) as f32 - 16.0) * 0.125).collect();
            let pick = |x: u64| abs_bits(((x % 33) as f32 - 16.0) * 0.125);
            let (a, b) = (pick(r()), pick(r()));
            let (lo, hi) = if case % 7 == 0 { (0, u32::MAX) } else { (a.min(b), a.max(b)) };
            // Distinct specials inside the bracket, unused slots u32::MAX (as `frequent_values` makes them).
            let mut specials = [u32::MAX; SPECIALS];
            for p in 0..(r() % 5) as usize {
                let v = pick(r());
                if v >= lo && v <= hi && !specials.contains(&v) {
                    specials[p] = v;
                }
            }
            let start = (r() % 1000) as usize;
            let (mut out0, mut c0) = (Vec::new(), [0u64; SPECIALS]);
            let above0 = bracket_collect_impl::<16>(&vals, lo, hi, &specials, start, &mut out0, &mut c0);
            // The definition, element by element.
            let above_def = vals.iter().filter(|&&v| abs_bits(v) > hi).count() as u64;
            assert_eq!(above0, above_def);
            for isa in Isa::ALL {
                let (mut out, mut c) = (Vec::new(), [0u64; SPECIALS]);
                let above = bracket_collect_on(isa, &vals, lo, hi, &specials, start, &mut out, &mut c);
                assert_eq!((above, &out, c), (above0, &out0, c0), "{isa:?} case {case}");
            }
        }
    }

    /// `TrimRule::weigh` gives the bytes of `mask` then `combine::weigh`, for both scales, every kind of rule
    /// (keep all, keep none, ties cut anywhere) and NaN, infinities and zeros of both signs among the values.
    #[test]
    fn trim_weigh_matches_mask_then_weigh() {
        let mut r = xorshift(5);
        let pool = [0.0f32, -0.0, 0.5, -0.5, 1.5, -2.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40];
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        for case in 0..600 {
            let n = (r() % 90) as usize;
            let vals: Vec<f32> = (0..n).map(|_| pool[(r() % 10) as usize]).collect();
            let start = (r() % 60) as usize;
            let rule = match case % 5 {
                0 => TrimRule::ALL,
                1 => TrimRule::NONE,
                _ => TrimRule {
                    threshold_bits: abs_bits(pool[(r() % 10) as usize]),
                    last_tie: [usize::MAX, 0, (r() % 160) as usize][(r() % 3) as usize],
                    keep_all: false,
                },
            };
            let scale = [Scale::Mul(1.0), Scale::Mul(1.7), Scale::Div(0.3)][(r() % 3) as usize];
            let weight = [1.0f32, 0.5, -2.0][(r() % 3) as usize];
            let mut keep = vec![false; n];
            rule.mask(start, &vals, &mut keep);
            let mut want = vals.clone();
            combine::weigh(&mut want, Some(&keep), scale, weight);
            let mut got = vals.clone();
            rule.weigh(start, &mut got, scale, weight);
            assert_eq!(bits(&got), bits(&want), "{rule:?} start {start} case {case}");
        }
    }

    /// `TrimRule::mask` (split where ties stop) keeps exactly what `keeps` says, element by element.
    #[test]
    fn trim_mask_matches_keeps() {
        let mut r = xorshift(11);
        for _ in 0..500 {
            let n = (r() % 100) as usize;
            let vals: Vec<f32> = (0..n).map(|_| ((r() % 9) as f32 - 4.0) * 0.5).collect();
            let start = (r() % 50) as usize;
            let t = abs_bits(((r() % 9) as f32 - 4.0) * 0.5);
            let last_tie = match r() % 4 {
                0 => usize::MAX,
                1 => 0,
                _ => (r() % 160) as usize,
            };
            let rule = TrimRule { threshold_bits: t, last_tie, keep_all: r() % 10 == 0 };
            let mut keep = vec![false; n];
            rule.mask(start, &vals, &mut keep);
            for (j, (&k, &v)) in keep.iter().zip(&vals).enumerate() {
                assert_eq!(k, rule.keeps(start + j, v), "{rule:?} start {start} j {j}");
            }
        }
    }
}
