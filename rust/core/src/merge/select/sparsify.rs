//! The sparsifiers that rank elements within a band or a row (mergekit's `sparsify.py`): breadcrumbs'
//! `magnitude_outliers` (over a whole tensor, or per row as the paper's code does) and DELLA's
//! `della_magprune` keep probabilities. A row is the last dimension (a 1-D tensor is one row); callers hand in
//! row-aligned chunks, so each row is ranked whole and the result does not depend on the chunking.
//!
//! breadcrumbs over n elements keeps the band of ranks (by |x| descending) `[n_top, n − n_bot)` with
//! n_top = ⌊γ·n⌋ and n_bot = max(0, n − ⌊density·n⌋ − n_top). DELLA keeps element j of a row with probability
//! p = (density − ε) + (r_j − 1)/(n − 1)·2ε, r_j its rank by |x| ascending.

use multiversion::multiversion;

use crate::kernels::select::{abs_bits, TrimRule};

/// breadcrumbs over `n` elements: n_bot = max(0, n − target − n_top) smallest and the largest
/// (n − n_bot − target) go; (outer, top) are the sizes of the top sets whose difference is kept.
pub(crate) fn outlier_band(n: u64, density: f64, gamma: f64) -> (u64, u64) {
    let target = (density * n as f64) as u64;
    let n_top = (gamma * n as f64) as u64;
    let n_bot = n.saturating_sub(target + n_top);
    (n - n_bot, n - n_bot - target)
}

/// breadcrumbs over a whole tensor: element `start + j` is kept when the outer rule keeps it and the top rule
/// (the γ largest) does not.
#[multiversion(targets = "simd")]
pub(crate) fn band_mask(outer: &TrimRule, top: &TrimRule, start: usize, x: &[f32], keep: &mut [bool]) {
    for (j, (k, &v)) in keep.iter_mut().zip(x).enumerate() {
        *k = outer.keeps(start + j, v) && !top.keeps(start + j, v);
    }
}

/// Per-row ranking buffers, reused across rows (and chunks: callers keep one per worker).
#[derive(Default)]
pub(crate) struct RowRanks {
    order: Vec<u64>,
    tmp: Vec<u64>,
    counts: Vec<u32>,
}

/// Slices at most this long are finished by insertion sort.
const SMALL_BUCKET: usize = 24;

impl RowRanks {
    /// Indices of `row` ordered by `key` ascending, ties lower index first, as the low 32 bits of
    /// `self.order` (key above them), by [`bucket_sort`]. (Measured on 4096 rows of 2048 bf16 deltas against
    /// the former `sort_unstable` of the u64 keys, 10.5 ns an element, and an LSD radix sort over 8- or 11-bit
    /// digits, 11-12 ns: see docs/benchmarks.md.)
    fn sort(&mut self, row: &[f32], key: impl Fn(f32) -> u32) -> &[u64] {
        self.order.clear();
        self.order.extend(row.iter().enumerate().map(|(j, &v)| (u64::from(key(v)) << 32) | j as u64));
        bucket_sort(&mut self.order, &mut self.tmp, &mut self.counts);
        &self.order
    }
}

