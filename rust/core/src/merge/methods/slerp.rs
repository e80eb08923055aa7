//! The spherical interpolations: slerp, nuslerp, multislerp and karcher, each a linear combination Σ c_i v_i of
//! its vectors with coefficients from their Gram matrix G (`merge/gram.rs`).
//!
//! - slerp (mergekit 0.1.5): v = (θ₀, θ₁), cos Ω = G₀₁/(‖v₀‖‖v₁‖), c = (sin((1−t)Ω), sin(tΩ))/sin Ω (lerp when
//!   |cos Ω| > 0.9995).
//! - nuslerp: the same on the task vectors (or the tensors without a base) with t = w₁/(w₀ + w₁), per row, per
//!   column or whole; the base is added back.
//! - multislerp: barycentric interpolation on the sphere through the tangent space at the weighted mean of the
//!   unit vectors, rescaled by the weighted mean norm.
//! - karcher: the Riemannian (Karcher) mean of the unit inputs, by gradient steps on the sphere, times the mean
//!   norm.
//!
//! mergekit evaluates the same formulas elementwise in f32, so results agree to float rounding, not bit for bit.

use crate::error::{CoreError, Result};
use crate::math;
use crate::merge::gram::{apply, gram, GramMatrix, Groups, Vectors};
use crate::merge::params::SlerpParams;
use crate::merge::passes::{emit, load};
use crate::merge::{Job, Method, Options, Sink};

/// sin((1−t)θ)/sin θ and sin(tθ)/sin θ, or the linear (1 − t, t) where `linear` says so.
fn slerp_pair(t: f64, cos: f64, linear: bool) -> [f64; 2] {
    if linear {
        return [1.0 - t, t];
    }
    let theta = math::acos(cos);
    let s = math::sin(theta);
    [math::sin((1.0 - t) * theta) / s, math::sin(t * theta) / s]
}

/// mergekit 0.1.5 slerp: vectors (base, other) normalised (norms ≤ 1e-8 count as 1), lerp when |cos| > 0.9995.
fn slerp(t: f64, g: &GramMatrix) -> Vec<f64> {
    let na = Some(g.norm(0)).filter(|&n| n > 1e-8).unwrap_or(1.0);
    let nb = Some(g.norm(1)).filter(|&n| n > 1e-8).unwrap_or(1.0);
    let cos = (g.at(0, 1) / (na * nb)).clamp(-1.0, 1.0);
    slerp_pair(t, cos, cos.abs() > 0.9995).to_vec()
}

/// nuslerp: norms clamped at 1e-7; collinear (1 − cos² ≤ 1e-16) falls back to lerp.
fn nuslerp(t: f64, g: &GramMatrix) -> Vec<f64> {
    let n0 = g.norm(0).max(1e-7);
    let n1 = g.norm(1).max(1e-7);
    let cos = (g.at(0, 1) / (n0 * n1)).clamp(-1.0, 1.0);
    slerp_pair(t, cos, 1.0 - cos * cos <= 1e-16).to_vec()
}

/// multislerp: barycentric interpolation on the sphere through the tangent space at the weighted mean of the
/// unit vectors, rescaled by the weighted mean norm.
fn multislerp(w: &[f64], eps: f64, g: &GramMatrix) -> std::result::Result<Vec<f64>, String> {
    let q = g.q;
    let n: Vec<f64> = (0..q).map(|i| g.norm(i)).collect();
    // u_i = v_i / (‖v_i‖ + eps): a unit vector's coefficient on v_i.
    let u: Vec<f64> = n.iter().map(|&n| 1.0 / (n + eps)).collect();
    let mean: Vec<f64> = (0..q).map(|i| w[i] * u[i]).collect();
    let mean_norm = g.norm_of(&mean);
    if mean_norm < eps {
        if q == 2 {
            return Ok(w.to_vec());
        }
        return Err("the weighted sum of the unit inputs is zero (antipodal inputs whose weights cancel); \
                    use different weights"
            .into());
    }
    let mhat: Vec<f64> = mean.iter().map(|c| c / mean_norm).collect();
    // Tangent part of each u_i at m̂, summed with the weights: Σ w_i (u_i − (u_i·m̂) m̂).
    let mut tangent = vec![0.0; q];
    for i in 0..q {
        let dot = u[i] * g.dot_with(&mhat, i);
        tangent[i] += w[i] * u[i];
        for k in 0..q {
            tangent[k] -= w[i] * dot * mhat[k];
        }
    }
    let tn = g.norm_of(&tangent) + eps;
    let avg_norm: f64 = (0..q).map(|i| n[i] * w[i]).sum();
    Ok((0..q).map(|k| (mhat[k] * math::cos(tn) + tangent[k] * (math::sin(tn) / tn)) * avg_norm).collect())
}

