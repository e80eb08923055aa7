//! `_core.svd` and `_core.polar`: the core's truncated SVD and polar factor on float32 NumPy matrices (used by
//! extract-lora and compress, and tested against NumPy's LAPACK).
//!
//! One SVD of a large matrix takes seconds to minutes, so it runs on a worker thread while the calling thread
//! (without the GIL) runs Python's signal handlers every [`POLL`]: a SIGINT/SIGTERM handler's exception is raised
//! here at once, as it is between tensors of a merge, and the worker is told to stop (see [`interruptible`]).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
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

/// A NumPy matrix's buffer, kept alive for a worker thread by a reference to its array: the worker may outlive
/// the call that started it (see [`interruptible`]), so it cannot borrow the buffer for the call's lifetime.
struct Shared {
    _array: Py<PyAny>,
    data: *const f32,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by the array, which `_array` keeps alive (NumPy frees or moves an
// array's data only when its last reference goes, and `resize` refuses a referenced array); the worker only reads
// it. Dropping `_array` away from the GIL defers the decref to pyo3's pool.
unsafe impl Send for Shared {}

impl Shared {
    fn new(array: &PyReadonlyArrayDyn<'_, f32>, data: &[f32]) -> Self {
        Shared { _array: array.as_any().clone().unbind(), data: data.as_ptr(), len: data.len() }
    }

    fn slice(&self) -> &[f32] {
        // SAFETY: see `Send` above; `data`/`len` came from a live slice of this array's buffer.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

/// `work` on a worker thread of its own that owns everything it uses (`'static`: the matrix comes as [`Shared`]),
/// while this thread, without the GIL, runs Python's signal handlers every [`POLL`]. When a handler raises, its
/// exception is returned at once, never a result: the worker is told to stop ([`Cancel`], checked between the
/// randomized solver's products and QRs) and is not waited for. It has to be this way for the exact path: faer's
/// SVD is one call that cannot be stopped (about 14 s on a 32000 × 1024 matrix, minutes on larger ones), and a
/// Ctrl-C or SIGTERM must not wait for it.
///
/// The trade-off: the abandoned worker runs its current step to the end in the background, on the same thread
/// pool, then drops its result, its memory (faer's workspace) and its reference to the input array. A process
/// that exits on the signal (the CLI) ends it with itself; a caller that catches the `KeyboardInterrupt` and goes
/// on shares the cores with it, and holds that memory, until that step is over, and should not write into the
/// input array meanwhile (the worker may still be reading it; its result is discarded either way).
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    work: impl FnOnce(&Cancel) -> Result<T, CoreError> + Send + 'static,
) -> PyResult<T> {
    let cancel = Arc::new(Cancel::new());
    let (done, ended) = mpsc::channel();
    let stop = Arc::clone(&cancel);
    // The worker drops `done` when it ends, normally or by a panic: the end of the wait either way.
    let worker = std::thread::Builder::new()
        .name("ferromerge-linalg".into())
        .spawn(move || {
            // The receiver is gone when the caller was interrupted: the result is dropped.
            let _ = done.send(work(&stop));
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the factorization's thread: {e}")))?;
    py.detach(move || loop {
        match ended.recv_timeout(POLL) {
            Ok(out) => return out.map_err(to_py),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(e) = Python::attach(|py| py.check_signals().err()) {
                    cancel.cancel();
                    return Err(e);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the worker sends its result before it ends"),
            },
        }
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
    let shared = Shared::new(&a, data);
    let name = name.to_owned();
    let out = interruptible(py, move |cancel| {
        let data = shared.slice();
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
    let shared = Shared::new(&a, data);
    let out = interruptible(py, move |cancel| {
        let data = shared.slice();
        if !linalg::all_finite(data) {
            return Err(CoreError::param("matrix has non-finite values"));
        }
        pool.install(|| linalg::polar_cancellable(linalg::view(data, m, n), cancel))
    })?;
    to_numpy(py, out.as_ref())
}
