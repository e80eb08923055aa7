//! nearswap (mergekit 0.1.5): interpolate towards the other model where the two are close:
//! w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1), θ = w·θ₁ + (1 − w)·θ₀, with θ₀ the base.

use crate::error::Result;
use crate::merge::params::NearswapParams;
use crate::merge::passes::{emit, load_raw};
use crate::merge::{Job, Options, Sink};

/// The kernel (a: the base, b: the other model).
pub(crate) fn merge(job: &Job, params: NearswapParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let t = params.t as f32;
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        load_raw(job, start, len, s);
        for ((o, &a), &b) in s.mixed[..len].iter_mut().zip(&s.base[..len]).zip(&s.x[0][..len]) {
            let w = (t / (a - b).abs().max(1e-6)).clamp(0.0, 1.0);
            *o = w * b + (1.0 - w) * a;
        }
    })
}
