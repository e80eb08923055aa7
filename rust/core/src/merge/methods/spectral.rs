//! Methods that work in the singular-vector space of each whole 2-D task vector: TSV-M (Gargiulo et al., CVPR
//! 2025), Iso-C and Iso-CTS (Marczak et al., ICML 2025) and STAR (Lee et al., NAACL 2025). A matrix is
//! factorized whole, exactly, through N × N Gram matrices (`linalg::gram`), so these load one task vector at a
//! time (f32, m·n) next to the method's accumulators, the base streamed chunk by chunk ([`working_bytes`]);
//! tensors of other ranks get the mean task vector, as in the reference code. The result is θ = θ0 + α·τ, written back chunk by chunk, with τ per method (T task vectors τ_t = U_t Σ_t V_tᵀ):
//!
//! - tsv_m: the top r/T singular triplets of each τ_t concatenated, U and V orthogonalized (polar factors):
//!   τ = U_⊥ diag(Σ) V_⊥ᵀ.
//! - iso_c: the sum of task vectors with a flat spectrum: τ = σ̄·U Vᵀ over the nonzero singular values of Σ_t τ_t.
//! - iso_cts: the common subspace (a `common_space_fraction` share of the rank) plus each task's own top
//!   directions orthogonal to it, all with the mean singular value.
//! - star: each τ_t truncated to keep `eta` percent of its nuclear norm and rescaled to its original nuclear
//!   norm, then averaged (α = 1).

