//! The TALL-mask methods (Wang et al., ICML 2024): with task vectors τ_t and τ_MTL = Σ τ_t, model t's mask
//! keeps the elements where |τ_t| > λ·|τ_MTL − τ_t| (strict). consensus keeps τ_MTL where at least k masks
//! agree and scales it by the method's lambda: θ = θ₀ + lambda·[#masks ≥ k]·τ_MTL; tall_masks rebuilds one
//! model as θ = θ₀ + m_task ⊙ τ_MTL.

use crate::error::Result;
use crate::merge::params::TallParams;
use crate::merge::passes::{emit, load_raw};
use crate::merge::{Job, Method, Options, Sink};

/// The mask decision is taken in f64 on
/// deltas formed from the stored values, so it matches an exact reference except at true ties.
pub(crate) fn merge(job: &Job, params: &TallParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let p = params;
    let lam = p.tall_mask_lambda;
    let scale = job.spec.lambda;
    let m = job.inputs.len();
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        load_raw(job, start, len, s);
        let mut tau = vec![0f64; m];
        for j in 0..len {
            let b = f64::from(s.base[j]);
            tau.iter_mut().zip(&s.x).for_each(|(t, x)| *t = f64::from(x[j]) - b);
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
