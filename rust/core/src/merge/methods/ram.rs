//! RAM and RAM+ (ramplus_tl): a delta element counts when |δ| > epsilon; where one model contributes it is taken
//! whole, where several do they are averaged: θ = θ₀ + Σ_i [k = 1]·λ_i·δ_i + [k > 1]·δ_i/k over the k active
//! models. ram has λ_i = 1; ramplus_tl scales each model's unique part by λ_i = 1 + r·clamp(shared_i/unique_i,
//! 0, α), from that model's counts over the whole tensor.

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::merge::params::RamParams;
use crate::merge::passes::{block_sums, emit, load_deltas, STAT_BLOCK};
use crate::merge::{Job, Method, Options, Sink};

pub(crate) fn merge(job: &Job, params: &RamParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let p = params;
    let eps = p.epsilon as f32;
    let active = |s: &Scratch, i: usize, j: usize| s.x[i][j].abs() > eps;
    let contributors = |s: &Scratch, j: usize| (0..m).filter(|&i| active(s, i, j)).count();
    let lambdas: Vec<f32> = if job.spec.method == Method::RamplusTl {
        // Per model: elements it shares with another model, and elements only it changes (exact counts).
        let counts = block_sums(job.numel, STAT_BLOCK, 2 * m, |s, start, len| {
            load_deltas(job, start, len, s);
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
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        load_deltas(job, start, len, s);
        for j in 0..len {
            let k = contributors(s, j);
            let (unique, shared) = (if k == 1 { 1f32 } else { 0.0 }, if k > 1 { 1f32 } else { 0.0 });
            let count = k.max(1) as f32;
            let mut merged = 0f32;
            for (i, &lambda) in lambdas.iter().enumerate() {
                // Masks multiply (mergekit's `tv * mask`): an inactive NaN stays NaN; a finite one adds ±0.
                let tv = s.x[i][j] * f32::from(u8::from(active(s, i, j)));
                merged += tv * unique * lambda + tv * shared / count;
            }
            s.mixed[j] = s.base[j] + merged;
        }
    })
}
