//! Reading safetensors shards with positioned reads and writing output shards with a precomputed header.
pub mod reader;
pub mod writer;

pub use reader::{Identity, SafetensorsFile, TensorEntry};
pub use writer::{write_safetensors, LayoutEntry, ShardLayout};