/// karcher: the Riemannian mean of the unit inputs (equal weights), iterated by gradient steps on the sphere,
/// times the mean norm; inputs with norm ≤ tol are left out of the direction.
fn karcher(max_iter: u32, tol: f64, g: &GramMatrix) -> Vec<f64> {
    let q = g.q;
    let n: Vec<f64> = (0..q).map(|i| g.norm(i)).collect();
    let valid: Vec<usize> = (0..q).filter(|&i| n[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; q];
    }
    let alpha = 1.0 / valid.len() as f64;
    let mut mean = vec![0.0; q];
    for &i in &valid {
        mean[i] = alpha / n[i];
    }
    let mn = g.norm_of(&mean);
    if mn < tol {
        mean = vec![0.0; q];
        mean[valid[0]] = 1.0 / n[valid[0]];
    } else {
        for c in &mut mean {
            *c /= mn;
        }
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; q];
        for &i in &valid {
            let dot = (g.dot_with(&mean, i) / n[i]).clamp(-1.0, 1.0);
            let theta = math::acos(dot);
            // Nearly antipodal (sin θ < 1e-4): the direction u_i − cos θ·u is numerically undefined, and θ/sin θ
            // would blow the Gram-space rounding up to the size of the step; mergekit's elementwise f32 gets an
            // exact zero for exactly antipodal inputs, which skipping reproduces.
            if theta < tol || 1.0 - dot * dot < 1e-8 {
                continue;
            }
            let f = alpha * theta / math::sin(theta);
            tangent[i] += f / n[i];
            for k in 0..q {
                tangent[k] -= f * dot * mean[k];
            }
        }
        let tn = g.norm_of(&tangent);
        if tn < tol {
            break;
        }
        for k in 0..q {
            mean[k] = math::cos(tn) * mean[k] + math::sin(tn) * tangent[k] / tn;
        }
        let un = g.norm_of(&mean);
        if un > tol {
            for c in &mut mean {
                *c /= un;
            }
        }
    }
    let scale: f64 = n.iter().map(|&n| n / q as f64).sum();
    mean.iter().map(|c| c * scale).collect()
}

/// Which elements form one vector: nuslerp's `flatten` and `row_wise`; one whole vector otherwise.
fn groups(job: &Job, params: &SlerpParams) -> Groups {
    if job.spec.method != Method::Nuslerp || params.flatten {
        Groups::Whole
    } else if params.row_wise && job.shape.len() >= 2 {
        Groups::Cols(job.numel / job.shape[0].max(1))
    } else {
        Groups::Rows(job.row_len())
    }
}

