//! Methods that work in the singular-vector space of each whole 2-D task vector: TSV-M (Gargiulo et al., CVPR
//! 2025), Iso-C and Iso-CTS (Marczak et al., ICML 2025) and STAR (Lee et al., NAACL 2025). A matrix is
//! factorized whole, so these load one task vector at a time (f32, m·n) next to the base and the method's
//! accumulators; tensors of other ranks get the mean task vector, as in the reference code. The result is
//! θ = θ0 + α·τ, written back chunk by chunk, with τ per method (T task vectors τ_t = U_t Σ_t V_tᵀ):
//!
//! - tsv_m: the top r/T singular triplets of each τ_t concatenated, U and V orthogonalized (polar factors):
//!   τ = U_⊥ diag(Σ) V_⊥ᵀ.
//! - iso_c: the sum of task vectors with a flat spectrum: τ = σ̄·U Vᵀ over the nonzero singular values of Σ_t τ_t.
//! - iso_cts: the common subspace (a `common_space_fraction` share of the rank) plus each task's own top
//!   directions orthogonal to it, all with the mean singular value.
//! - star: each τ_t truncated to keep `eta` percent of its nuclear norm and rescaled to its original nuclear
//!   norm, then averaged (α = 1).

use faer::{Mat, MatRef};
use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::linalg::{self, Svd};
use crate::merge::params::SpectralParams;
use crate::merge::passes::{emit, load_deltas, load_whole};
use crate::merge::{Job, Method, Options, Sink};
use crate::rng::Stream;

pub(crate) fn merge(job: &Job, params: &SpectralParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let alpha = if job.spec.method == Method::Star { 1.0 } else { params.alpha as f32 };
    if job.shape.len() != 2 || params.mean_only {
        return mean_delta(job, opts, sink, alpha);
    }
    let (m, n) = (job.shape[0], job.shape[1]);
    let base = load_whole(job, job.base.as_ref().expect("validated: a base is required"));
    let tau = match job.spec.method {
        Method::TsvM => tsv_m(job, params, &base, m, n)?,
        Method::IsoC => iso_c(job, &base, m, n)?,
        Method::IsoCts => iso_cts(job, params, &base, m, n)?,
        Method::Star => star(job, params, &base, m, n)?,
        other => unreachable!("{other:?} is not spectral"),
    };
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        s.resize(0, len);
        let out = &mut s.mixed[..len];
        for ((o, &b), &t) in out.iter_mut().zip(&base[start..start + len]).zip(&tau[start..start + len]) {
            *o = b + alpha * t;
        }
    })
}

/// Bytes a spectral merge of an m×n matrix holds at its peak: the base, one task vector, the concatenated factors
/// and faer's SVD workspaces. Measured peaks (2048×1024 and 1024×2048, f32, 3 tasks) were 9–16 times m·n·4
/// (Iso-CTS the most: three exact SVDs live at once); 16 is the bound used.
pub fn working_bytes(shape: &[usize]) -> u64 {
    match shape {
        [m, n] => 16 * 4 * *m as u64 * *n as u64,
        _ => 0,
    }
}

/// θ0 + α·mean(τ_t), elementwise (tensors that are not matrices).
fn mean_delta(job: &Job, opts: &Options, sink: &dyn Sink, alpha: f32) -> Result<()> {
    let inv = 1.0 / job.inputs.len() as f32;
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        load_deltas(job, start, len, s);
        for j in 0..len {
            let sum: f32 = s.x.iter().map(|x| x[j]).sum();
            s.mixed[j] = s.base[j] + alpha * (sum * inv);
        }
    })
}

/// Input `i`'s task vector, checked finite (an SVD of NaN or infinity has no meaning).
fn task_vector(job: &Job, base: &[f32], i: usize) -> Result<Vec<f32>> {
    let mut t = load_whole(job, &job.inputs[i].src);
    t.par_iter_mut().zip(base).for_each(|(x, &b)| *x -= b);
    if !linalg::all_finite(&t) {
        return Err(CoreError::param(format!(
            "tensor '{}': input {i} has non-finite values, which the SVD of {} cannot take",
            job.name,
            job.spec.method.name()
        )));
    }
    Ok(t)
}

fn svd_error(job: &Job, e: &CoreError) -> CoreError {
    CoreError::param(format!("tensor '{}': {e}", job.name))
}

