//! Row-wise work: masks ranked within each row (DELLA, breadcrumbs per row) and arcee_fusion, whose importance
//! is a per-row KL divergence. A row is the last dimension (a 1-D tensor is one row); callers hand in
//! row-aligned chunks, so each row is ranked whole and the result does not depend on the chunking.

use rayon::prelude::*;

use super::{chunks, emit, load, load_raw, release_chunk, row_chunk, Job, Options, Sink};
use crate::error::Result;
use crate::kernels::select::abs_bits;
use crate::rng::Stream;

/// Indices of `row` ordered by |x| ascending, ties lower index first: one u64 key per element (|x| bits
/// above the index), which sorts much faster than a tuple key.
fn ascending(row: &[f32], order: &mut Vec<u64>) {
    order.clear();
    order.extend(row.iter().enumerate().map(|(j, &v)| ((abs_bits(v) as u64) << 32) | j as u64));
    order.sort_unstable();
    order.iter_mut().for_each(|k| *k &= 0xffff_ffff);
}

/// DELLA's keep probability per element: in each row, rank r = 1..n by |x| ascending (ties: lower index
/// first), p = (density − ε) + (r − 1)/(n − 1)·2ε, computed in f32 as mergekit does (a one-element row gets
/// density − ε, where mergekit divides 0 by 0).
pub(super) fn della_probs(x: &[f32], row_len: usize, density: f64, epsilon: f64, probs: &mut [f32]) {
    let lo = (density - epsilon) as f32;
    let eps = epsilon as f32;
    let mut order = Vec::new();
    for (row, p) in x.chunks(row_len).zip(probs.chunks_mut(row_len)) {
        ascending(row, &mut order);
        let span = (row.len() - 1) as f32;
        for (r, &j) in order.iter().enumerate() {
            let norm = if span > 0.0 { (r as f32 / span).clamp(0.0, 1.0) } else { 0.0 };
            p[j as usize] = lo + norm * 2.0 * eps;
        }
    }
}

/// breadcrumbs per row (the paper's variant): in each row of n, the same band as over a whole tensor, ranked
/// by |x| descending with ties lower index first (the whole-tensor selection's rule).
pub(super) fn outlier_band_rows(x: &[f32], row_len: usize, density: f64, gamma: f64, keep: &mut [bool]) {
    let mut order: Vec<u64> = Vec::new();
    for (row, k) in x.chunks(row_len).zip(keep.chunks_mut(row_len)) {
        let (outer, top) = super::gta::outlier_band(row.len() as u64, density, gamma);
        // Complemented |x| bits above the index: ascending keys are |x| descending, ties lower index first.
        order.clear();
        order.extend(row.iter().enumerate().map(|(j, &v)| ((!abs_bits(v) as u64) << 32) | j as u64));
        order.sort_unstable();
        for (desc, &key) in order.iter().enumerate() {
            k[(key & 0xffff_ffff) as usize] = (desc as u64) >= top && (desc as u64) < outer;
        }
    }
}

/// KL(softmax(b) ‖ softmax(a)) of one row, with mergekit's +1e-8 on both distributions; probabilities in f32,
/// the sums in f64.
fn row_kl(a: &[f32], b: &[f32]) -> f32 {
    let softmax_parts = |v: &[f32]| {
        let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = v.iter().map(|&x| ((x - mx) as f64).exp()).sum();
        (mx, sum)
    };
    let (ma, sa) = softmax_parts(a);
    let (mb, sb) = softmax_parts(b);
    let mut kl = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let q = ((((x - ma) as f64).exp() / sa) as f32) + 1e-8;
        let p = ((((y - mb) as f64).exp() / sb) as f32) + 1e-8;
        kl += (p * (p / q).ln()) as f64;
    }
    kl as f32
}

/// Quantile sample size, as mergekit's `_QUANTILE_SAMPLE_SIZE`.
const QUANTILE_SAMPLE: usize = 1_000_000;

/// arcee_fusion: importance = |b − a| · KL of the row; elements whose importance reaches
/// median + 1.5·IQR take b, the rest keep a. Quantiles are exact up to 1e6 elements and from a seeded sample
/// of 1e6 (with replacement) beyond, where mergekit's sample is unseeded.
pub(super) fn arcee_fusion(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let row_len = job.row_len();
    let n = job.numel;
    let block = row_chunk(opts.chunk_elems.max(1), row_len);
    let kl: Vec<f32> = chunks(n, block)
        .map_init(crate::kernels::combine::Scratch::default, |s, (start, len)| {
            load_raw(job, start, len, s);
            release_chunk(job, opts, start, len);
            s.base[..len].chunks(row_len).zip(s.x[0][..len].chunks(row_len)).map(|(a, b)| row_kl(a, b)).collect()
        })
        .collect::<Vec<Vec<f32>>>()
        .concat();
    let importance = |a: f32, b: f32, row_kl: f32| (b - a).abs() * row_kl;
    let mut sample: Vec<f32> = if n <= QUANTILE_SAMPLE {
        chunks(n, block)
            .map_init(crate::kernels::combine::Scratch::default, |s, (start, len)| {
                load_raw(job, start, len, s);
                release_chunk(job, opts, start, len);
                (0..len).map(|j| importance(s.base[j], s.x[0][j], kl[(start + j) / row_len])).collect()
            })
            .collect::<Vec<Vec<f32>>>()
            .concat()
    } else {
        let mut idx = Stream::new(job.spec.seed, job.name, 0).sample_indices(n as u64, QUANTILE_SAMPLE);
        // Read in index order (the quantiles do not depend on the order of the sample).
        idx.sort_unstable();
        let base = job.base.as_ref().expect("validated: arcee_fusion has a base");
        let other = &job.inputs[0].src;
        idx.iter()
            .map(|&i| {
                let (mut a, mut b) = ([0f32], [0f32]);
                load(base, job.cast, i as usize, &mut a);
                load(other, job.cast, i as usize, &mut b);
                importance(a[0], b[0], kl[i as usize / row_len])
            })
            .collect()
    };
    let threshold = if sample.is_empty() {
        f32::INFINITY
    } else {
        sample.sort_unstable_by(f32::total_cmp);
        let at = |q: f64| sample[(q * (sample.len() - 1) as f64) as usize];
        let (q1, median, q3) = (at(0.25), at(0.5), at(0.75));
        median + 1.5 * (q3 - q1)
    };
    emit(job, opts, opts.chunk_elems.max(1), sink, |s, start, len| {
        load_raw(job, start, len, s);
        for j in 0..len {
            let (a, b) = (s.base[j], s.x[0][j]);
            let take = importance(a, b, kl[(start + j) / row_len]) >= threshold;
            s.mixed[j] = a + (b - a) * if take { 1.0 } else { 0.0 };
        }
    })
}
