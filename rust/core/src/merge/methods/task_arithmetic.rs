//! linear and mergekit's generalized task arithmetic family: task_arithmetic, ties, dare_ties, dare_linear,
//! breadcrumbs, breadcrumbs_ties, della, della_linear.
//!
//! With base θ₀ and task vectors τ_i = θ_i − θ₀, each τ_i is sparsified to m_i ⊙ τ_i (the method table's
//! sparsifier: TIES keeps the ⌊density·n⌋ largest |τ|, DARE a Bernoulli(density) mask, breadcrumbs the outlier
//! band, DELLA a Bernoulli with rank-dependent probabilities; see `select/`), optionally rescaled (L1 norm
//! matching or division by the keep probability), and weighted: δ_i = w_i·s_i·(m_i ⊙ τ_i). Then
//! θ = θ₀ + λ·Σ δ_i (optionally divided by Σ w_i), or, with consensus (ties, dare_ties, breadcrumbs_ties, della),
//! θ = θ₀ + λ·Σ_{i: sign δ_i = sign Σ δ} δ_i / Σ_{i: agrees} w_i elementwise. linear has no base:
//! θ = Σ w_i θ_i (/ Σ w_i with normalize).

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::combine::{self, Scale, Scratch};
use crate::kernels::norms::{self, BLOCK};
use crate::kernels::select::TrimRule;
use crate::merge::params::TaskArithmeticParams;
use crate::merge::passes::{chunks, emit, load_deltas, row_chunk};
use crate::merge::select::sparsify::{della_probs, outlier_band, outlier_band_rows};
use crate::merge::select::topk::{select_rules, SelectionKeys};
use crate::merge::{Job, Method, Options, Rescale, Sink, Sparsify};
use crate::rng::Stream;

/// The task vectors (deltas from the base) of a job's inputs, as selection keys.
struct TaskVectorKeys<'a> {
    job: &'a Job<'a>,
}

impl SelectionKeys for TaskVectorKeys<'_> {
    fn numel(&self) -> usize {
        self.job.numel
    }
    fn count(&self) -> usize {
        self.job.inputs.len()
    }
    fn load(&self, start: usize, len: usize, s: &mut Scratch) {
        load_deltas(self.job, start, len, s);
    }
}

/// What decides each input's keep mask.
struct MaskRules {
    /// TIES: the trim; breadcrumbs: the top (n − n_bot) by |delta|.
    rules: Vec<TrimRule>,
    /// breadcrumbs: the top outliers removed from `rules`' set.
    tops: Vec<TrimRule>,
    streams: Vec<Stream>,
    row_len: usize,
    per_row: bool,
}

/// The keep mask of input `i` for chunk `[start, start+len)` (row-aligned for row-wise sparsifiers), from its
/// delta already in `s.x[i]`; DELLA also leaves each element's keep probability in `s.probs`.
fn mask_into(job: &Job, i: usize, masks: &MaskRules, start: usize, len: usize, s: &mut Scratch) {
    let inp = &job.inputs[i];
    let x = &s.x[i][..len];
    let keep = &mut s.keep[..len];
    match job.spec.method.sparsify() {
        Sparsify::Magnitude => masks.rules[i].mask(start, x, keep),
        Sparsify::Random => masks.streams[i].keep_mask(start, inp.density, keep),
        Sparsify::Outliers if masks.per_row => outlier_band_rows(x, masks.row_len, inp.density, inp.gamma, keep),
        Sparsify::Outliers => {
            let (outer, top) = (&masks.rules[i], &masks.tops[i]);
            for (j, (k, &v)) in keep.iter_mut().zip(x).enumerate() {
                *k = outer.keeps(start + j, v) && !top.keeps(start + j, v);
            }
        }
        Sparsify::Della => {
            della_probs(x, masks.row_len, inp.density, inp.epsilon, &mut s.probs[..len]);
            masks.streams[i].keep_mask_each(start, &s.probs[..len], keep);
        }
        Sparsify::None => keep.fill(true),
    }
}