/// Copy the first `k` triplets of `svd` into slots `at..at + k` of the concatenated factors.
fn place(svd: &Svd, k: usize, at: usize, ucat: &mut Mat<f32>, scat: &mut [f32], vcat: &mut Mat<f32>) {
    ucat.as_mut().subcols_mut(at, k).copy_from(svd.u.as_ref().subcols(0, k));
    vcat.as_mut().subcols_mut(at, k).copy_from(svd.v.as_ref().subcols(0, k));
    scat[at..at + k].copy_from_slice(&svd.s[..k]);
}

/// `polar(U_cat) · diag(s) · polar(V_cat)ᵀ` as a row-major buffer.
fn recombine(ucat: MatRef<'_, f32>, s: &[f32], vcat: MatRef<'_, f32>) -> Result<Vec<f32>> {
    let mut pu = linalg::polar(ucat)?;
    let pv = linalg::polar(vcat)?;
    for (j, &sj) in s.iter().enumerate() {
        pu.as_mut().col_mut(j).iter_mut().for_each(|x| *x *= sj);
    }
    Ok(linalg::to_row_major(linalg::mul(pu.as_ref(), pv.as_ref().transpose()).as_ref()))
}

/// TSV-M: each task keeps its top k = ⌊min(m, n)/T⌋ singular triplets; the concatenated singular vectors are
/// replaced by their polar factors (the nearest orthonormal sets), singular values kept as they are. Slots past
/// T·k stay zero, as in the reference. Randomized SVDs by default (only the top k are used).
fn tsv_m(job: &Job, p: &SpectralParams, base: &[f32], m: usize, n: usize) -> Result<Vec<f32>> {
    let t = job.inputs.len();
    let r = m.min(n);
    let k = r / t;
    let (mut ucat, mut vcat, mut scat) = (Mat::zeros(m, r), Mat::zeros(n, r), vec![0f32; r]);
    for i in 0..t {
        if k == 0 {
            break;
        }
        let tau = task_vector(job, base, i)?;
        let a = linalg::view(&tau, m, n);
        let svd = if p.exact_svd {
            linalg::exact(a).map(|s| s.truncate(k))
        } else {
            let stream = Stream::new(job.spec.seed, job.name, job.inputs[i].model_id);
            linalg::randomized(a, k, p.oversample, p.power_iters, &stream)
        }
        .map_err(|e| svd_error(job, &e))?;
        // A task vector of rank below k has singular vectors for (numerically) zero singular values that are
        // arbitrary; left in, they would steer the polar factors of every other slot. They are left out (zero
        // columns, weight zero), which is what the reference computes whenever its SVD returns exact zeros.
        let kept = svd.s.iter().take(k).take_while(|&&x| f64::from(x) > NULL_SV * f64::from(svd.s[0])).count();
        place(&svd, kept, i * k, &mut ucat, &mut scat, &mut vcat);
    }
    recombine(ucat.as_ref(), &scat, vcat.as_ref()).map_err(|e| svd_error(job, &e))
}

/// Singular values at or below this share of the largest are treated as zero by TSV-M (f32 data: its rounding
/// noise sits near 1e-7 of the largest).
const NULL_SV: f64 = 1e-6;

/// Σ_t τ_t as a row-major buffer, one task vector resident at a time.
fn sum_of_tasks(job: &Job, base: &[f32]) -> Result<Vec<f32>> {
    let mut sum = vec![0f32; job.numel];
    for i in 0..job.inputs.len() {
        let tau = task_vector(job, base, i)?;
        sum.par_iter_mut().zip(&tau).for_each(|(s, &x)| *s += x);
    }
    Ok(sum)
}

/// Iso-C: the summed task vector with a flat spectrum, mean(σ)·U Vᵀ (needs the whole spectrum: exact SVD).
fn iso_c(job: &Job, base: &[f32], m: usize, n: usize) -> Result<Vec<f32>> {
    let sum = sum_of_tasks(job, base)?;
    let svd = linalg::exact(linalg::view(&sum, m, n)).map_err(|e| svd_error(job, &e))?;
    drop(sum);
    let mean = (svd.s.iter().map(|&x| f64::from(x)).sum::<f64>() / svd.rank().max(1) as f64) as f32;
    let mut u = svd.u;
    u.as_mut().col_iter_mut().for_each(|c| c.iter_mut().for_each(|x| *x *= mean));
    Ok(linalg::to_row_major(linalg::mul(u.as_ref(), svd.v.as_ref().transpose()).as_ref()))
}