/// Sort `(key << 32 | index)` entries that arrive in index order: the keys' range in the slice is cut into about
/// as many equal buckets as it has entries (a shift of `key − min`), a counting sort scatters the entries into
/// them (stable, so each bucket stays in index order), and each bucket holding more than one key is sorted the
/// same way in turn (insertion sort when small). A bucket of equal keys is then already in order: bf16 deltas
/// repeat a few values (zero most of all), which made a comparison sort slow. The result is the order a sort of
/// the (unique) entries gives; the recursion depth is bounded by the 32 key bits.
fn bucket_sort(v: &mut [u64], tmp: &mut Vec<u64>, counts: &mut Vec<u32>) {
    let n = v.len();
    if n <= SMALL_BUCKET {
        insertion_sort(v);
        return;
    }
    let (lo, hi) = key_min_max(v);
    if lo == hi {
        return;
    }
    // The smallest key gets a bucket of its own and the range starts at the next one: the smallest is often a
    // heavy tie far below the rest (zero deltas), and would otherwise stretch the buckets over empty range.
    let lo2 = key_min_above(v, lo);
    // (hi − lo2) >> shift < 2^bits, with 2^bits ≥ n.
    let bits = usize::BITS - (n - 1).leading_zeros();
    let shift = (u32::BITS - (hi - lo2).leading_zeros()).saturating_sub(bits);
    let buckets = ((hi - lo2) >> shift) as usize + 2;
    let bucket = |e: u64| {
        let k = (e >> 32) as u32;
        if k == lo {
            0
        } else {
            ((k - lo2) >> shift) as usize + 1
        }
    };
    // This level's counts sit above the callers' (a stack in one buffer).
    let base = counts.len();
    counts.resize(base + buckets + 1, 0);
    let c = &mut counts[base..];
    for &e in v.iter() {
        c[bucket(e) + 1] += 1;
    }
    for b in 0..buckets {
        c[b + 1] += c[b];
    }
    // c[b] is where bucket b starts; the scatter advances it to where the bucket ends.
    tmp.resize(n, 0);
    for &e in v.iter() {
        let b = bucket(e);
        tmp[c[b] as usize] = e;
        c[b] += 1;
    }
    v.copy_from_slice(&tmp[..n]);
    let mut start = 0;
    for b in 0..buckets {
        let end = counts[base + b] as usize;
        if end - start > 1 {
            bucket_sort(&mut v[start..end], tmp, counts);
        }
        start = end;
    }
    counts.truncate(base);
}

/// The smallest key (high half) above `lo` (`lo` is not the largest).
#[multiversion(targets = "simd")]
fn key_min_above(v: &[u64], lo: u32) -> u32 {
    // Keys equal to `lo` count as u32::MAX: a branch-free select the loop vectorises on.
    v.iter().fold(u32::MAX, |m, &e| {
        let k = (e >> 32) as u32;
        m.min(k | u32::from(k == lo).wrapping_neg())
    })
}

/// (min, max) of the keys (high halves) of a non-empty slice.
#[multiversion(targets = "simd")]
fn key_min_max(v: &[u64]) -> (u32, u32) {
    let lo = v.iter().fold(u32::MAX, |m, &e| m.min((e >> 32) as u32));
    let hi = v.iter().fold(0, |m, &e| m.max((e >> 32) as u32));
    (lo, hi)
}

fn insertion_sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// DELLA's keep probability per element: in each row, rank r = 1..n by |x| ascending (ties: lower index
/// first), p = (density − ε) + (r − 1)/(n − 1)·2ε, computed in f32 as mergekit does (a one-element row gets
/// density − ε, where mergekit divides 0 by 0).
pub(crate) fn della_probs(
    x: &[f32],
    row_len: usize,
    density: f64,
    epsilon: f64,
    probs: &mut [f32],
    ranks: &mut RowRanks,
) {
    let lo = (density - epsilon) as f32;
    let eps = epsilon as f32;
    for (row, p) in x.chunks(row_len).zip(probs.chunks_mut(row_len)) {
        let span = (row.len() - 1) as f32;
        for (r, &k) in ranks.sort(row, abs_bits).iter().enumerate() {
            let norm = if span > 0.0 { (r as f32 / span).clamp(0.0, 1.0) } else { 0.0 };
            p[(k & 0xffff_ffff) as usize] = lo + norm * 2.0 * eps;
        }
    }
}

