//! SCE (select, calculate, erase; FuseLLM/FuseChat as mergekit 0.1.5): keep the select_topk fraction of
//! elements (among those with non-zero variance) with the largest variance across models, weight each model by
//! its mean squared kept delta w_i = mean(δ_i²)/Σ_j mean(δ_j²), elect signs and take the weighted disjoint mean:
//! θ = θ₀ + Σ_{i agrees} w_i·δ_i / Σ_{i agrees} w_i.

use multiversion::multiversion;

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::kernels::select::TrimRule;
use crate::merge::params::SceParams;
use crate::merge::passes::{block_sums, emit, load_deltas, STAT_BLOCK};
use crate::merge::select::topk::{select_rules, SelectionKeys};
use crate::merge::{Job, Options, Sink};

/// The population variance across models of each delta element, as SCE's selection key.
struct VarianceKeys<'a> {
    job: &'a Job<'a>,
}

/// Σx² and Σx in f64 are exact for a few f32 values of similar magnitude, so (Σx² − (Σx)²/m)/m does not depend
/// on the order of the models (equal variances of permuted deltas stay equal and tie by index); f64 keeps the
/// cancellation far below f32 resolution.
fn variance_into(s: &mut Scratch, m: usize, len: usize) {
    let Scratch { x, total, .. } = s;
    variance(&x[..m], &mut total[..len]);
}

/// The sums run model by model over blocks of elements (the same additions per element, in the same order, as
/// a loop over models per element), so they vectorise.
#[multiversion(targets = "simd")]
fn variance(x: &[Vec<f32>], out: &mut [f32]) {
    const B: usize = 256;
    let mf = x.len() as f64;
    for (b, o) in out.chunks_mut(B).enumerate() {
        let (mut s1, mut s2) = ([0f64; B], [0f64; B]);
        for xi in x {
            for ((a1, a2), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(&xi[b * B..b * B + o.len()]) {
                let v = f64::from(v);
                *a1 += v;
                *a2 += v * v;
            }
        }
        for ((o, &a1), &a2) in o.iter_mut().zip(&s1).zip(&s2) {
            *o = ((a2 - a1 * a1 / mf).max(0.0) / mf) as f32;
        }
    }
}

impl SelectionKeys for VarianceKeys<'_> {
    fn numel(&self) -> usize {
        self.job.numel
    }
    fn count(&self) -> usize {
        1
    }
    fn load(&self, start: usize, len: usize, s: &mut Scratch) {
        load_deltas(self.job, start, len, s);
        variance_into(s, self.job.inputs.len(), len);
        s.x[0][..len].copy_from_slice(&s.total[..len]);
    }
}

pub(crate) fn merge(job: &Job, params: SceParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let topk = params.select_topk;
    let chunk = opts.chunk_elems.max(1);
    let keys = VarianceKeys { job };
    let rule = if topk < 1.0 {
        let nonzero = block_sums(job.numel, STAT_BLOCK, 1, |s, start, len| {
            keys.load(start, len, s);
            vec![s.x[0][..len].iter().filter(|&&v| v != 0.0).count() as f64]
        })[0];
        // mergekit multiplies a count tensor by a Python float: a float32 product (180 × 0.65 → 116, not 117).
        let k = ((nonzero as f32) * (topk as f32)) as u64;
        select_rules(&keys, chunk, opts, &[Some(k)])[0]
    } else {
        TrimRule::ALL
    };
    let load_masked = |s: &mut Scratch, start: usize, len: usize| {
        load_deltas(job, start, len, s);
        if rule.keep_all {
            return;
        }
        variance_into(s, m, len);
        rule.mask(start, &s.total[..len], &mut s.keep[..len]);
        for x in &mut s.x {
            x[..len].iter_mut().zip(&s.keep[..len]).for_each(|(v, &k)| *v = if k { *v } else { 0.0 });
        }
    };
    let squares = block_sums(job.numel, STAT_BLOCK, m, |s, start, len| {
        load_masked(s, start, len);
        s.x.iter().map(|x| x[..len].iter().map(|&v| f64::from(v) * f64::from(v)).sum()).collect()
    });
    let means: Vec<f64> = squares.iter().map(|&q| q / job.numel.max(1) as f64).collect();
    let sum: f64 = means.iter().sum();
    let weights: Vec<f32> =
        means.iter().map(|&w| if sum.abs() < 1e-6 { 1.0 / m as f32 } else { (w / sum) as f32 }).collect();
    emit(job, chunk, sink, |s, start, len| {
        load_masked(s, start, len);
        let Scratch { x, base, mixed, .. } = s;
        disjoint_mean(&x[..m], &weights, &base[..len], &mut mixed[..len]);
    })
}

/// θ₀ + Σ_{i agrees} w_i·δ_i / max(Σ_{i agrees} w_i, 1e-6), the sign elected by Σ δ_i: model by model over blocks
/// of elements, each element's sums taken in model order as an element-by-element loop would (same bits).
#[multiversion(targets = "simd")]
fn disjoint_mean(x: &[Vec<f32>], weights: &[f32], base: &[f32], out: &mut [f32]) {
    const B: usize = 256;
    for (b, o) in out.chunks_mut(B).enumerate() {
        let r = b * B..b * B + o.len();
        let mut total = [0f32; B];
        for xi in x {
            total.iter_mut().zip(&xi[r.clone()]).for_each(|(t, &v)| *t += v);
        }
        let (mut merged, mut divisor) = ([0f32; B], [0f32; B]);
        for (xi, &weight) in x.iter().zip(weights) {
            for (((mg, dv), &t), &v) in merged.iter_mut().zip(divisor.iter_mut()).zip(&total).zip(&xi[r.clone()]) {
                let agrees = if t >= 0.0 { v > 0.0 } else { v < 0.0 };
                let w = if agrees { weight } else { 0.0 };
                *mg += v * w;
                *dv += w;
            }
        }
        for (((o, &bv), &mg), &dv) in o.iter_mut().zip(&base[r]).zip(&merged).zip(&divisor) {
            *o = bv + mg / dv.max(1e-6);
        }
    }
}
