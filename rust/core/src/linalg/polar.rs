//! The polar factor: the matrix with orthonormal columns nearest to `a` in Frobenius norm (orthogonal
//! Procrustes), `P Qᵀ` from the thin SVD `a = P Σ Qᵀ`. TSV-M replaces its concatenated singular-vector blocks by
//! theirs; Iso-C's merged update is mean(σ) times the polar factor of the summed task vectors.

use faer::{Mat, MatRef, Par};

use super::svd::no_convergence;
use super::{narrow, pin, widen, Cancel, NEVER};
use crate::error::Result;

/// `P Qᵀ` of `a` (m × c). Columns of `a` in its null space (e.g. TSV-M's unfilled slots) get some orthonormal
/// completion: any choice is a nearest orthonormal matrix, and callers weight those directions by zero.
pub fn polar(a: MatRef<'_, f32>) -> Result<Mat<f32>> {
    polar_cancellable(a, &NEVER)
}

/// [`polar`], checking `cancel` before and after faer's SVD (the one long step, not itself interruptible).
pub fn polar_cancellable(a: MatRef<'_, f32>, cancel: &Cancel) -> Result<Mat<f32>> {
    if a.nrows() < a.ncols() {
        // The polar factor of a wide matrix is the transpose of its transpose's.
        return Ok(polar_cancellable(a.transpose(), cancel)?.transpose().to_owned());
    }
    // In f64 throughout (see `svd::exact`): the factor is then orthonormal to f32 rounding.
    pin();
    if a.nrows() == 0 || a.ncols() == 0 {
        return Ok(Mat::zeros(a.nrows(), a.ncols()));
    }
    let wide = widen(a);
    cancel.check()?;
    let svd = wide.thin_svd().map_err(no_convergence)?;
    cancel.check()?;
    let mut p = Mat::<f64>::zeros(a.nrows(), a.ncols());
    faer::linalg::matmul::matmul(p.as_mut(), faer::Accum::Replace, svd.U(), svd.V().transpose(), 1.0, Par::rayon(0));
    Ok(narrow(p.as_ref()))
}
