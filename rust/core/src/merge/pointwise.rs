//! Methods decided element by element, after at most a few whole-tensor scalars: nearswap, ram, ramplus_tl
//! (per-model counts of unique and shared contributions), sce (variance selection, per-model weights), and the
//! TALL-mask methods consensus and tall_masks.

use super::gta::select_rules;
use super::trim::Keys;
use super::{block_sums, emit, load_deltas, load_raw, release_chunk, Job, Method, Options, Sink, STAT_BLOCK};
use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::kernels::select::TrimRule;

pub(super) fn merge(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    match job.spec.method {
        Method::Nearswap => nearswap(job, opts, sink),
        Method::Ram | Method::RamplusTl => ram(job, opts, sink),
        Method::Sce => sce(job, opts, sink),
        Method::Consensus | Method::TallMasks => tall(job, opts, sink),
        m => unreachable!("{m:?} is not a pointwise method"),
    }
}

/// Interpolate towards the other model where the two are close: w = clamp(t / max(|a − b|, 1e-6), 0, 1),
/// out = w·b + (1 − w)·a, with a the base.
fn nearswap(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let t = job.spec.params.t as f32;
    emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
        load_raw(job, start, len, s);
        for ((o, &a), &b) in s.mixed[..len].iter_mut().zip(&s.base[..len]).zip(&s.x[0][..len]) {
            let w = (t / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
            *o = w * b + (1.0 - w) * a;
        }
    })
}

/// TALL masks (Wang et al., ICML 2024): with τ_MTL = Σ τ_t, model t's mask keeps the elements where
/// |τ_t| > λ·|τ_MTL − τ_t| (strict). consensus keeps τ_MTL where at least k masks agree and scales it by the
/// method's lambda; tall_masks rebuilds one model as base + m_task ⊙ τ_MTL. The mask decision is taken in f64 on
/// deltas formed from the stored values, so it matches an exact reference except at true ties.
fn tall(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let p = job.spec.params;
    let lam = p.tall_mask_lambda;
    let scale = job.spec.lambda;
    let m = job.inputs.len();
    emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
        load_raw(job, start, len, s);
        let mut tau = vec![0f64; m];
        for j in 0..len {
            let b = s.base[j] as f64;
            tau.iter_mut().zip(&s.x).for_each(|(t, x)| *t = x[j] as f64 - b);
            let mtl: f64 = tau.iter().sum();
            let masked = |t: f64| t.abs() > lam * (mtl - t).abs();
            let keep = match job.spec.method {
                Method::TallMasks => masked(tau[p.task]),
                _ => tau.iter().filter(|&&t| masked(t)).count() >= p.k,
            };
            let factor = if job.spec.method == Method::TallMasks { 1.0 } else { scale };
            // A NaN or infinite input stays visible in the output rather than silently becoming the base.
            let kept = keep || !mtl.is_finite();
            s.mixed[j] = if kept { (b + factor * mtl) as f32 } else { s.base[j] };
        }
    })
}

/// RAM: a delta element counts when |δ| > epsilon; where one model contributes it is taken whole, where several
/// do they are averaged. ramplus_tl scales each model's unique part by λ_i = 1 + r·clamp(shared_i/unique_i, 0, α),
/// from that model's counts over the whole tensor.
fn ram(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let p = job.spec.params;
    let eps = p.epsilon as f32;
    let active = |s: &Scratch, i: usize, j: usize| s.x[i][j].abs() > eps;
    let contributors = |s: &Scratch, j: usize| (0..m).filter(|&i| active(s, i, j)).count();
    let lambdas: Vec<f32> = if job.spec.method == Method::RamplusTl {
        // Per model: elements it shares with another model, and elements only it changes (exact counts).
        let counts = block_sums(job.numel, STAT_BLOCK, 2 * m, |s, start, len| {
            load_deltas(job, start, len, s);
            release_chunk(job, opts, start, len);
            let mut c = vec![0f64; 2 * m];
            for j in 0..len {
                let k = contributors(s, j);
                for i in (0..m).filter(|&i| active(s, i, j)) {
                    c[2 * i + usize::from(k > 1)] += 1.0;
                }
            }
            c
        });
        (0..m)
            .map(|i| {
                let (unique, shared) = (counts[2 * i], counts[2 * i + 1]);
                let rho = shared / unique.max(p.epsilon);
                (1.0 + p.r * rho.clamp(0.0, p.alpha)) as f32
            })
            .collect()
    } else {
        vec![1.0; m]
    };
    emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
        load_deltas(job, start, len, s);
        for j in 0..len {
            let k = contributors(s, j);
            let (unique, shared) = (if k == 1 { 1f32 } else { 0.0 }, if k > 1 { 1f32 } else { 0.0 });
            let count = k.max(1) as f32;
            let mut merged = 0f32;
            for i in 0..m {
                let tv = if active(s, i, j) { s.x[i][j] } else { 0.0 };
                merged += tv * unique * lambdas[i] + tv * shared / count;
            }
            s.mixed[j] = s.base[j] + merged;
        }
    })
}

/// The population variance across models of each delta element, as SCE's selection key.
struct Variance<'a> {
    job: &'a Job<'a>,
    opts: &'a Options,
}

/// Σx² and Σx in f64 are exact for a few f32 values of similar magnitude, so (Σx² − (Σx)²/m)/m does not depend
/// on the order of the models (equal variances of permuted deltas stay equal and tie by index); f64 keeps the
/// cancellation far below f32 resolution.
fn variance_into(s: &mut Scratch, m: usize, len: usize) {
    let mf = m as f64;
    for j in 0..len {
        let (mut s1, mut s2) = (0f64, 0f64);
        for x in &s.x[..m] {
            let v = x[j] as f64;
            s1 += v;
            s2 += v * v;
        }
        s.total[j] = ((s2 - s1 * s1 / mf).max(0.0) / mf) as f32;
    }
}

impl Keys for Variance<'_> {
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
    fn release(&self, start: usize, len: usize) {
        release_chunk(self.job, self.opts, start, len)
    }
}

/// SCE: keep the select_topk fraction of elements (among those with non-zero variance) with the largest
/// variance across models, weight each model by its mean squared (kept) delta, elect signs and take the
/// weighted disjoint mean.
fn sce(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let topk = job.spec.params.select_topk;
    let chunk = opts.chunk_elems.max(1);
    let keys = Variance { job, opts };
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
        release_chunk(job, opts, start, len);
        s.x.iter().map(|x| x[..len].iter().map(|&v| (v as f64) * (v as f64)).sum()).collect()
    });
    let means: Vec<f64> = squares.iter().map(|&q| q / job.numel.max(1) as f64).collect();
    let sum: f64 = means.iter().sum();
    let weights: Vec<f32> =
        means.iter().map(|&w| if sum.abs() < 1e-6 { 1.0 / m as f32 } else { (w / sum) as f32 }).collect();
    emit(job, opts, chunk, sink, |s, start, len| {
        load_masked(s, start, len);
        for j in 0..len {
            let total: f32 = (0..m).map(|i| s.x[i][j]).sum();
            let positive = total >= 0.0;
            let (mut merged, mut divisor) = (0f32, 0f32);
            for i in 0..m {
                let v = s.x[i][j];
                let agrees = if positive { v > 0.0 } else { v < 0.0 };
                let w = if agrees { weights[i] } else { 0.0 };
                merged += v * w;
                divisor += w;
            }
            s.mixed[j] = s.base[j] + merged / divisor.max(1e-6);
        }
    })
}