use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::linalg::{self, gram};
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
    // The base is not held: each task vector subtracts it chunk by chunk, and so does the final pass.
    let tau = match job.spec.method {
        Method::TsvM => tsv_m(job, params, m, n)?,
        Method::IsoC => iso_c(job, m, n)?,
        Method::IsoCts => iso_cts(job, params, m, n)?,
        Method::Star => star(job, params, m, n)?,
        other => unreachable!("{other:?} is not spectral"),
    };
    let base = job.base.as_ref().expect("validated: a base is required");
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        s.resize(0, len);
        load(job, base, start, &mut s.base[..len]);
        for ((o, &b), &t) in s.mixed[..len].iter_mut().zip(&s.base[..len]).zip(&tau[start..start + len]) {
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
/// averages). All four methods factorize on the tall orientation (M × N, ρ = N/M, u = 4·M·N bytes, the matrix's
/// float32 size) through N × N Gram matrices (`linalg::gram`), the base streamed, never held. What is live in
/// each phase, the largest being the bound (u: a task vector, sum, accumulator or result, or the concatenated
/// U; v = ρu: the f32 N × N V_cat; g = 2ρu: one f64 N × N matrix; the eigensolver's ≈ 3g; small f64 row blocks):
///
/// - tsv_m: a task's Gram matrix beside its task vector and the concatenated U; its eigensolver with the task
///   vector dropped; the polar factors; the final product: max(2 + 3ρ, 1 + 10ρ)·u.
/// - iso_c: the running sum beside one task vector (2u); the sum's Gram matrix and eigensolver, (1 + 8ρ)·u; the
///   sum rescaled in place.
/// - iso_cts: as Iso-C for the sum, then as TSV-M (one projected task vector at a time).
/// - star: the accumulator beside one task vector and its Gram matrix; the eigensolver with the task vector
///   dropped, (1 + 8ρ)·u; the accumulator plus the task vector times an N × N projector.
///
/// For an LLM's MLP or embedding matrix (ρ ≤ 0.3) every method stays within 4u (3.9u at ρ = 0.29); a square
/// matrix needs up to 11u, the N × N eigensolver's share.
#[must_use]
pub fn working_bytes(method: Method, shape: &[usize], tasks: usize) -> u64 {
    let [m, n] = shape else { return 0 };
    if too_small(method, shape, tasks) {
        return 0;
    }
    let (big, r) = ((*m).max(*n) as u64, (*m).min(*n) as u64);
    let u = 4 * big * r;
    let v = 4 * r * r;
    let g = 8 * r * r;
    let solver = linalg::gram::eigh_bytes(r as usize);
    let blocks = linalg::gram::block_bytes(r as usize);
    // TSV-M's and Iso-CTS's ending: polar(V_cat)'s f64 product held while U_cat's Gram matrix is solved; the final
    // product beside the concatenated U and V.
    let recombine = (u + g + g + solver).max(2 * u + v);
    let phases = match method {
        // A task's Gram matrix beside its task vector; its eigensolver with the task vector dropped.
        Method::TsvM => vec![2 * u + v + g + blocks, u + v + g + solver, recombine],
        // The running sum beside one task vector; the sum's Gram matrix and eigensolver; the N × N rescaling
        // (the eigenvectors and their product) beside the sum, then the in-place product.
        Method::IsoC => vec![2 * u, u + g + solver, u + 2 * g + blocks],
        // As Iso-C for the sum; the common vectors (the sum, its eigenvectors, U_cat, V_cat); then per task as
        // TSV-M, with the projection's f32 column block.
        Method::IsoCts => vec![
            2 * u,
            u + g + solver,
            2 * u + v + g + blocks,
            2 * u + v + g + blocks + 4 * r * PROJ_COLS as u64,
            u + v + g + solver,
            recombine,
        ],
        // The accumulator beside a task vector and its Gram matrix; the eigensolver with the task vector
        // dropped; the projector and the eigenvectors it is made from; the product added to the accumulator.
        Method::Star => vec![2 * u + g + blocks, u + g + solver, u + 2 * g, 2 * u + g + blocks],
        _ => return 0,
    };
    phases.into_iter().max().unwrap_or(0)
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

/// Input `i`'s task vector, the base read chunk by chunk from its source instead of held whole, checked finite
/// (an SVD of NaN or infinity has no meaning).
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
            let (s, w) = top_factors(&lam, v, k, vcat.as_mut().subcols_mut(at, k));
            let kept = w.ncols();
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
    recombine(job, ucat.as_ref(), &scat, vcat, m, n)
}

/// `polar(U_cat) · diag(s) · polar(V_cat)ᵀ` (tall orientation: U_cat M × N, V_cat N × N) as a row-major m × n
/// buffer, the polar factors as U_cat (U_catᵀU_cat)^(-1/2) and the same for V_cat, so that the result is U_cat · E
/// with the small E = M_U diag(s) (V_cat M_V)ᵀ.
fn recombine(job: &Job, ucat: MatRef<'_, f32>, scat: &[f32], vcat: Mat<f32>, m: usize, n: usize) -> Result<Vec<f32>> {
    let err = |e: CoreError| svd_error(job, &e);
    let never = &linalg::NEVER;
    // polar(V_cat) first, kept as its f64 product, so that V_cat's Gram solve is done before U_cat's.
    let mv = gram::inv_sqrt(vcat.as_ref(), never).map_err(err)?;
    let pv = linalg::mul_f64(linalg::widen(vcat.as_ref()).as_ref(), mv.as_ref());
    drop((mv, vcat));
    let mut mu = gram::inv_sqrt(ucat, never).map_err(err)?;
    for (j, &sj) in scat.iter().enumerate() {
        mu.as_mut().col_mut(j).iter_mut().for_each(|x| *x *= f64::from(sj));
    }
    let e = linalg::narrow(linalg::mul_f64(mu.as_ref(), pv.as_ref().transpose()).as_ref());
    drop((mu, pv));
    let mut out = vec![0f32; m * n];
    let mut o = linalg::view_mut(&mut out, m, n);
    let dst = if m >= n { o.as_mut() } else { o.as_mut().transpose_mut() };
    faer::linalg::matmul::matmul(dst, Accum::Replace, ucat, e.as_ref(), 1.0f32, Par::rayon(0));
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

/// A row-major m × n buffer as its tall orientation, mutable (transposed when wide).
fn tall_mut(buf: &mut [f32], m: usize, n: usize) -> MatMut<'_, f32> {
    let a = linalg::view_mut(buf, m, n);
    if m >= n {
        a
    } else {
        a.transpose_mut()
    }
}

/// Σ_t τ_t as a row-major buffer, one task vector resident at a time.
fn sum_of_tasks(job: &Job) -> Result<Vec<f32>> {
    let mut sum = vec![0f32; job.numel];
    for i in 0..job.inputs.len() {
        let tau = task_vector_streamed(job, i)?;
        sum.par_iter_mut().zip(&tau).for_each(|(s, &x)| *s += x);
    }
    Ok(sum)
}

/// The top `want` singular values of a tall matrix A from the eigenpairs (`lam`, `v`) of its Gram matrix AᵀA, and
/// its right singular vectors above the null threshold ([`null_cut`]): those are written into the first columns of
/// `v_dst` (want wide), and returned divided by their σ (V Σ⁻¹, so that U = A · V Σ⁻¹; its width is the number
/// kept). The eigenvectors are dropped before the product is formed, and A is not needed here: a caller may have
/// dropped it while the eigensolver ran and read it again for U.
fn top_factors(lam: &[f64], v: Mat<f64>, want: usize, mut v_dst: MatMut<'_, f32>) -> (Vec<f64>, Mat<f64>) {
    let s = sigmas(lam, want);
    let kept = null_cut(&s);
    let mut w = v.as_ref().subcols(0, kept).to_owned();
    drop(v);
    v_dst.as_mut().subcols_mut(0, kept).copy_from(linalg::narrow(w.as_ref()).as_ref());
    for (j, &sj) in s[..kept].iter().enumerate() {
        w.as_mut().col_mut(j).iter_mut().for_each(|x| *x /= sj);
    }
    (s, w)
}

/// The square roots of the first `k` eigenvalues of a Gram matrix (clamped at zero): singular values.
fn sigmas(lam: &[f64], k: usize) -> Vec<f64> {
    lam[..k.min(lam.len())].iter().map(|&l| l.max(0.0).sqrt()).collect()
}

/// Iso-C: the summed task vector with a flat spectrum, mean(σ)·U Vᵀ (needs the whole spectrum: exact). On the
/// tall orientation S (M × N): σ² and V from the eigendecomposition of SᵀS, and U Vᵀ = S (SᵀS)^(-1/2), so
/// τ = S · (mean(σ) · V Σ⁻¹ Vᵀ), multiplied in place by row blocks. Directions of S's null space (σ at or below
/// 1e-6 σ₁) get zero, where an SVD would give an arbitrary completion weighted by mean(σ): the answer is not unique
/// there, and the null space adds nothing to any task.
fn iso_c(job: &Job, m: usize, n: usize) -> Result<Vec<f32>> {
    let err = |e: CoreError| svd_error(job, &e);
    let never = &linalg::NEVER;
    let mut sum = sum_of_tasks(job)?;
    let (lam, w) = gram::eigh(gram::gram(tall(&sum, m, n), never).map_err(err)?, never).map_err(err)?;
    let r = lam.len();
    let mean = sigmas(&lam, r).iter().sum::<f64>() / r.max(1) as f64;
    let scale = gram::inv_sqrt_eig(&lam, w, mean);
    gram::mul_wide_in_place(tall_mut(&mut sum, m, n), scale.as_ref());
    Ok(sum)
}

/// Columns of a task vector projected at a time in Iso-CTS (the f32 block U_cᵀ τ[:, cols] is common × PROJ_COLS).
const PROJ_COLS: usize = 512;

/// `τ ← τ − U_c (U_cᵀ τ)` for the row-major m × n `tau` and `uc` (m × c, orthonormal columns), in f32 by blocks of
/// columns (each block's projection depends on that block alone, so the result does not depend on the blocking).
fn project_out(tau: &mut [f32], m: usize, n: usize, uc: MatRef<'_, f32>) {
    let c = uc.ncols();
    if c == 0 {
        return;
    }
    let mut a = linalg::view_mut(tau, m, n);
    let mut t = Mat::<f32>::zeros(c, PROJ_COLS.min(n));
    for start in (0..n).step_by(PROJ_COLS) {
        let cols = PROJ_COLS.min(n - start);
        let mut blk = a.as_mut().subcols_mut(start, cols);
        let mut tt = t.as_mut().subcols_mut(0, cols);
        faer::linalg::matmul::matmul(tt.as_mut(), Accum::Replace, uc.transpose(), blk.as_ref(), 1.0f32, Par::rayon(0));
        faer::linalg::matmul::matmul(blk.as_mut(), Accum::Add, uc, tt.as_ref(), -1.0f32, Par::rayon(0));
    }
}

/// Iso-CTS: the top `common` directions of Σ τ_t (common = ⌊f·r⌋, then adjusted so the remaining r − common
/// slots split evenly over the T tasks, with Python's round-half-even as in the reference), plus each task's top
/// directions after projecting out the common left subspace; both sets orthonormalized by polar factors, every
/// slot weighted by the mean of all r concatenated singular values.
///
/// Computed as TSV-M is (tall orientation, Gram matrices, [`recombine`]): the common block's U = S V Σ⁻¹ and V from
/// SᵀS; each task's projected remainder τ_t − U_c U_cᵀ τ_t is formed twice (for its Gram matrix, and again for
/// U = τ' V Σ⁻¹ after the eigensolver, which runs with it dropped). U_c is the original orientation's left
/// factor: the tall U_cat's common block, or the tall V_cat's for a wide matrix. Singular directions at or
/// below 1e-6 of their block's largest σ are left out (zero slots, as TSV-M's), where an SVD would put an
/// arbitrary completion.
fn iso_cts(job: &Job, p: &SpectralParams, m: usize, n: usize) -> Result<Vec<f32>> {
    let err = |e: CoreError| svd_error(job, &e);
    let never = &linalg::NEVER;
    let t = job.inputs.len();
    let (big, r) = (m.max(n), m.min(n));
    let f = p.common_space_fraction;
    let common0 = (r as f64 * f).floor() as usize;
    let mut ts_total = (((r - common0) as f64 / t as f64).round_ties_even() as usize) * t;
    // Rounding up can ask for more task slots than there are (r = 3, T = 2, f < 1/3): one block fewer each.
    while ts_total > r {
        ts_total -= t;
    }
    let common = r - ts_total;
    let dims = ts_total / t;
    let (mut ucat, mut vcat, mut scat) = (Mat::<f32>::zeros(big, r), Mat::<f32>::zeros(r, r), vec![0f32; r]);
    {
        let sum = sum_of_tasks(job)?;
        let (lam, v) = gram::eigh(gram::gram(tall(&sum, m, n), never).map_err(err)?, never).map_err(err)?;
        let (s, w) = top_factors(&lam, v, common, vcat.as_mut().subcols_mut(ts_total, common));
        gram::mul_wide(ucat.as_mut().subcols_mut(ts_total, w.ncols()), tall(&sum, m, n), w.as_ref());
        for (d, &x) in scat[ts_total..].iter_mut().zip(&s) {
            *d = x as f32;
        }
    }
    if dims > 0 {
        let (mut u_task, u_common) = ucat.as_mut().split_at_col_mut(ts_total);
        let (mut v_task, v_common) = vcat.as_mut().split_at_col_mut(ts_total);
        let uc = if m >= n { u_common.as_ref() } else { v_common.as_ref() };
        for i in 0..t {
            let at = i * dims;
            let mut tau = task_vector_streamed(job, i)?;
            project_out(&mut tau, m, n, uc);
            let g = gram::gram(tall(&tau, m, n), never).map_err(err)?;
            drop(tau);
            let (lam, v) = gram::eigh(g, never).map_err(err)?;
            let (s, w) = top_factors(&lam, v, dims, v_task.as_mut().subcols_mut(at, dims));
            let mut tau = task_vector_streamed(job, i)?;
            project_out(&mut tau, m, n, uc);
            gram::mul_wide(u_task.as_mut().subcols_mut(at, w.ncols()), tall(&tau, m, n), w.as_ref());
            for (d, &x) in scat[at..at + dims].iter_mut().zip(&s) {
                *d = x as f32;
            }
        }
    }
    let mean = (scat.iter().map(|&x| f64::from(x)).sum::<f64>() / r.max(1) as f64) as f32;
    recombine(job, ucat.as_ref(), &vec![mean; r], vcat, m, n)
}

/// STAR: each task vector keeps the fewest top singular values reaching eta% of its nuclear norm (the
/// reference's left `searchsorted` + 1), rescaled so the nuclear norm is unchanged; the results are averaged.
/// A task vector that is zero contributes zero (the reference divides 0 by 0 there).
///
/// On the tall orientation, σ and V from the eigendecomposition of τᵀτ (the eigensolver runs with τ dropped);
/// the kept part Σ_j u_j (σ_j·c) v_jᵀ is τ · (c·V_k V_kᵀ), since u_j σ_j = τ v_j: one product with an N × N
/// projector, added to the accumulator by row blocks.
fn star(job: &Job, p: &SpectralParams, m: usize, n: usize) -> Result<Vec<f32>> {
    let err = |e: CoreError| svd_error(job, &e);
    let never = &linalg::NEVER;
    let t = job.inputs.len();
    let eta = p.eta / 100.0;
    let mut acc = vec![0f32; job.numel];
    for i in 0..t {
        let tau = task_vector_streamed(job, i)?;
        let g = gram::gram(tall(&tau, m, n), never).map_err(err)?;
        drop(tau);
        let (lam, v) = gram::eigh(g, never).map_err(err)?;
        let s = sigmas(&lam, lam.len());
        let total: f64 = s.iter().sum();
        if total == 0.0 {
            continue;
        }
        let mut run = 0.0;
        let below = s
            .iter()
            .take_while(|&&x| {
                run += x;
                run < eta * total
            })
            .count();
        let keep = (below + 1).min(s.len());
        let kept: f64 = s[..keep].iter().sum();
        let scale = total / kept;
        let vk = v.as_ref().subcols(0, keep);
        let mut proj = Mat::<f64>::zeros(vk.nrows(), vk.nrows());
        faer::linalg::matmul::matmul(proj.as_mut(), Accum::Replace, vk, vk.transpose(), scale, Par::rayon(0));
        drop(v);
        let tau = task_vector_streamed(job, i)?;
        gram::mul_wide_add(tall_mut(&mut acc, m, n), tall(&tau, m, n), proj.as_ref());
    }
    let inv = 1.0 / t as f32;
    acc.par_iter_mut().for_each(|a| *a *= inv);
    Ok(acc)
}
