//! arcee_fusion (mergekit 0.1.5): importance = |θ₁ − θ₀| · KL(softmax(θ₁ row) ‖ softmax(θ₀ row)); elements
//! whose importance reaches median + 1.5·IQR take θ₁, the rest keep θ₀. A row is the last dimension; the KL
//! pass reads row-aligned chunks. Quantiles are exact up to 1e6 elements and from a seeded sample of 1e6 (with
//! replacement) beyond, where mergekit's sample is unseeded.

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::merge::passes::{chunks, emit, load, load_raw, row_chunk};
use crate::merge::{Job, Options, Sink};
use crate::rng::Stream;

/// KL(softmax(b) ‖ softmax(a)) of one row, with mergekit's +1e-8 on both distributions; probabilities in f32,
/// the sums in f64.
fn row_kl(a: &[f32], b: &[f32]) -> f32 {
    let softmax_parts = |v: &[f32]| {
        let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = v.iter().map(|&x| f64::from(x - mx).exp()).sum();
        (mx, sum)
    };
    let (ma, sa) = softmax_parts(a);
    let (mb, sb) = softmax_parts(b);
    let mut kl = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let q = ((f64::from(x - ma).exp() / sa) as f32) + 1e-8;
        let p = ((f64::from(y - mb).exp() / sb) as f32) + 1e-8;
        kl += f64::from(p * (p / q).ln());
    }
    kl as f32
}

/// Quantile sample size, as mergekit's `_QUANTILE_SAMPLE_SIZE`.
const QUANTILE_SAMPLE: usize = 1_000_000;

/// The kernel (a: the base, b: the other model).
pub(crate) fn merge(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let row_len = job.row_len();
    let n = job.numel;
    let block = row_chunk(opts.chunk_elems.max(1), row_len);
    let kl: Vec<f32> = chunks(n, block)
        .map_init(Scratch::default, |s, (start, len)| {
            load_raw(job, start, len, s);
            s.base[..len].chunks(row_len).zip(s.x[0][..len].chunks(row_len)).map(|(a, b)| row_kl(a, b)).collect()
        })
        .collect::<Vec<Vec<f32>>>()
        .concat();
    let importance = |a: f32, b: f32, row_kl: f32| (b - a).abs() * row_kl;
    let mut sample: Vec<f32> = if n <= QUANTILE_SAMPLE {
        chunks(n, block)
            .map_init(Scratch::default, |s, (start, len)| {
                load_raw(job, start, len, s);
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
                load(job, base, i as usize, &mut a);
                load(job, other, i as usize, &mut b);
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
    emit(job, opts.chunk_elems.max(1), sink, |s, start, len| {
        load_raw(job, start, len, s);
        for j in 0..len {
            let (a, b) = (s.base[j], s.x[0][j]);
            let take = importance(a, b, kl[(start + j) / row_len]) >= threshold;
            s.mixed[j] = a + (b - a) * if take { 1.0 } else { 0.0 };
        }
    })
}