/// breadcrumbs per row (the paper's variant): in each row of n, the same band as over a whole tensor, ranked
/// by |x| descending with ties lower index first (the whole-tensor selection's rule).
pub(crate) fn outlier_band_rows(
    x: &[f32],
    row_len: usize,
    density: f64,
    gamma: f64,
    keep: &mut [bool],
    ranks: &mut RowRanks,
) {
    for (row, k) in x.chunks(row_len).zip(keep.chunks_mut(row_len)) {
        let (outer, top) = outlier_band(row.len() as u64, density, gamma);
        // Complemented |x| bits: ascending keys are |x| descending, ties lower index first.
        for (desc, &key) in ranks.sort(row, |v| 0x7fff_ffff - abs_bits(v)).iter().enumerate() {
            k[(key & 0xffff_ffff) as usize] = (desc as u64) >= top && (desc as u64) < outer;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlier_band_keeps_density_below_the_top_gamma() {
        // n = 100, density 0.2, gamma 0.1: the top 10 go, the next 20 stay, the bottom 70 go.
        assert_eq!(outlier_band(100, 0.2, 0.1), (30, 10));
        // Density + gamma above 1: nothing is dropped from the bottom.
        assert_eq!(outlier_band(10, 0.9, 0.5), (10, 1));
        assert_eq!(outlier_band(0, 0.5, 0.1), (0, 0));
    }

    #[test]
    fn della_probs_rise_with_rank_and_one_element_rows_get_the_low_end() {
        let mut p = [0f32; 3];
        della_probs(&[-3.0, 1.0, 2.0], 3, 0.5, 0.25, &mut p, &mut RowRanks::default());
        assert_eq!(p, [0.75, 0.25, 0.5]);
        let mut one = [0f32; 2];
        della_probs(&[5.0, -1.0], 1, 0.5, 0.25, &mut one, &mut RowRanks::default());
        assert_eq!(one, [0.25, 0.25]);
    }

    #[test]
    fn della_probs_tie_breaks_by_index() {
        let mut p = [0f32; 3];
        della_probs(&[1.0, -1.0, 1.0], 3, 0.5, 0.25, &mut p, &mut RowRanks::default());
        assert_eq!(p, [0.25, 0.5, 0.75]);
    }

    #[test]
    fn outlier_band_rows_ranks_each_row_alone() {
        // Rows of 4, density 0.5, gamma 0.25: per row drop the largest, keep the next two, drop the smallest.
        let x = [4.0, -1.0, 3.0, 2.0, 0.1, 0.4, -0.3, 0.2];
        let mut keep = [false; 8];
        outlier_band_rows(&x, 4, 0.5, 0.25, &mut keep, &mut RowRanks::default());
        assert_eq!(keep, [false, false, true, true, false, false, true, true]);
    }

    /// The ranking equals a comparison sort of (key, index), on rows with many ties, both signs of zero,
    /// NaN, infinities and a wide spread of exponents, for both key orders.
    #[test]
    fn radix_ranks_match_a_comparison_sort() {
        let mut next = crate::rng::xorshift(0x2545_f491_4f6c_dd1d);
        let mut ranks = RowRanks::default();
        for n in [1usize, 2, 3, 17, 256, 1000, 4099] {
            let row: Vec<f32> = (0..n)
                .map(|_| match next() % 8 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 1.5e-3,
                    3 => f32::NAN,
                    4 => f32::INFINITY * if next() % 2 == 0 { 1.0 } else { -1.0 },
                    _ => f32::from_bits((next() as u32) & 0xbfff_ffff),
                })
                .collect();
            let keys: [fn(f32) -> u32; 2] = [abs_bits, |v| 0x7fff_ffff - abs_bits(v)];
            for key in keys {
                let mut want: Vec<(u32, usize)> = row.iter().enumerate().map(|(j, &v)| (key(v), j)).collect();
                want.sort_unstable();
                let got: Vec<(u32, usize)> =
                    ranks.sort(&row, key).iter().map(|&k| ((k >> 32) as u32, (k & 0xffff_ffff) as usize)).collect();
                assert_eq!(got, want, "n = {n}");
            }
        }
    }
}
