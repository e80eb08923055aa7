//! The external merge: a Python callable consulted by the executor before the kernels (see
//! `ferromerge_core::exec::ExternalMerge`; ferromerge's own is the torch hand-off of the spectral methods,
//! `python/ferromerge/torch_spectral.py`). It is called with the tensor's name, method, shape, parameters, seed,
//! input count and a `load(i)` function (i = -1: the base) that decodes one input to a fresh float32 array, so
//! Python holds at most what it asks for. An exception it raises travels through the core as itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

use ferromerge_core::exec::ExternalMerge;
use ferromerge_core::merge::{self, params, Job, ParamDef, Params};
use ferromerge_core::Result;

use crate::errors::{external, to_py};

/// The Python callable of an external merge.
pub struct PyExternalMerge {
    pub callable: Py<PyAny>,
}

/// A `Job` pointer the loader may follow only while `live` is set (during the call it was made for).
struct JobPtr(*const Job<'static>);
// SAFETY: the pointer is only dereferenced while `live` is true, i.e. inside `PyExternalMerge::merge`, whose caller keeps
// the job alive and does not mutate it; Job's data is plain shared bytes.
unsafe impl Send for JobPtr {}
unsafe impl Sync for JobPtr {}

impl JobPtr {
    /// SAFETY: only while the call that made this pointer is running (see above).
    unsafe fn get(&self) -> &Job<'static> {
        unsafe { &*self.0 }
    }
}

impl PyExternalMerge {
    fn call(&self, py: Python<'_>, job: &Job) -> PyResult<Option<Vec<f32>>> {
        let live = Arc::new(AtomicBool::new(true));
        // SAFETY (lifetime erasure): see JobPtr; `live` is cleared before this function returns.
        let ptr = JobPtr(std::ptr::from_ref::<Job>(job).cast::<Job<'static>>());
        let flag = live.clone();
        let shape = job.shape.clone();
        let load = PyCFunction::new_closure(
            py,
            None,
            Some(c"load(i): input i (-1: the base) decoded to a new float32 array"),
            move |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<Py<PyAny>> {
                let py = args.py();
                if !flag.load(Ordering::SeqCst) {
                    return Err(PyRuntimeError::new_err("load() called after the external merge returned"));
                }
                let i: isize = args.get_item(0)?.extract()?;
                // SAFETY: live is set, so the job is alive (see JobPtr).
                let job = unsafe { ptr.get() };
                let which = if i < 0 { None } else { Some(i as usize) };
                let data = py.detach(|| merge::decode(job, which)).map_err(to_py)?;
                Ok(PyArray1::from_vec(py, data).reshape(shape.clone())?.into_any().unbind())
            },
        )?;
        let params = spectral_params(py, &job.spec.params)?;
        let result = self.callable.call1(
            py,
            (job.name, job.spec.method.name(), job.shape.clone(), params, job.spec.seed, job.inputs.len(), load),
        );
        live.store(false, Ordering::SeqCst);
        let out = result?;
        if out.is_none(py) {
            return Ok(None);
        }
        let arr: PyReadonlyArrayDyn<'_, f32> = out.extract(py).map_err(|_| {
            PyTypeError::new_err(format!("tensor '{}': the torch hook must return a float32 array or None", job.name))
        })?;
        if arr.shape() != job.shape.as_slice() {
            return Err(PyValueError::new_err(format!(
                "tensor '{}': the external merge (torch) returned shape {:?}, expected {:?}",
                job.name,
                arr.shape(),
                job.shape
            )));
        }
        Ok(Some(arr.as_array().iter().copied().collect()))
    }
}

/// The spectral parameters as the callable receives them (numbers; booleans as 0/1), named as in the plan; other
/// families' parameters are not handed off and give an empty dict.
fn spectral_params<'py>(py: Python<'py>, params: &Params) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if let Params::Spectral(p) = params {
        let entries: [(&ParamDef, f64); 7] = [
            (&params::SPECTRAL_ALPHA, p.alpha),
            (&params::EXACT_SVD, f64::from(u8::from(p.exact_svd))),
            (&params::OVERSAMPLE, p.oversample as f64),
            (&params::POWER_ITERS, p.power_iters as f64),
            (&params::COMMON_SPACE_FRACTION, p.common_space_fraction),
            (&params::ETA, p.eta),
            (&params::MEAN_ONLY, f64::from(u8::from(p.mean_only))),
        ];
        for (def, v) in entries {
            d.set_item(def.name, v)?;
        }
    }
    Ok(d)
}

impl ExternalMerge for PyExternalMerge {
    fn merge(&self, job: &Job) -> Result<Option<Vec<f32>>> {
        Python::attach(|py| self.call(py, job).map_err(external))
    }
}
