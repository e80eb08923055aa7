//! The polar factor: the matrix with orthonormal columns nearest to `a` in Frobenius norm (orthogonal
//! Procrustes), `P Qᵀ` from the thin SVD `a = P Σ Qᵀ`. TSV-M replaces its concatenated singular-vector blocks by
//! theirs; Iso-C's merged update is mean(σ) times the polar factor of the summed task vectors.

use faer::{Mat, MatRef};

use super::{exact, mul};
use crate::error::Result;

/// `P Qᵀ` of `a` (m × c). Columns of `a` in its null space (e.g. TSV-M's unfilled slots) get some orthonormal
/// completion: any choice is a nearest orthonormal matrix, and callers weight those directions by zero.
pub fn polar(a: MatRef<'_, f32>) -> Result<Mat<f32>> {
    if a.nrows() < a.ncols() {
        // The polar factor of a wide matrix is the transpose of its transpose's.
        return Ok(polar(a.transpose())?.transpose().to_owned());
    }
    let svd = exact(a)?;
    Ok(mul(svd.u.as_ref(), svd.v.as_ref().transpose()))
}