/// Iso-CTS: the top `common` directions of Σ τ_t (common = ⌊f·r⌋, then adjusted so the remaining r − common
/// slots split evenly over the T tasks, with Python's round-half-even as in the reference), plus each task's top
/// directions after projecting out the common left subspace; both sets orthonormalized by polar factors, every
/// slot weighted by the mean of all r concatenated singular values.
fn iso_cts(job: &Job, p: &SpectralParams, base: &[f32], m: usize, n: usize) -> Result<Vec<f32>> {
    let t = job.inputs.len();
    let r = m.min(n);
    let f = p.common_space_fraction;
    let common0 = (r as f64 * f).floor() as usize;
    let mut ts_total = (((r - common0) as f64 / t as f64).round_ties_even() as usize) * t;
    // Rounding up can ask for more task slots than there are (r = 3, T = 2, f < 1/3): one block fewer each.
    while ts_total > r {
        ts_total -= t;
    }
    let common = r - ts_total;
    let dims = ts_total / t;
    let sum = sum_of_tasks(job, base)?;
    let svd = linalg::exact(linalg::view(&sum, m, n)).map_err(|e| svd_error(job, &e))?;
    drop(sum);
    let (mut ucat, mut vcat, mut scat) = (Mat::zeros(m, r), Mat::zeros(n, r), vec![0f32; r]);
    place(&svd, common, ts_total, &mut ucat, &mut scat, &mut vcat);
    let uc = svd.u.as_ref().subcols(0, common);
    for i in 0..t {
        if dims == 0 {
            break;
        }
        let mut tau = task_vector(job, base, i)?;
        let mut a = linalg::view_mut(&mut tau, m, n);
        // τ_t − U_c (U_cᵀ τ_t): the part of the task outside the common left subspace.
        let proj = linalg::mul(uc, linalg::mul(uc.transpose(), a.as_ref()).as_ref());
        faer::zip!(a.as_mut(), proj.as_ref()).for_each(|faer::unzip!(x, p)| *x -= *p);
        let own = linalg::exact(a.as_ref()).map_err(|e| svd_error(job, &e))?;
        place(&own, dims, i * dims, &mut ucat, &mut scat, &mut vcat);
    }
    let mean = (scat.iter().map(|&x| f64::from(x)).sum::<f64>() / r.max(1) as f64) as f32;
    recombine(ucat.as_ref(), &vec![mean; r], vcat.as_ref()).map_err(|e| svd_error(job, &e))
}

/// STAR: each task vector keeps the fewest top singular values reaching eta% of its nuclear norm (the
/// reference's left `searchsorted` + 1), rescaled so the nuclear norm is unchanged; the results are averaged.
/// A task vector that is zero contributes zero (the reference divides 0 by 0 there).
fn star(job: &Job, p: &SpectralParams, base: &[f32], m: usize, n: usize) -> Result<Vec<f32>> {
    let t = job.inputs.len();
    let eta = p.eta / 100.0;
    let mut acc = vec![0f32; job.numel];
    for i in 0..t {
        let tau = task_vector(job, base, i)?;
        let svd = linalg::exact(linalg::view(&tau, m, n)).map_err(|e| svd_error(job, &e))?;
        drop(tau);
        let total: f64 = svd.s.iter().map(|&x| f64::from(x)).sum();
        if total == 0.0 {
            continue;
        }
        let mut run = 0.0;
        let below = svd
            .s
            .iter()
            .take_while(|&&x| {
                run += f64::from(x);
                run < eta * total
            })
            .count();
        let keep = (below + 1).min(svd.rank());
        let kept: f64 = svd.s[..keep].iter().map(|&x| f64::from(x)).sum();
        let scale = total / kept;
        let mut u = svd.u.as_ref().subcols(0, keep).to_owned();
        for j in 0..keep {
            let sj = (f64::from(svd.s[j]) * scale) as f32;
            u.as_mut().col_mut(j).iter_mut().for_each(|x| *x *= sj);
        }
        let part = linalg::to_row_major(linalg::mul(u.as_ref(), svd.v.as_ref().subcols(0, keep).transpose()).as_ref());
        acc.par_iter_mut().zip(&part).for_each(|(a, &x)| *a += x);
    }
    let inv = 1.0 / t as f32;
    acc.par_iter_mut().for_each(|a| *a *= inv);
    Ok(acc)
}
