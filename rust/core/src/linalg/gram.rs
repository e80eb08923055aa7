//! The exact SVD of a tall matrix through its Gram matrix, for TSV-M: `a` (M × N, M ≥ N) has `aᵀa = V Σ² Vᵀ`, so
//! the eigendecomposition of the N × N Gram matrix gives V and Σ, and `U = a V Σ⁻¹` follows by one product. The
//! Gram matrix is summed in f64 from the f32 data (each product exact, each sum rounded once in f64), so σ_i is
//! accurate to about 1e-16·N·σ₁²/σ_i (relative): every σ above 1e-6·σ₁ (TSV-M's null threshold) to better than
//! f32 rounding. It needs N² f64 for the Gram matrix and about 3N² f64 in the eigensolver instead of faer's thin
//! SVD's copies of the whole M × N matrix in f64 (plus its M × N U), and runs in M·N² + O(N³) flops, a matrix product
//! and an N × N eigenproblem instead of an M × N bidiagonalization.
//!
//! The polar factor of a tall `a` is `a (aᵀa)^(-1/2)` by the same eigendecomposition ([`inv_sqrt`]).

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par, Spec};

use super::{pin, Cancel};
use crate::error::{CoreError, Result};

/// Rows of `a` widened to f64 at a time while summing the Gram matrix (the sum runs over these blocks in order,
/// so it does not depend on threads).
const BLOCK_ROWS: usize = 512;

/// The lower triangle of `aᵀa` in f64 (the strict upper triangle is left zero).
pub fn gram(a: MatRef<'_, f32>, cancel: &Cancel) -> Result<Mat<f64>> {
    let (m, n) = a.shape();
    let mut g = Mat::<f64>::zeros(n, n);
    let mut block = Mat::<f64>::zeros(BLOCK_ROWS.min(m), n);
    for start in (0..m).step_by(BLOCK_ROWS) {
        cancel.check()?;
        let rows = BLOCK_ROWS.min(m - start);
        let src = a.subrows(start, rows);
        let mut b = block.as_mut().subrows_mut(0, rows);
        faer::zip!(b.as_mut(), src).for_each(|faer::unzip!(d, s)| *d = f64::from(*s));
        triangular::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            b.as_ref().transpose(),
            BlockStructure::Rectangular,
            b.as_ref(),
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
    }
    Ok(g)
}

/// Bytes [`eigh`] holds for an N × N problem besides its input: the eigenvectors and faer's workspace.
pub fn eigh_bytes(n: usize) -> u64 {
    let vectors = n as u64 * n as u64 * 8;
    vectors + scratch(n).unaligned_bytes_required() as u64
}

fn scratch(n: usize) -> StackReq {
    let par = Par::rayon(super::FACTOR_SPLIT);
    let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let tmp = |r: usize, c: usize| faer::linalg::temp_mat_scratch::<f64>(r, c);
    StackReq::all_of(&[
        tmp(n, 1).array(4),
        StackReq::any_of(&[
            faer::linalg::evd::tridiag::tridiag_in_place_scratch::<f64>(n, par, Spec::default()),
            // divide and conquer (faer's `divide_and_conquer_scratch`, which is not public)
            StackReq::all_of(&[StackReq::new::<usize>(n).array(4), tmp(n, 1).array(6), tmp(n, n).array(2)]),
            faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
                n.saturating_sub(1),
                bs,
                n,
            ),
        ]),
    ])
}

/// Eigenvalues (non-increasing) and eigenvectors (columns, in the same order) of the symmetric matrix whose lower
/// triangle is `g`; `g` is overwritten (it holds the tridiagonal reduction), which spares faer's copy of it.
pub fn eigh(mut g: Mat<f64>, cancel: &Cancel) -> Result<(Vec<f64>, Mat<f64>)> {
    pin();
    let n = g.nrows();
    if n == 0 {
        return Ok((vec![], Mat::zeros(0, 0)));
    }
    let par = faer::get_global_parallelism();
    let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let mut mem = MemBuffer::new(scratch(n));
    let stack = MemStack::new(&mut mem);
    let mut householder = Mat::<f64>::zeros(bs, n - 1);
    cancel.check()?;
    faer::linalg::evd::tridiag::tridiag_in_place(g.as_mut(), householder.as_mut(), par, stack, Spec::default());
    cancel.check()?;
    let diag: Vec<f64> = (0..n).map(|i| g[(i, i)]).collect();
    let sub: Vec<f64> = (0..n).map(|i| if i + 1 < n { g[(i + 1, i)] } else { 0.0 }).collect();
    let mut s = vec![0f64; n];
    let mut u = Mat::<f64>::zeros(n, n);
    faer::linalg::evd::tridiagonal_self_adjoint_evd(
        faer::col::ColRef::from_slice(&diag).as_diagonal(),
        faer::col::ColRef::from_slice(&sub).as_diagonal(),
        faer::col::ColMut::from_slice_mut(&mut s).as_diagonal_mut(),
        Some(u.as_mut()),
        par,
        stack,
        Spec::default(),
    )
    .map_err(|_| CoreError::param("the symmetric eigendecomposition did not converge"))?;
    cancel.check()?;
    if n > 1 {
        faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            g.as_ref().submatrix(1, 0, n - 1, n - 1),
            householder.as_ref(),
            Conj::No,
            u.as_mut().subrows_mut(1, n - 1),
            par,
            stack,
        );
    }
    drop(g);
    // faer sorts non-decreasing; the callers want the largest first.
    s.reverse();
    let u = Mat::from_fn(n, n, |i, j| u[(i, n - 1 - j)]);
    Ok((s, u))
}

