//! Dense linear algebra for the spectral methods (TSV-M, Iso-C/CTS, STAR) and LoRA extraction, on faer:
//! exact and randomized truncated SVD (`svd`), the polar factor (`polar`), and rank rules.
//!
//! Determinism: faer's factorizations (QR, SVD, eigen) split their work by the parallelism they are given, and
//! their rounding follows the split; matrix products do not. Every factorization here therefore runs with one
//! fixed split ([`FACTOR_SPLIT`] tasks, faer's global parallelism setting, pinned by [`pin`] before any
//! factorization) on whatever rayon pool is current, so the bytes are the same at any thread count (checked by
//! the property tests). Runs on the same CPU family give the same bytes; faer picks
//! SIMD kernels at run time, so a machine with other vector units may round differently.
//!
//! Matrices arrive as row-major buffers (a PyTorch `(out, in)` weight), viewed without copying.

mod polar;
mod svd;

pub use polar::polar;
pub use svd::{exact, randomized, singular_values, truncated, RankRule, Solver, Svd};

use faer::{Mat, MatMut, MatRef, Par};

/// Tasks each factorization is split into, whatever the thread count (see the module docs).
pub const FACTOR_SPLIT: usize = 8;

/// Pin faer's factorizations to [`FACTOR_SPLIT`] tasks (idempotent; the core is the only faer user of the
/// process, and pinning is what makes factorizations independent of the thread count).
pub(crate) fn pin() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| faer::set_global_parallelism(Par::rayon(FACTOR_SPLIT)));
}

/// A row-major `m × n` buffer as a matrix view.
pub fn view(data: &[f32], m: usize, n: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, m, n)
}

/// A row-major `m × n` buffer as a mutable matrix view.
pub fn view_mut(data: &mut [f32], m: usize, n: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(data, m, n)
}

/// `a · b` (products are exact functions of their inputs at any thread count).
pub fn mul(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), faer::Accum::Replace, a, b, 1.0f32, Par::rayon(0));
    out
}

/// A matrix into a new row-major buffer.
pub fn to_row_major(a: MatRef<'_, f32>) -> Vec<f32> {
    let (m, n) = a.shape();
    let mut out = vec![0f32; m * n];
    view_mut(&mut out, m, n).copy_from(a);
    out
}

/// Whether every element is finite (an SVD of NaN or infinity does not converge or returns garbage).
pub fn all_finite(data: &[f32]) -> bool {
    data.iter().all(|x| x.is_finite())
}
