//! The exception hierarchy of `ferromerge._core` and the one mapping from core errors. The module path given to
//! `create_exception!` is the real, importable one, so the exceptions pickle (safetensors PR #753). A Python
//! exception raised by the caller's own code (a progress callback, an external merge, Ctrl-C) travels through the
//! core inside `CoreError::External` and comes out as itself.

use ferromerge_core::CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
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

/// The Python exception for a core error (the orphan rule forbids `impl From<CoreError> for PyErr` here).
pub fn to_py(e: CoreError) -> PyErr {
    let msg = e.to_string();
    match e {
        CoreError::Input { .. } | CoreError::Tensor { .. } => InputError::new_err(msg),
        CoreError::Parameter(_) => ParameterError::new_err(msg),
        CoreError::Output { .. } => OutputError::new_err(msg),
        CoreError::Internal(_) => MergeError::new_err(msg),
        CoreError::External(inner) => match inner.downcast::<PyErr>() {
            Ok(raised) => *raised,
            Err(other) => MergeError::new_err(other.to_string()),
        },
    }
}

/// A Python exception raised by the caller's code, carried through the core.
pub fn external(e: PyErr) -> CoreError {
    CoreError::External(Box::new(e))
}
