//! The torch hand-off: a Python callable consulted by the executor before the kernels (see
//! `ferromerge_core::exec::External` and `python/ferromerge/torch_path.py`). It is called with the tensor's
//! name, method, shape, parameters, seed, input count and a `load(i)` function (i = -1: the base) that decodes
//! one input to a fresh float32 array, so Python holds at most what it asks for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

use ferromerge_core::exec::External;
use ferromerge_core::merge::{self, Job};
use ferromerge_core::{CoreError, Result};

use crate::errors::to_py;

pub struct PyHook {
    pub hook: Py<PyAny>,
    /// An exception raised by the hook, re-raised as itself once the run has unwound.
    pub raised: Mutex<Option<PyErr>>,
}

/// A `Job` pointer the loader may follow only while `live` is set (during the hook call it was made for).
struct JobPtr(*const Job<'static>);
// SAFETY: the pointer is only dereferenced while `live` is true, i.e. inside `PyHook::merge`, whose caller keeps
// the job alive and does not mutate it; Job's data is plain shared bytes.
unsafe impl Send for JobPtr {}
unsafe impl Sync for JobPtr {}

impl JobPtr {
    /// SAFETY: only while the hook call that made this pointer is running (see above).
    unsafe fn get(&self) -> &Job<'static> {
        &*self.0
    }
}

impl PyHook {
    fn call(&self, py: Python<'_>, job: &Job) -> PyResult<Option<Vec<f32>>> {
        let live = Arc::new(AtomicBool::new(true));
        // SAFETY (lifetime erasure): see JobPtr; `live` is cleared before this function returns.
        let ptr = JobPtr(job as *const Job as *const Job<'static>);
        let flag = live.clone();
        let shape = job.shape.clone();
        let load = PyCFunction::new_closure(
            py,
            None,
            Some(c"load(i): input i (-1: the base) decoded to a new float32 array"),
            move |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<Py<PyAny>> {
                let py = args.py();
                if !flag.load(Ordering::SeqCst) {
                    return Err(PyRuntimeError::new_err("load() called after the hook returned"));
                }
                let i: isize = args.get_item(0)?.extract()?;
                // SAFETY: live is set, so the job is alive (see JobPtr).
                let job = unsafe { ptr.get() };
                let which = if i < 0 { None } else { Some(i as usize) };
                let data = py.detach(|| merge::decode(job, which)).map_err(to_py)?;
                Ok(PyArray1::from_vec(py, data).reshape(shape.clone())?.into_any().unbind())
            },
        )?;
        let params = PyDict::new(py);
        let p = &job.spec.params;
        for (k, v) in [
            ("alpha", p.alpha),
            ("exact_svd", f64::from(u8::from(p.exact_svd))),
            ("oversample", p.oversample as f64),
            ("power_iters", p.power_iters as f64),
            ("common_space_fraction", p.common_space_fraction),
            ("eta", p.eta),
            ("mean_only", f64::from(u8::from(p.mean_only))),
        ] {
            params.set_item(k, v)?;
        }
        let result = self.hook.call1(
            py,
            (job.name, job.spec.method.name(), job.shape.clone(), params, job.spec.seed, job.inputs.len(), load),
        );
        live.store(false, Ordering::SeqCst);
        let out = result?;
        if out.is_none(py) {
            return Ok(None);
        }
        let arr: PyReadonlyArrayDyn<'_, f32> = out.extract(py).map_err(|_| {
            PyValueError::new_err(format!("tensor '{}': the torch hook must return a float32 array or None", job.name))
        })?;
        if arr.shape() != job.shape.as_slice() {
            return Err(PyValueError::new_err(format!(
                "tensor '{}': the torch hook returned shape {:?}, expected {:?}",
                job.name,
                arr.shape(),
                job.shape
            )));
        }
        Ok(Some(arr.as_array().iter().copied().collect()))
    }
}

impl External for PyHook {
    fn merge(&self, job: &Job) -> Result<Option<Vec<f32>>> {
        Python::attach(|py| {
            self.call(py, job).map_err(|e| {
                *self.raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                CoreError::Interrupted
            })
        })
    }
}
