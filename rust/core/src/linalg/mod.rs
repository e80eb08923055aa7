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
//!
//! Cancellation: the `*_cancellable` entry points take a [`Cancel`] that another thread may set (the Python
//! binding does when a signal arrives); it is checked between the solver's steps, and a cancelled call returns
//! [`Cancelled`], never a result. A step already under way (one faer product, QR or SVD) runs to its end.

pub mod gram;
mod polar;
mod svd;

pub use polar::{polar, polar_cancellable};
pub use svd::{exact, randomized, singular_values, truncated, truncated_cancellable, RankRule, Solver, Svd};

use std::sync::atomic::{AtomicBool, Ordering};

use faer::{Mat, MatMut, MatRef, Par};

use crate::error::{CoreError, Result};

/// A request to stop a factorization, set from any thread and checked by the solver between its steps.
#[derive(Debug, Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// Ask the computation to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once [`Cancel::cancel`] was called.
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(CoreError::External(Box::new(Cancelled)));
        }
        Ok(())
    }
}

/// What a cancelled computation returns (inside `CoreError::External`: the caller asked for the stop).
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// The `Cancel` of the entry points that cannot be cancelled.
pub(crate) static NEVER: Cancel = Cancel::new();

/// Tasks each factorization is split into, whatever the thread count (see the module docs).
pub const FACTOR_SPLIT: usize = 8;

/// How long an idle worker of faer's thread pool (the `spindle` crate) spins before it sleeps, in `pause`
/// instructions: spindle's default, 65536, is about a millisecond of busy waiting at every barrier of every
/// parallel loop, which on a shared or oversubscribed machine takes the core from the thread that has the work
/// (two threads on one core ran TSV-M 40% slower than one, 27% of their samples in spindle's waits). 1024 is
/// tens of microseconds: enough to catch a barrier a few microseconds away, nothing next to the millisecond-scale
/// products faer runs in parallel.
const FAER_SPIN_LIMIT: u32 = 1024;

/// Pin faer's factorizations to [`FACTOR_SPLIT`] tasks (idempotent; the core is the only faer user of the
/// process, and pinning is what makes factorizations independent of the thread count), and bound how long its
/// idle workers spin ([`FAER_SPIN_LIMIT`]; the `FERROMERGE_FAER_SPIN` environment variable overrides it, for
/// measuring).
pub(crate) fn pin() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let spin = std::env::var("FERROMERGE_FAER_SPIN").ok().and_then(|v| v.parse().ok()).unwrap_or(FAER_SPIN_LIMIT);
        spindle::SPIN_LIMIT.store(spin, std::sync::atomic::Ordering::Relaxed);
        faer::set_global_parallelism(Par::rayon(FACTOR_SPLIT));
    });
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

/// `a · b` in f64.
pub fn mul_f64(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), faer::Accum::Replace, a, b, 1.0f64, Par::rayon(0));
    out
}

/// An f32 matrix widened to f64.
pub fn widen(a: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| f64::from(a[(i, j)]))
}

/// An f64 matrix rounded to f32.
pub fn narrow(a: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Stream;

    fn cancelled(e: &CoreError) -> bool {
        matches!(e, CoreError::External(inner) if inner.is::<Cancelled>())
    }

    #[test]
    fn a_cancelled_factorization_is_an_error_and_an_unset_one_is_unchanged() {
        let (m, n) = (60, 40);
        let mut data = vec![0f32; m * n];
        Stream::new(1, "a", 0).normals(0, &mut data);
        let a = view(&data, m, n);
        let rule = RankRule { max: Some(5), ..RankRule::default() };
        let solvers =
            [Solver::Exact, Solver::Randomized { oversample: 5, power_iters: 2, stream: Stream::new(2, "a", 0) }];
        let stop = Cancel::new();
        stop.cancel();
        for solver in &solvers {
            assert!(cancelled(&truncated_cancellable(a, &rule, solver, &stop).err().unwrap()));
            let free = truncated_cancellable(a, &rule, solver, &Cancel::new()).unwrap();
            let plain = truncated(a, &rule, solver).unwrap();
            assert_eq!((free.u, free.s, free.v), (plain.u, plain.s, plain.v));
        }
        assert!(cancelled(&polar_cancellable(a, &stop).err().unwrap()));
        assert!(cancelled(&polar_cancellable(a.transpose(), &stop).err().unwrap()));
        assert_eq!(polar_cancellable(a, &Cancel::new()).unwrap(), polar(a).unwrap());
    }
}
