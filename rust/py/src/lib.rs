//! `ferromerge._core`: the Python face of ferromerge-core. This crate only converts types, releases the GIL
//! around every piece of I/O or compute, and maps errors; all logic lives in the core. Its files mirror the core:
//! `merge` (plans, in-memory merges, the method table, the memory plan), `external_merge` (a Python merge the
//! executor consults), `io` (safetensors), `codec` (dtype encoding), `linalg` (SVD, polar), `disjoint` (PEFT's
//! TIES election, for adapter merges), with `arrays` (NumPy in and out), `values` (Python objects read by the
//! plan's serde types) and `errors`.

// `#[pyfunction]` arguments are extracted owned from Python objects; borrowing them instead is not an option.
#![allow(clippy::needless_pass_by_value)]

mod arrays;
mod codec;
mod disjoint;
mod errors;
mod external_merge;
mod io;
mod linalg;
mod merge;
mod values;

/// A `pthread_atfork` child handler: a process forked after using the engine's thread pools (multiprocessing's
/// fork start method) must not hand work to pools whose threads were not copied; parallelism is turned off there
/// (as the tokenizers binding does).
extern "C" fn child_after_fork() {
    ferromerge_core::pool::disable_after_fork();
}

#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::errors::{InputError, MergeError, OutputError, ParameterError};

    #[pymodule_export]
    use crate::merge::{execute_plan, memory_plan, merge_arrays, methods};

    #[pymodule_export]
    use crate::io::{read_header, read_metadata, save_file};

    #[pymodule_export]
    use crate::codec::{decode, encode};

    #[pymodule_export]
    use crate::linalg::{polar, svd};

    #[pymodule_export]
    use crate::disjoint::disjoint_mean;

    /// The smallest memory budget a run accepts.
    #[pymodule_export]
    const MIN_MEMORY_LIMIT: u64 = ferromerge_core::exec::MIN_MEMORY_LIMIT;

    /// The memory budget a run uses when none is given.
    #[pyfunction]
    fn default_memory_limit() -> u64 {
        ferromerge_core::exec::default_memory_limit()
    }

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // SAFETY: registering a handler that only stores an atomic flag (async-signal-safe).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(super::child_after_fork)) };
        if rc != 0 {
            return Err(pyo3::exceptions::PyOSError::new_err(format!("pthread_atfork failed ({rc})")));
        }
        Ok(())
    }
}