/// The top `k` right singular vectors (N × k, f64) and singular values of a tall `a` (M ≥ N), from its Gram
/// matrix. Singular values are √max(λ, 0).
pub fn top_right(a: MatRef<'_, f32>, k: usize, cancel: &Cancel) -> Result<(Vec<f64>, Mat<f64>)> {
    debug_assert!(a.nrows() >= a.ncols());
    let (lam, v) = eigh(gram(a, cancel)?, cancel)?;
    let k = k.min(lam.len());
    let s = lam[..k].iter().map(|&l| l.max(0.0).sqrt()).collect();
    Ok((s, v.as_ref().subcols(0, k).to_owned()))
}

/// Eigenvalues of a Gram matrix at or below this share of the largest count as zero in [`inv_sqrt`] (singular
/// values below 1e-6 of the largest: the f32 data's rounding noise).
pub const NULL_EIG: f64 = 1e-12;

/// `(aᵀa)^(-1/2)` restricted to the span of `a`'s rows (N × N, f64), so that `a · inv_sqrt(a)` is `a`'s polar factor
/// on its range and zero on its null space: columns of `a` that are zero (TSV-M's unused slots) stay zero
/// instead of getting an arbitrary orthonormal completion, which they would be weighted by zero anyway.
pub fn inv_sqrt(a: MatRef<'_, f32>, cancel: &Cancel) -> Result<Mat<f64>> {
    let (lam, w) = eigh(gram(a, cancel)?, cancel)?;
    Ok(inv_sqrt_eig(&lam, w, 1.0))
}

/// `scale · W diag(λ^(-1/2)) Wᵀ` over the eigenvalues above [`NULL_EIG`] of the largest, from an [`eigh`] result:
/// `a · inv_sqrt_eig(eigh(aᵀa))` is `scale` times `a`'s polar factor on its range (see [`inv_sqrt`]).
pub fn inv_sqrt_eig(lam: &[f64], mut w: Mat<f64>, scale: f64) -> Mat<f64> {
    let top = lam.first().copied().unwrap_or(0.0);
    let n = lam.len();
    let c = scale.sqrt();
    // W diag(λ^(-1/2)) Wᵀ = (W diag(λ^(-1/4))) (W diag(λ^(-1/4)))ᵀ: W is scaled in place.
    for (j, &l) in lam.iter().enumerate() {
        let f = if l > NULL_EIG * top { crate::math::powf(l, -0.25) * c } else { 0.0 };
        w.as_mut().col_mut(j).iter_mut().for_each(|x| *x *= f);
    }
    let mut out = Mat::<f64>::zeros(n, n);
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, w.as_ref(), w.as_ref().transpose(), 1.0, Par::rayon(0));
    out
}

/// Bytes of the f64 row blocks [`gram`] and [`mul_wide`] hold for a matrix of `n` columns.
pub fn block_bytes(n: usize) -> u64 {
    2 * BLOCK_ROWS as u64 * n as u64 * 8
}

/// `dst = a · b` with `a` f32 and `b` f64, in f64 by row blocks of `a`, rounded into `dst` (f32).
pub fn mul_wide(dst: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f64>) {
    mul_wide_with(dst, a, b, false);
}

/// `dst += a · b` (the product as in [`mul_wide`], rounded to f32, then added).
pub fn mul_wide_add(dst: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f64>) {
    mul_wide_with(dst, a, b, true);
}

fn mul_wide_with(mut dst: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f64>, add: bool) {
    let (m, n) = a.shape();
    let mut block = Mat::<f64>::zeros(BLOCK_ROWS.min(m), n);
    let mut out = Mat::<f64>::zeros(BLOCK_ROWS.min(m), b.ncols());
    for start in (0..m).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(m - start);
        let mut blk = block.as_mut().subrows_mut(0, rows);
        faer::zip!(blk.as_mut(), a.subrows(start, rows)).for_each(|faer::unzip!(d, s)| *d = f64::from(*s));
        let mut o = out.as_mut().subrows_mut(0, rows);
        faer::linalg::matmul::matmul(o.as_mut(), Accum::Replace, blk.as_ref(), b, 1.0, Par::rayon(0));
        let d = dst.as_mut().subrows_mut(start, rows);
        if add {
            faer::zip!(d, o.as_ref()).for_each(|faer::unzip!(d, s)| *d += *s as f32);
        } else {
            faer::zip!(d, o.as_ref()).for_each(|faer::unzip!(d, s)| *d = *s as f32);
        }
    }
}

/// `a ← a · b` in place (`b` square, f64), by row blocks as in [`mul_wide`]: each block of rows is widened, multiplied
/// and rounded back, so no second matrix of `a`'s size is held.
pub fn mul_wide_in_place(mut a: MatMut<'_, f32>, b: MatRef<'_, f64>) {
    debug_assert_eq!(b.nrows(), b.ncols());
    let (m, n) = a.shape();
    let mut block = Mat::<f64>::zeros(BLOCK_ROWS.min(m), n);
    let mut out = Mat::<f64>::zeros(BLOCK_ROWS.min(m), n);
    for start in (0..m).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(m - start);
        let mut blk = block.as_mut().subrows_mut(0, rows);
        let mut src = a.as_mut().subrows_mut(start, rows);
        faer::zip!(blk.as_mut(), src.as_ref()).for_each(|faer::unzip!(d, s)| *d = f64::from(*s));
        let mut o = out.as_mut().subrows_mut(0, rows);
        faer::linalg::matmul::matmul(o.as_mut(), Accum::Replace, blk.as_ref(), b, 1.0, Par::rayon(0));
        faer::zip!(src.as_mut(), o.as_ref()).for_each(|faer::unzip!(d, s)| *d = *s as f32);
    }
}
