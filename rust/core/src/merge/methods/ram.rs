//! RAM and RAM+ (ramplus_tl): a delta element counts when |δ| > epsilon; where one model contributes it is taken
//! whole, where several do they are averaged: θ = θ₀ + Σ_i [k = 1]·λ_i·δ_i + [k > 1]·δ_i/k over the k active
//! models. ram has λ_i = 1; ramplus_tl scales each model's unique part by λ_i = 1 + r·clamp(shared_i/unique_i,
//! 0, α), from that model's counts over the whole tensor.

use multiversion::multiversion;

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::merge::params::RamParams;
use crate::merge::passes::{block_sums, emit, load_deltas, STAT_BLOCK};
use crate::merge::{Job, Method, Options, Sink};

pub(crate) fn merge(job: &Job, params: &RamParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let p = params;
    let eps = p.epsilon as f32;
    let lambdas: Vec<f32> = if job.spec.method == Method::RamplusTl {
        // Per model: elements it shares with another model, and elements only it changes (exact counts).
        let counts = block_sums(job.numel, STAT_BLOCK, 2 * m, |s, start, len| {
            load_deltas(job, start, len, s);
            active_counts(&s.x[..m], eps, len)
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
        let Scratch { x, base, mixed, .. } = s;
        combine_active(&x[..m], &lambdas, eps, &base[..len], &mut mixed[..len]);
    })
}

/// θ₀ + Σ_i [k = 1]·λ_i·δ_i + [k > 1]·δ_i/k over the k models with |δ| > eps: model by model over blocks of
/// elements, each element's sum taken in model order as an element-by-element loop would (same bits).
#[multiversion(targets = "simd")]
fn combine_active(x: &[Vec<f32>], lambdas: &[f32], eps: f32, base: &[f32], out: &mut [f32]) {
    const B: usize = 256;
    for (b, o) in out.chunks_mut(B).enumerate() {
        let r = b * B..b * B + o.len();
        let mut k = [0u32; B];
        for xi in x {
            k.iter_mut().zip(&xi[r.clone()]).for_each(|(k, &v)| *k += u32::from(v.abs() > eps));
        }
        let mut merged = [0f32; B];
        for (xi, &lambda) in x.iter().zip(lambdas) {
            for ((mg, &k), &v) in merged.iter_mut().zip(&k).zip(&xi[r.clone()]) {
                let (unique, shared) = (if k == 1 { 1f32 } else { 0.0 }, if k > 1 { 1f32 } else { 0.0 });
                let count = k.max(1) as f32;
                // Masks multiply (mergekit's `tv * mask`): an inactive NaN stays NaN; a finite one adds ±0.
                let tv = v * f32::from(u8::from(v.abs() > eps));
                *mg += tv * unique * lambda + tv * shared / count;
            }
        }
        for ((o, &bv), &mg) in o.iter_mut().zip(&base[r]).zip(&merged) {
            *o = bv + mg;
        }
    }
}

/// Per model, the elements it shares with another model and those only it changes (|δ| > eps), as f64 counts.
fn active_counts(x: &[Vec<f32>], eps: f32, len: usize) -> Vec<f64> {
    let m = x.len();
    let mut k = vec![0u32; len];
    for xi in x {
        k.iter_mut().zip(&xi[..len]).for_each(|(k, &v)| *k += u32::from(v.abs() > eps));
    }
    let mut c = vec![0f64; 2 * m];
    for (i, xi) in x.iter().enumerate() {
        let (mut unique, mut shared) = (0u64, 0u64);
        for (&k, &v) in k.iter().zip(&xi[..len]) {
            let a = u64::from(v.abs() > eps);
            unique += a & u64::from(k == 1);
            shared += a & u64::from(k > 1);
        }
        c[2 * i] = unique as f64;
        c[2 * i + 1] = shared as f64;
    }
    c
}
