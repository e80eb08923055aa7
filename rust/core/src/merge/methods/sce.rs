//! SCE (select, calculate, erase; FuseLLM/FuseChat as mergekit 0.1.5): keep the select_topk fraction of
//! elements (among those with non-zero variance) with the largest variance across models, weight each model by
//! its mean squared kept delta w_i = mean(δ_i²)/Σ_j mean(δ_j²), elect signs and take the weighted disjoint mean:
//! θ = θ₀ + Σ_{i agrees} w_i·δ_i / Σ_{i agrees} w_i.

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
    let mf = m as f64;
    for j in 0..len {
        let (mut s1, mut s2) = (0f64, 0f64);
        for x in &s.x[..m] {
            let v = f64::from(x[j]);
            s1 += v;
            s2 += v * v;
        }
        s.total[j] = ((s2 - s1 * s1 / mf).max(0.0) / mf) as f32;
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
        for j in 0..len {
            if !rule.keeps(start + j, s.total[j]) {
                s.x.iter_mut().for_each(|x| x[j] = 0.0);
            }
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
        for j in 0..len {
            let total: f32 = (0..m).map(|i| s.x[i][j]).sum();
            let positive = total >= 0.0;
            let (mut merged, mut divisor) = (0f32, 0f32);
            for (x, &weight) in s.x.iter().zip(&weights) {
                let v = x[j];
                let agrees = if positive { v > 0.0 } else { v < 0.0 };
                let w = if agrees { weight } else { 0.0 };
                merged += v * w;
                divisor += w;
            }
            s.mixed[j] = s.base[j] + merged / divisor.max(1e-6);
        }
    })
}
