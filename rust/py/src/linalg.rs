//! `_core.svd` and `_core.polar`: the core's truncated SVD and polar factor on float32 NumPy matrices (used by
//! extract-lora and compress, and tested against NumPy's LAPACK).
//!
//! One SVD of a large matrix takes seconds to minutes, so it runs on a worker thread while the calling thread
//! (without the GIL) runs Python's signal handlers every [`POLL`]: a SIGINT/SIGTERM handler's exception cancels
//! the factorization at its next step and is raised here, as it is between tensors of a merge.

use std::sync::mpsc;
use std::time::Duration;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use ferromerge_core::linalg::{self, Cancel, RankRule, Solver};
use ferromerge_core::merge::params;
use ferromerge_core::pool;
use ferromerge_core::rng::Stream;
use ferromerge_core::CoreError;

use crate::errors::{to_py, ParameterError};

type Matrix<'py> = Bound<'py, PyArray2<f32>>;

fn matrix<'a>(a: &'a PyReadonlyArrayDyn<'_, f32>, what: &str) -> PyResult<(&'a [f32], usize, usize)> {
    let shape = a.shape();
    if shape.len() != 2 {
        return Err(ParameterError::new_err(format!("{what} must be a matrix (2-D), got shape {shape:?}")));
    }
    // `as_slice` also accepts Fortran order, whose bytes are not the row-major matrix.
    let data = a
        .as_slice()
        .ok()
        .filter(|_| a.is_c_contiguous())
        .ok_or_else(|| PyValueError::new_err(format!("{what} must be a C-contiguous float32 matrix")))?;
    Ok((data, shape[0], shape[1]))
}

/// How often the Python signal handlers run while a factorization is under way.
const POLL: Duration = Duration::from_millis(50);

/// `work` on a worker thread of its own, cancelled when a Python signal handler raises; the handler's exception
/// is returned then (whatever the worker returns). The scope joins the worker before returning, so nothing it
/// borrows (the NumPy buffer) outlives this call.
fn interruptible<T: Send>(py: Python<'_>, work: impl FnOnce(&Cancel) -> Result<T, CoreError> + Send) -> PyResult<T> {
    let cancel = Cancel::new();
    py.detach(|| {
        std::thread::scope(|scope| {
            // The worker drops `done` when it ends, normally or by a panic: the end of the wait either way.
            let (done, ended) = mpsc::channel::<()>();
            let cancel = &cancel;
            let worker = scope.spawn(move || {
                let _done = done;
                work(cancel)
            });
            let mut raised = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(POLL) {
                if let Some(e) = Python::attach(|py| py.check_signals().err()) {
                    cancel.cancel();
                    raised = Some(e);
                    break;
                }
            }
            let out = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            match raised {
                Some(e) => Err(e),
                None => out.map_err(to_py),
            }
        })
    })
}

fn to_numpy<'py>(py: Python<'py>, a: faer::MatRef<'_, f32>) -> PyResult<Matrix<'py>> {
    let (m, n) = a.shape();
    PyArray1::from_vec(py, linalg::to_row_major(a)).reshape([m, n])
}

/// `(U, S, Vt)` of the triplets the rank rule keeps; see `ferromerge_core::linalg::RankRule`.
#[pyfunction]
#[pyo3(signature = (
    a, *, rank=None, fraction=None, energy=None, nuclear=None, exact=false, oversample=None, power_iters=None,
    seed=0, name="", sv_epsilon=0.0, threads=None
))]
#[allow(clippy::too_many_arguments)]
pub fn svd<'py>(
    py: Python<'py>,
    a: PyReadonlyArrayDyn<'py, f32>,
    rank: Option<usize>,
    fraction: Option<f64>,
    energy: Option<f64>,
    nuclear: Option<f64>,
    exact: bool,
    oversample: Option<usize>,
    power_iters: Option<usize>,
    seed: u64,
    name: &str,
    sv_epsilon: f64,
    threads: Option<usize>,
) -> PyResult<(Matrix<'py>, Bound<'py, PyArray1<f32>>, Matrix<'py>)> {
    let (data, m, n) = matrix(&a, "a")?;
    let rule = RankRule { max: rank, fraction, energy, nuclear, sv_epsilon };
    let solver = if exact {
        Solver::Exact
    } else {
        // The sketch defaults are tsv_m's (merge/params.rs): one home for both the merge and this function.
        Solver::Randomized {
            oversample: oversample.unwrap_or(params::OVERSAMPLE.default_value() as usize),
            power_iters: power_iters.unwrap_or(params::POWER_ITERS.default_value() as usize),
            stream: Stream::new(seed, name, 0),
        }
    };
    let pool = pool::pool(threads).map_err(to_py)?;
    let out = interruptible(py, |cancel| {
        if !linalg::all_finite(data) {
            return Err(CoreError::param(format!("matrix '{name}' has non-finite values")));
        }
        pool.install(|| linalg::truncated_cancellable(linalg::view(data, m, n), &rule, &solver, cancel))
    })?;
    let u = to_numpy(py, out.u.as_ref())?;
    let vt = to_numpy(py, out.v.as_ref().transpose())?;
    Ok((u, PyArray1::from_vec(py, out.s), vt))
}

/// The nearest matrix with orthonormal columns (rows, for a wide matrix): `U Vᵀ` of the thin SVD.
#[pyfunction]
#[pyo3(signature = (a, *, threads=None))]
pub fn polar<'py>(py: Python<'py>, a: PyReadonlyArrayDyn<'py, f32>, threads: Option<usize>) -> PyResult<Matrix<'py>> {
    let (data, m, n) = matrix(&a, "a")?;
    let pool = pool::pool(threads).map_err(to_py)?;
    let out = interruptible(py, |cancel| {
        if !linalg::all_finite(data) {
            return Err(CoreError::param("matrix has non-finite values"));
        }
        pool.install(|| linalg::polar_cancellable(linalg::view(data, m, n), cancel))
    })?;
    to_numpy(py, out.as_ref())
}
