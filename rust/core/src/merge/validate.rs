//! Method-level checks that need no data, run before any pass: the method table's base policy and input
//! counts, per-input values, and the limits of the selection and factorization kernels. Every message names
//! the tensor.

use super::method::{BasePolicy, Method, Sparsify};
use super::params::Params;
use super::Job;
use crate::error::{CoreError, Result};

/// Check a job against its method's contract.
///
/// # Errors
/// A parameter error naming the tensor.
pub fn validate(job: &Job) -> Result<()> {
    let err = |m: String| Err(CoreError::param(format!("tensor '{}': {m}", job.name)));
    let spec = &job.spec;
    let method = spec.method;
    let name = method.name();
    if spec.params.family() != method.family() {
        return err(format!("{name} was given the parameters of the {} family", spec.params.family().name()));
    }
    if job.inputs.is_empty() {
        return err("no input models".into());
    }
    match (method.base_policy(), job.base.is_some()) {
        (BasePolicy::Joins, true) => return err(format!("{name} takes no base (a base model is one more input)")),
        (BasePolicy::Required, false) => return err(format!("method {name} requires a base model")),
        _ => {}
    }
    let (lo, hi) = method.input_counts();
    let m = job.inputs.len();
    if m < lo || hi.is_some_and(|hi| m > hi) {
        let want = match hi {
            Some(hi) if hi == lo => format!("exactly {lo}"),
            Some(hi) => format!("{lo} to {hi}"),
            None => format!("at least {lo}"),
        };
        let other = if method.base_policy() == BasePolicy::Joins { "" } else { " non-base" };
        return err(format!("{name} takes {want}{other} input(s), got {m}"));
    }
    if job.shape.iter().product::<usize>() != job.numel {
        return err(format!("shape {:?} does not hold {} elements", job.shape, job.numel));
    }
    if !spec.lambda.is_finite() {
        return err(format!("lambda must be finite, got {}", spec.lambda));
    }
    let sparsify = method.sparsify();
    for (i, inp) in job.inputs.iter().enumerate() {
        if !inp.weight.is_finite() {
            return err(format!("input {i}: weight must be finite, got {}", inp.weight));
        }
        if !(inp.density > 0.0 && inp.density <= 1.0) {
            return err(format!("input {i}: density must be in (0, 1], got {}", inp.density));
        }
        if sparsify == Sparsify::Outliers && !(0.0..=1.0).contains(&inp.gamma) {
            return err(format!("input {i}: gamma must be in [0, 1], got {}", inp.gamma));
        }
        if sparsify == Sparsify::Della && inp.density < 1.0 {
            let (d, e) = (inp.density, inp.epsilon);
            // mergekit: "Epsilon must be chosen such that density +/- epsilon is in (0, 1)".
            if !e.is_finite() || d + e >= 1.0 || d - e <= 0.0 {
                return err(format!(
                    "input {i}: epsilon must be chosen such that density ± epsilon is in (0, 1), got density {d}, epsilon {e}"
                ));
            }
        }
    }
    let per_row = matches!(spec.params, Params::TaskArithmetic(p) if p.per_row);
    let selects_whole = sparsify == Sparsify::Magnitude
        || (sparsify == Sparsify::Outliers && !per_row)
        || matches!(spec.params, Params::Sce(p) if p.select_topk < 1.0);
    if selects_whole && job.numel as u64 >= u64::from(u32::MAX) {
        return err(format!("{} elements: magnitude selection supports tensors of fewer than 2^32", job.numel));
    }
    let row_sorts = sparsify == Sparsify::Della || (sparsify == Sparsify::Outliers && per_row);
    if row_sorts && job.row_len() as u64 >= u64::from(u32::MAX) {
        return err(format!("rows of {} elements: row-wise ranking supports rows of fewer than 2^32", job.row_len()));
    }
    if let Params::Tall(p) = spec.params {
        if method == Method::TallMasks && p.task >= job.inputs.len() {
            return err(format!("tall_masks: task {} is out of range ({m} models)", p.task));
        }
    }
    if method.is_spectral() && job.shape.len() == 2 && job.shape[0].max(job.shape[1]) as u64 >= 1 << 31 {
        return err(format!("shape {:?}: a dimension of 2^31 or more is beyond the SVD kernels", job.shape));
    }
    let weight_sum = || job.inputs.iter().map(|i| i.weight).sum::<f64>();
    if method == Method::Linear && spec.normalize && weight_sum() == 0.0 {
        return err("linear with normalize: the weights sum to zero".into());
    }
    if matches!(spec.params, Params::Slerp(p) if method == Method::Multislerp && p.normalize_weights)
        && weight_sum() == 0.0
    {
        return err("multislerp with normalize_weights: the weights sum to zero".into());
    }
    let sizes = job.base.iter().chain(job.inputs.iter().map(|i| &i.src));
    for s in sizes {
        if s.byte_len() != job.numel * s.dtype.size() {
            return err(format!("{} bytes do not hold {} {} elements", s.byte_len(), job.numel, s.dtype.name()));
        }
    }
    Ok(())
}