pub(crate) fn merge(job: &Job, params: TaskArithmeticParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let spec = job.spec;
    let m = job.inputs.len();
    let n = job.numel as u64;
    let sparsify = spec.method.sparsify();
    let row_len = job.row_len();
    let per_row = sparsify == Sparsify::Della || (sparsify == Sparsify::Outliers && params.per_row);
    let chunk = if per_row { row_chunk(opts.chunk_elems.max(1), row_len) } else { opts.chunk_elems.max(1) };
    let keys = TaskVectorKeys { job };
    let (rules, tops) = match sparsify {
        Sparsify::Magnitude => {
            // mergekit 0.1.5: k = max(1, int(density·n)); density 1 keeps everything.
            let ks: Vec<Option<u64>> =
                job.inputs.iter().map(|i| (i.density < 1.0).then(|| ((i.density * n as f64) as u64).max(1))).collect();
            (select_rules(&keys, chunk, opts, &ks), Vec::new())
        }
        Sparsify::Outliers if !per_row => {
            let bands: Vec<Option<(u64, u64)>> =
                job.inputs.iter().map(|i| (i.density < 1.0).then(|| outlier_band(n, i.density, i.gamma))).collect();
            let outer: Vec<Option<u64>> = bands.iter().map(|b| b.map(|b| b.0)).collect();
            let top: Vec<Option<u64>> = bands.iter().map(|b| Some(b.map_or(0, |b| b.1))).collect();
            (select_rules(&keys, chunk, opts, &outer), select_rules(&keys, chunk, opts, &top))
        }
        _ => (vec![TrimRule::ALL; m], Vec::new()),
    };
    let streams: Vec<Stream> = job.inputs.iter().map(|i| Stream::new(spec.seed, job.name, i.model_id)).collect();
    let masks = MaskRules { rules, tops, streams, row_len, per_row };
    // Density 1 is the identity and is not rescaled (as in mergekit); any lower density is, even where the
    // selection happens to keep every element.
    let sparse: Vec<bool> = job.inputs.iter().map(|inp| sparsify != Sparsify::None && inp.density < 1.0).collect();
    let mut scales = vec![Scale::Mul(1.0); m];
    let mut per_element = false;
    match spec.rescale {
        Rescale::InverseDensity if sparsify == Sparsify::Della => per_element = true,
        Rescale::InverseDensity => {
            for i in 0..m {
                if sparse[i] {
                    // Divide, as the DARE paper and PEFT do (not multiply by a rounded reciprocal).
                    scales[i] = Scale::Div(job.inputs[i].density as f32);
                }
            }
        }
        Rescale::L1 if sparse.iter().any(|&s| s) => {
            // Fixed blocks (whole rows for row-wise masks), so the norms do not depend on the chunking.
            let block = if per_row { row_chunk(BLOCK, row_len) } else { BLOCK };
            let per_block: Vec<Vec<(f64, f64)>> = chunks(job.numel, block)
                .map_init(Scratch::default, |s, (start, len)| {
                    load_deltas(job, start, len, s);
                    (0..m)
                        .map(|i| {
                            if !sparse[i] {
                                return (0.0, 0.0);
                            }
                            mask_into(job, i, &masks, start, len, s);
                            norms::l1_pair(&s.x[i][..len], &s.keep[..len])
                        })
                        .collect()
                })
                .collect();
            for i in (0..m).filter(|&i| sparse[i]) {
                let (all, kept) = per_block.iter().fold((0f64, 0f64), |(a, k), b| (a + b[i].0, k + b[i].1));
                // mergekit skips the rescale when either norm is below 1e-7.
                if all >= 1e-7 && kept >= 1e-7 {
                    scales[i] = Scale::Mul((all / kept) as f32);
                }
            }
        }
        Rescale::None | Rescale::L1 => {}
    }
    let weights: Vec<f32> = job.inputs.iter().map(|i| i.weight as f32).collect();
    let weight_sum: f32 = weights.iter().sum();
    let lambda = spec.lambda as f32;
    emit(job, chunk, sink, |s, start, len| {
        load_deltas(job, start, len, s);
        for i in 0..m {
            if sparse[i] {
                mask_into(job, i, &masks, start, len, s);
                if per_element {
                    combine::weigh_each(&mut s.x[i][..len], &s.keep[..len], &s.probs[..len], weights[i]);
                } else {
                    combine::weigh(&mut s.x[i][..len], Some(&s.keep[..len]), scales[i], weights[i]);
                }
            } else {
                combine::weigh(&mut s.x[i][..len], None, scales[i], weights[i]);
            }
        }
        let xs = &s.x;
        if spec.method == Method::Linear {
            combine::sum(xs, &mut s.mixed[..len]);
            // Linear divides by the weight sum (validated non-zero) and has no base.
            if spec.normalize {
                s.divisor[..len].fill(weight_sum);
            }
            let divisor = spec.normalize.then_some(&s.divisor[..len]);
            combine::finish(&mut s.mixed[..len], divisor, 1.0, None);
        } else if spec.method.consensus() {
            // Election, disjoint mean and finish fused in one pass (same bytes as elect_and_mix + finish).
            let (mixed, total, divisor) = (&mut s.mixed[..len], &mut s.total[..len], &mut s.divisor[..len]);
            combine::elect_finish(xs, &weights, spec.normalize, lambda, &s.base[..len], mixed, total, divisor);
        } else {
            combine::sum(xs, &mut s.mixed[..len]);
            let d = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
            s.divisor[..len].fill(d);
            let divisor = spec.normalize.then_some(&s.divisor[..len]);
            combine::finish(&mut s.mixed[..len], divisor, lambda, Some(&s.base[..len]));
        }
    })
}
