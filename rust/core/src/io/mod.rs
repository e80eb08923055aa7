//! Reading safetensors shards in place (mmap) and writing output shards with a precomputed header.
pub mod reader;
pub mod writer;

pub use reader::{SafetensorsFile, TensorEntry};
pub use writer::{write_safetensors, ShardLayout};
