//! arcee_fusion (mergekit 0.1.5): importance = |θ₁ − θ₀| · KL(softmax(θ₁ row) ‖ softmax(θ₀ row)); elements
//! whose importance reaches median + 1.5·IQR take θ₁, the rest keep θ₀. A row is the last dimension; the KL
//! pass reads row-aligned chunks. Quantiles are exact up to 1e6 elements and from a seeded sample of 1e6 (with
//! replacement) beyond, where mergekit's sample is unseeded.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::math;
use crate::merge::passes::{chunks, emit, load_raw, row_chunk};
use crate::merge::{Job, Options, Sink};
use crate::rng::Stream;

/// KL(softmax(b) ‖ softmax(a)) of one row, with mergekit's +1e-8 on both distributions; probabilities in f32,
/// the sums in f64.
fn row_kl(a: &[f32], b: &[f32]) -> f32 {
    EXPS.with_borrow_mut(|(ea, eb)| {
        // exp(x − max) of each element once, kept for the second loop (it was computed twice).
        let softmax_parts = |v: &[f32], e: &mut Vec<f64>| {
            let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            e.clear();
            e.extend(v.iter().map(|&x| math::exp(f64::from(x - mx))));
            e.iter().sum::<f64>()
        };
        let sa = softmax_parts(a, ea);
        let sb = softmax_parts(b, eb);
        let mut kl = 0f64;
        for (&x, &y) in ea.iter().zip(eb.iter()) {
            let q = ((x / sa) as f32) + 1e-8;
            let p = ((y / sb) as f32) + 1e-8;
            kl += f64::from(p * math::lnf(p / q));
        }
        kl as f32
    })
}

thread_local! {
    /// Each worker's exp(x − max) of the two rows of `row_kl`.
    static EXPS: RefCell<(Vec<f64>, Vec<f64>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Quantile sample size, as mergekit's `_QUANTILE_SAMPLE_SIZE`.
const QUANTILE_SAMPLE: usize = 1_000_000;

/// The draws `idx` grouped by chunk of `block` elements: (offsets, positions) where chunk `c`'s draws are
/// `positions[offsets[c]..offsets[c + 1]]`, as offsets within the chunk, in draw order (a counting sort).
fn bucket_by_chunk(idx: &[u64], block: usize, n_chunks: usize) -> (Vec<usize>, Vec<u64>) {
    let mut offsets = vec![0usize; n_chunks + 1];
    for &i in idx {
        offsets[i as usize / block + 1] += 1;
    }
    for c in 0..n_chunks {
        offsets[c + 1] += offsets[c];
    }
    let mut fill = offsets.clone();
    let mut pos = vec![0u64; idx.len()];
    for &i in idx {
        let (c, j) = (i as usize / block, i as usize % block);
        pos[fill[c]] = j as u64;
        fill[c] += 1;
    }
    (offsets, pos)
}

/// The kernel (a: the base, b: the other model).
pub(crate) fn merge(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let row_len = job.row_len();
    let n = job.numel;
    let block = row_chunk(opts.chunk_elems.max(1), row_len);
    let importance = |a: f32, b: f32, row_kl: f32| (b - a).abs() * row_kl;
    // One pass computes each row's KL and, from the same decoded chunk, the importances the quantiles need:
    // every element's up to 1e6 elements, else those of the seeded sample's draws that fall in the chunk
    // (bucketed by chunk beforehand: a counting sort of the draws, where a sort of 1e6 indices and a decode per
    // draw cost more than the KL itself). The sample's order does not matter to its order statistics.
    let sampled = n > QUANTILE_SAMPLE;
    let (offsets, draws) = if sampled {
        let idx = Stream::new(job.spec.seed, job.name, 0).sample_indices(n as u64, QUANTILE_SAMPLE);
        bucket_by_chunk(&idx, block, n.div_ceil(block))
    } else {
        (Vec::new(), Vec::new())
    };
    let parts: Vec<(Vec<f32>, Vec<f32>)> = chunks(n, block)
        .map_init(Scratch::pooled, |s, (start, len)| {
            load_raw(job, start, len, s);
            let (a, b) = (&s.base[..len], &s.x[0][..len]);
            // Chunks hold whole rows.
            let kl: Vec<f32> = a.chunks(row_len).zip(b.chunks(row_len)).map(|(a, b)| row_kl(a, b)).collect();
            let imp = if sampled {
                let c = start / block;
                draws[offsets[c]..offsets[c + 1]]
                    .iter()
                    .map(|&j| {
                        let j = j as usize;
                        importance(a[j], b[j], kl[j / row_len])
                    })
                    .collect()
            } else {
                let rows = a.chunks(row_len).zip(b.chunks(row_len)).zip(&kl);
                rows.flat_map(|((a, b), &k)| a.iter().zip(b).map(move |(&a, &b)| importance(a, b, k))).collect()
            };
            (kl, imp)
        })
        .collect();
    let mut kl = Vec::with_capacity(n / row_len.max(1));
    let mut sample = Vec::with_capacity(n.min(QUANTILE_SAMPLE));
    for (k, imp) in parts {
        kl.extend_from_slice(&k);
        sample.extend_from_slice(&imp);
    }
    let threshold = if sample.is_empty() {
        f32::INFINITY
    } else {
        // The order statistics a sort would put at those positions, by three selections (no sort): the median
        // first, then the quartiles within the halves on either side of it.
        let at = |q: f64| (q * (sample.len() - 1) as f64) as usize;
        let (i1, i2, i3) = (at(0.25), at(0.5), at(0.75));
        let (below, &mut median, above) = sample.select_nth_unstable_by(i2, f32::total_cmp);
        let q1 = if i1 < i2 { *below.select_nth_unstable_by(i1, f32::total_cmp).1 } else { median };
        let q3 = if i3 > i2 { *above.select_nth_unstable_by(i3 - i2 - 1, f32::total_cmp).1 } else { median };
        median + 1.5 * (q3 - q1)
    };
    emit(job, opts.chunk_elems.max(1), sink, |s, start, len| {
        load_raw(job, start, len, s);
        // Row by row: the chunk need not start on a row, so the first row may be partial.
        let mut j = 0;
        while j < len {
            let row = (start + j) / row_len;
            let end = ((row + 1) * row_len - start).min(len);
            let k = kl[row];
            for ((o, &a), &b) in s.mixed[j..end].iter_mut().zip(&s.base[j..end]).zip(&s.x[0][j..end]) {
                let take = importance(a, b, k) >= threshold;
                *o = a + (b - a) * if take { 1.0 } else { 0.0 };
            }
            j = end;
        }
    })
}