pub(crate) fn merge(job: &Job, params: &SlerpParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let method = job.spec.method;
    if method == Method::Multislerp && job.inputs.len() == 1 {
        // mergekit returns the one model's tensor as it is, base or not.
        return emit(job, opts.chunk_elems, sink, |s, start, len| {
            s.resize(1, len);
            load(job, &job.inputs[0].src, start, &mut s.mixed[..len]);
        });
    }
    let vectors = match method {
        Method::Slerp => Vectors::BaseAndInputs,
        Method::Karcher => Vectors::Inputs,
        _ => Vectors::Deltas,
    };
    let groups = groups(job, params);
    let q = vectors.count(job);
    let stats = gram(job, groups, vectors);
    let weights: Vec<f64> = job.inputs.iter().map(|i| i.weight).collect();
    let t_nuslerp = {
        let total: f64 = weights.iter().sum();
        if total.abs() < 1e-6 {
            0.5
        } else {
            weights.get(1).copied().unwrap_or(0.0) / total
        }
    };
    let w_multi: Vec<f64> = if params.normalize_weights {
        let total: f64 = weights.iter().sum();
        weights.iter().map(|w| w / total).collect()
    } else {
        weights.clone()
    };
    let mut coefs = Vec::with_capacity(groups.count(job.numel) * q);
    for g in GramMatrix::each(&stats, q) {
        let c = match method {
            Method::Slerp => slerp(params.t, &g),
            Method::Nuslerp => nuslerp(t_nuslerp, &g),
            Method::Multislerp => multislerp(&w_multi, params.eps, &g)
                .map_err(|e| CoreError::param(format!("tensor '{}': multislerp: {e}", job.name)))?,
            Method::Karcher => karcher(params.max_iter, params.tol, &g),
            other => unreachable!("{other:?} is not a spherical method"),
        };
        coefs.extend(c.into_iter().map(|c| c as f32));
    }
    let add_base = job.base.is_some() && matches!(method, Method::Nuslerp | Method::Multislerp);
    apply(job, opts, sink, groups, vectors, &coefs, q, add_base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram(upper: &[f64], q: usize) -> GramMatrix<'_> {
        GramMatrix::each(upper, q).next().unwrap()
    }

    #[test]
    fn slerp_of_orthogonal_unit_vectors_follows_the_quarter_circle() {
        let g = [1.0, 0.0, 1.0];
        let c = slerp(0.5, &gram(&g, 2));
        let half = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c[0] - half).abs() < 1e-12 && (c[1] - half).abs() < 1e-12, "{c:?}");
        assert_eq!(slerp(0.0, &gram(&g, 2)), vec![1.0, 0.0]);
    }

    #[test]
    fn nearly_parallel_vectors_interpolate_linearly() {
        // |cos| > 0.9995 (slerp) and 1 − cos² ≤ 1e-16 (nuslerp): the linear pair (1 − t, t).
        assert_eq!(slerp(0.25, &gram(&[1.0, 1.0, 1.0], 2)), vec![0.75, 0.25]);
        assert_eq!(nuslerp(0.25, &gram(&[4.0, 4.0, 4.0], 2)), vec![0.75, 0.25]);
    }

    #[test]
    fn multislerp_of_two_antipodal_inputs_returns_the_weights_and_of_three_is_an_error() {
        assert_eq!(multislerp(&[0.5, 0.5], 1e-8, &gram(&[1.0, -1.0, 1.0], 2)).unwrap(), vec![0.5, 0.5]);
        // v0 = −v1 = v2 ... with weights (0.25, 0.5, 0.25): Σ w_i u_i = 0.
        let g = [1.0, -1.0, 1.0, 1.0, -1.0, 1.0];
        assert!(multislerp(&[0.25, 0.5, 0.25], 1e-8, &gram(&g, 3)).is_err());
    }

    #[test]
    fn karcher_mean_of_one_direction_is_that_direction_at_the_mean_norm() {
        // v1 = 2·v0: the mean direction is v0's, scaled by the mean norm 1.5: 1.5·v0 = 1.5 · (1/‖v0‖)·v0.
        let c = karcher(10, 1e-5, &gram(&[1.0, 2.0, 4.0], 2));
        let direction = c[0] + 2.0 * c[1];
        assert!((direction - 1.5).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn karcher_of_zero_inputs_is_zero() {
        assert_eq!(karcher(10, 1e-5, &gram(&[0.0, 0.0, 0.0], 2)), vec![0.0, 0.0]);
    }
}
