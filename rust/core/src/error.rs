//! The one error type of the core. Every variant that concerns an input names the file and, where there is
//! one, the tensor: users merge dozens of shards and must be told which one is broken.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A model file or tensor is missing, corrupt or incompatible.
    #[error("{file}: {msg}")]
    Input { file: PathBuf, msg: String },
    /// A tensor that exists but cannot be merged as asked (shape, dtype).
    #[error("{file}: tensor '{tensor}': {msg}")]
    Tensor { file: PathBuf, tensor: String, msg: String },
    /// A method or parameter value the kernels cannot run with.
    #[error("{0}")]
    Parameter(String),
    /// The output could not be written.
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    /// A failure of the caller's own code that the engine ran (a progress callback, an external merge, Ctrl-C
    /// seen by one), carried through unchanged so the caller gets its own error back.
    #[error("{0}")]
    External(Box<dyn std::error::Error + Send + Sync>),
    /// A bug: a kernel panicked. Caught at the merge's boundary so that it is an error, never an abort.
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

impl CoreError {
    pub fn input(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Input { file: file.into(), msg: msg.into() }
    }
    pub fn tensor(file: impl Into<PathBuf>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Tensor { file: file.into(), tensor: tensor.into(), msg: msg.into() }
    }
    pub fn param(msg: impl Into<String>) -> Self {
        Self::Parameter(msg.into())
    }
    pub fn output(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Output { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, CoreError>;
