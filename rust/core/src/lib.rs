//! ferromerge-core: the streaming merge engine. Reads safetensors shards with positioned reads, merges tensors chunk by chunk
//! on a rayon pool with f32 math, and writes output shards in place. Knows nothing of Python: the `ferromerge-py`
//! crate binds it.

pub mod dtype;
pub mod error;
pub mod exec;
pub mod io;
pub mod kernels;
pub mod linalg;
pub mod math;
pub mod merge;
pub mod plan;
pub mod pool;
pub mod rng;

pub use dtype::DType;
pub use error::{CoreError, Result};
