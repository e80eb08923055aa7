//! The sparsifiers that rank elements within a band or a row (mergekit's `sparsify.py`): breadcrumbs'
//! `magnitude_outliers` (over a whole tensor, or per row as the paper's code does) and DELLA's
//! `della_magprune` keep probabilities. A row is the last dimension (a 1-D tensor is one row); callers hand in
//! row-aligned chunks, so each row is ranked whole and the result does not depend on the chunking.
//!
//! breadcrumbs over n elements keeps the band of ranks (by |x| descending) `[n_top, n − n_bot)` with
//! n_top = ⌊γ·n⌋ and n_bot = max(0, n − ⌊density·n⌋ − n_top). DELLA keeps element j of a row with probability
//! p = (density − ε) + (r_j − 1)/(n − 1)·2ε, r_j its rank by |x| ascending.

use crate::kernels::select::abs_bits;

/// breadcrumbs over `n` elements: n_bot = max(0, n − target − n_top) smallest and the largest
/// (n − n_bot − target) go; (outer, top) are the sizes of the top sets whose difference is kept.
pub(crate) fn outlier_band(n: u64, density: f64, gamma: f64) -> (u64, u64) {
    let target = (density * n as f64) as u64;
    let n_top = (gamma * n as f64) as u64;
    let n_bot = n.saturating_sub(target + n_top);
    (n - n_bot, n - n_bot - target)
}

/// Indices of `row` ordered by |x| ascending, ties lower index first: one u64 key per element (|x| bits
/// above the index), which sorts much faster than a tuple key.
fn ascending(row: &[f32], order: &mut Vec<u64>) {
    order.clear();
    order.extend(row.iter().enumerate().map(|(j, &v)| (u64::from(abs_bits(v)) << 32) | j as u64));
    order.sort_unstable();
    for k in order.iter_mut() {
        *k &= 0xffff_ffff;
    }
}

/// DELLA's keep probability per element: in each row, rank r = 1..n by |x| ascending (ties: lower index
/// first), p = (density − ε) + (r − 1)/(n − 1)·2ε, computed in f32 as mergekit does (a one-element row gets
/// density − ε, where mergekit divides 0 by 0).
pub(crate) fn della_probs(x: &[f32], row_len: usize, density: f64, epsilon: f64, probs: &mut [f32]) {
    let lo = (density - epsilon) as f32;
    let eps = epsilon as f32;
    let mut order = Vec::new();
    for (row, p) in x.chunks(row_len).zip(probs.chunks_mut(row_len)) {
        ascending(row, &mut order);
        let span = (row.len() - 1) as f32;
        for (r, &j) in order.iter().enumerate() {
            let norm = if span > 0.0 { (r as f32 / span).clamp(0.0, 1.0) } else { 0.0 };
            p[usize::try_from(j).expect("row index")] = lo + norm * 2.0 * eps;
        }
    }
}

/// breadcrumbs per row (the paper's variant): in each row of n, the same band as over a whole tensor, ranked
/// by |x| descending with ties lower index first (the whole-tensor selection's rule).
pub(crate) fn outlier_band_rows(x: &[f32], row_len: usize, density: f64, gamma: f64, keep: &mut [bool]) {
    let mut order: Vec<u64> = Vec::new();
    for (row, k) in x.chunks(row_len).zip(keep.chunks_mut(row_len)) {
        let (outer, top) = outlier_band(row.len() as u64, density, gamma);
        // Complemented |x| bits above the index: ascending keys are |x| descending, ties lower index first.
        order.clear();
        order.extend(row.iter().enumerate().map(|(j, &v)| (u64::from(!abs_bits(v)) << 32) | j as u64));
        order.sort_unstable();
        for (desc, &key) in order.iter().enumerate() {
            k[usize::try_from(key & 0xffff_ffff).expect("row index")] = (desc as u64) >= top && (desc as u64) < outer;
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
        della_probs(&[-3.0, 1.0, 2.0], 3, 0.5, 0.25, &mut p);
        assert_eq!(p, [0.75, 0.25, 0.5]);
        let mut one = [0f32; 2];
        della_probs(&[5.0, -1.0], 1, 0.5, 0.25, &mut one);
        assert_eq!(one, [0.25, 0.25]);
    }

    #[test]
    fn della_probs_tie_breaks_by_index() {
        let mut p = [0f32; 3];
        della_probs(&[1.0, -1.0, 1.0], 3, 0.5, 0.25, &mut p);
        assert_eq!(p, [0.25, 0.5, 0.75]);
    }

    #[test]
    fn outlier_band_rows_ranks_each_row_alone() {
        // Rows of 4, density 0.5, gamma 0.25: per row drop the largest, keep the next two, drop the smallest.
        let x = [4.0, -1.0, 3.0, 2.0, 0.1, 0.4, -0.3, 0.2];
        let mut keep = [false; 8];
        outlier_band_rows(&x, 4, 0.5, 0.25, &mut keep);
        assert_eq!(keep, [false, false, true, true, false, false, true, true]);
    }
}
