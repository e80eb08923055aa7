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
use crate::linalg::{self, gram, Svd};
use crate::merge::params::SpectralParams;
use crate::merge::passes::{emit, load, load_deltas, load_whole};
use crate::merge::{Job, Method, Options, Sink, DEFAULT_CHUNK_ELEMS};
use crate::rng::Stream;

pub(crate) fn merge(job: &Job, params: &SpectralParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let alpha = if job.spec.method == Method::Star { 1.0 } else { params.alpha as f32 };
    if job.shape.len() != 2 || params.mean_only || too_small(job.spec.method, &job.shape, job.inputs.len()) {
        return mean_delta(job, opts, sink, alpha);
    }
    let (m, n) = (job.shape[0], job.shape[1]);
    if job.spec.method == Method::TsvM {
        // The base is not held: each task vector subtracts it chunk by chunk, and so does the final pass.
        let tau = tsv_m(job, params, m, n)?;
        let base = job.base.as_ref().expect("validated: a base is required");
        return emit(job, opts.chunk_elems, sink, |s, start, len| {
            s.resize(0, len);
            load(job, base, start, &mut s.base[..len]);
            for ((o, &b), &t) in s.mixed[..len].iter_mut().zip(&s.base[..len]).zip(&tau[start..start + len]) {
                *o = b + alpha * t;
            }
        });
    }
    let base = load_whole(job, job.base.as_ref().expect("validated: a base is required"));
    let tau = match job.spec.method {
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

/// Whether a `shape` matrix is too small for `method` to give each of `tasks` task vectors a direction: TSV-M
/// keeps ⌊min(m, n)/T⌋ per task, so a matrix with min(m, n) < T would lose every update (it gets the mean task
/// vector instead; the planner says so in a note).
#[must_use]
pub fn too_small(method: Method, shape: &[usize], tasks: usize) -> bool {
    match shape {
        [m, n] => method == Method::TsvM && (*m).min(*n) < tasks,
        _ => false,
    }
}

/// Bytes a spectral merge of a `shape` matrix with `tasks` task vectors holds at its peak (0 when it only
/// averages). TSV-M (M × N tall after transposing, ρ = N/M, u = 4·M·N bytes): at most one f32 task vector (or
/// the result), the concatenated U (M × N f32) and V (N × N f32), and the N × N f64 Gram matrix with its
/// eigensolver, phases arranged so that the largest of them is max(2 + 3ρ, 1 + 10ρ)·u (3.9u for an LLM's MLP
/// matrix, ρ = 0.29). Iso-C, Iso-CTS and STAR run faer's thin SVD in f64 on whole matrices: measured peaks
/// (2048×1024 and 1024×2048, f32, 3 tasks) were 9–16u (Iso-CTS the most: three exact SVDs live at once); 16u
/// is the bound used.
#[must_use]
pub fn working_bytes(method: Method, shape: &[usize], tasks: usize) -> u64 {
    let [m, n] = shape else { return 0 };
    if too_small(method, shape, tasks) {
        return 0;
    }
    let (big, r) = ((*m).max(*n) as u64, (*m).min(*n) as u64);
    if method != Method::TsvM {
        return 16 * 4 * big * r;
    }
    let u = 4 * big * r;
    let v = 4 * r * r;
    let g = 8 * r * r;
    let solver = linalg::gram::eigh_bytes(r as usize);
    let blocks = linalg::gram::block_bytes(r as usize);
    // A task's Gram matrix beside its task vector; its eigensolver with the task vector dropped; the polar
    // factors (V's f64 product held while U's Gram matrix is solved); the final product.
    let gram_phase = 2 * u + v + g + blocks;
    let eig_phase = u + v + g + solver;
    let polar_phase = u + g + g + solver;
    let final_phase = 2 * u + v;
    gram_phase.max(eig_phase).max(polar_phase).max(final_phase)
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
    finite(job, t, i)
}

/// [`task_vector`] with the base read chunk by chunk from its source instead of held whole.
fn task_vector_streamed(job: &Job, i: usize) -> Result<Vec<f32>> {
    let base = job.base.as_ref().expect("validated: a base is required");
    let mut t = load_whole(job, &job.inputs[i].src);
    t.par_chunks_mut(DEFAULT_CHUNK_ELEMS).enumerate().for_each(|(c, x)| {
        let mut b = vec![0f32; x.len()];
        load(job, base, c * DEFAULT_CHUNK_ELEMS, &mut b);
        x.iter_mut().zip(&b).for_each(|(x, &b)| *x -= b);
    });
    finite(job, t, i)
}

fn finite(job: &Job, t: Vec<f32>, i: usize) -> Result<Vec<f32>> {
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
/// replaced by their polar factors (the nearest orthonormal sets), singular values kept as they are:
/// τ = polar(U_cat) diag(Σ_cat) polar(V_cat)ᵀ. Slots past T·k stay zero, as in the reference.
///
/// Computed on the tall orientation (M × N, M ≥ N; a wide matrix is transposed, which swaps U and V and
/// changes nothing else): each task's exact SVD through its N × N Gram matrix (`linalg::gram`), U_t = τ_t V_t Σ_t⁻¹;
/// the polar factors as U_cat (U_catᵀU_cat)^(-1/2) and the same for V_cat, so that the result is
/// U_cat · E with the small E = M_U diag(Σ) (V_cat M_V)ᵀ. One task vector is held at a time (see
/// [`working_bytes`]). `exact_svd: false` takes the randomized top k instead.
fn tsv_m(job: &Job, p: &SpectralParams, m: usize, n: usize) -> Result<Vec<f32>> {
    let t = job.inputs.len();
    let (big, r) = (m.max(n), m.min(n));
    let k = r / t;
    let err = |e: CoreError| svd_error(job, &e);
    let never = &linalg::NEVER;
    let (mut ucat, mut vcat, mut scat) = (Mat::<f32>::zeros(big, r), Mat::<f32>::zeros(r, r), vec![0f32; r]);
    for i in 0..t {
        let at = i * k;
        let svd = if p.exact_svd {
            let tau = task_vector_streamed(job, i)?;
            let g = gram::gram(tall(&tau, m, n), never).map_err(err)?;
            // Dropped while the eigensolver runs (the peak), read again for U_t = τ_t V_t Σ_t⁻¹.
            drop(tau);
            let (lam, v) = gram::eigh(g, never).map_err(err)?;
            let s: Vec<f64> = lam[..k].iter().map(|&l| l.max(0.0).sqrt()).collect();
            let kept = null_cut(&s);
            let mut w = v.as_ref().subcols(0, kept).to_owned();
            drop(v);
            vcat.as_mut().subcols_mut(at, kept).copy_from(linalg::narrow(w.as_ref()).as_ref());
            for (j, &sj) in s[..kept].iter().enumerate() {
                w.as_mut().col_mut(j).iter_mut().for_each(|x| *x /= sj);
            }
            let tau = task_vector_streamed(job, i)?;
            gram::mul_wide(ucat.as_mut().subcols_mut(at, kept), tall(&tau, m, n), w.as_ref());
            s[..kept].iter().map(|&x| x as f32).collect::<Vec<f32>>()
        } else {
            let tau = task_vector_streamed(job, i)?;
            let stream = Stream::new(job.spec.seed, job.name, job.inputs[i].model_id);
            let svd = linalg::randomized(tall(&tau, m, n), k, p.oversample, p.power_iters, &stream).map_err(err)?;
            let s: Vec<f64> = svd.s.iter().map(|&x| f64::from(x)).collect();
            let kept = null_cut(&s);
            ucat.as_mut().subcols_mut(at, kept).copy_from(svd.u.as_ref().subcols(0, kept));
            vcat.as_mut().subcols_mut(at, kept).copy_from(svd.v.as_ref().subcols(0, kept));
            svd.s[..kept].to_vec()
        };
        scat[at..at + svd.len()].copy_from_slice(&svd);
    }
    // polar(V_cat) first, kept as its f64 product, so that V_cat's Gram solve is done before U_cat's.
    let mv = gram::inv_sqrt(vcat.as_ref(), never).map_err(err)?;
    let pv = linalg::mul_f64(linalg::widen(vcat.as_ref()).as_ref(), mv.as_ref());
    drop((mv, vcat));
    let mut mu = gram::inv_sqrt(ucat.as_ref(), never).map_err(err)?;
    for (j, &sj) in scat.iter().enumerate() {
        mu.as_mut().col_mut(j).iter_mut().for_each(|x| *x *= f64::from(sj));
    }
    let e = linalg::narrow(linalg::mul_f64(mu.as_ref(), pv.as_ref().transpose()).as_ref());
    drop((mu, pv));
    let mut out = vec![0f32; m * n];
    let mut o = linalg::view_mut(&mut out, m, n);
    let dst = if m >= n { o.as_mut() } else { o.as_mut().transpose_mut() };
    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, ucat.as_ref(), e.as_ref(), 1.0f32, faer::Par::rayon(0));
    Ok(out)
}

/// A row-major m × n buffer as its tall orientation (transposed when wide).
fn tall(buf: &[f32], m: usize, n: usize) -> MatRef<'_, f32> {
    let a = linalg::view(buf, m, n);
    if m >= n {
        a
    } else {
        a.transpose()
    }
}

/// How many of the leading singular values `s` lie above TSV-M's null threshold. A task vector of rank below k
/// has singular vectors for (numerically) zero singular values that are arbitrary; left in, they would steer
/// the polar factors of every other slot. They are left out (zero columns, weight zero), which is what the
/// reference computes whenever its SVD returns exact zeros.
fn null_cut(s: &[f64]) -> usize {
    let top = s.first().copied().unwrap_or(0.0);
    s.iter().take_while(|&&x| x > NULL_SV * top).count()
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
