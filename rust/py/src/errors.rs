//! The exception hierarchy of `ferromerge._core` and the mapping from core errors. The module path given to
//! `create_exception!` is the real, importable one, so the exceptions pickle (safetensors PR #753).

use ferromerge_core::CoreError;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt};
use pyo3::PyErr;

create_exception!(ferromerge._core, MergeError, PyException, "Base class of every error raised by the engine.");
create_exception!(
    ferromerge._core,
    InputError,
    MergeError,
    "A model file or tensor is missing, corrupt or incompatible; the message names the file and the tensor."
);
create_exception!(ferromerge._core, ParameterError, MergeError, "A method name or parameter value is invalid.");
create_exception!(ferromerge._core, OutputError, MergeError, "The output could not be written.");

/// Local newtype: the orphan rule forbids `impl From<CoreError> for PyErr` here.
pub struct PyCoreErr(pub CoreError);

impl From<CoreError> for PyCoreErr {
    fn from(e: CoreError) -> Self {
        PyCoreErr(e)
    }
}

impl From<PyCoreErr> for PyErr {
    fn from(e: PyCoreErr) -> PyErr {
        let msg = e.0.to_string();
        match e.0 {
            CoreError::Input { .. } | CoreError::Tensor { .. } => InputError::new_err(msg),
            CoreError::Parameter(_) => ParameterError::new_err(msg),
            CoreError::Output { .. } => OutputError::new_err(msg),
            CoreError::Interrupted => PyKeyboardInterrupt::new_err(msg),
        }
    }
}

pub fn to_py(e: CoreError) -> PyErr {
    PyCoreErr(e).into()
}
