//! Writing safetensors files whose header is known before any data exists. The layout (header, then tensors
//! contiguously in the given order, header padded with spaces to 8 bytes as the reference writer does) is
//! computed first; tensor data is then written at its offset, chunk by chunk and from any thread, with
//! positioned writes. Nothing is ever buffered whole. We write the header ourselves because the `safetensors`
//! crate only serialises tensors that already exist in memory.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::dtype::DType;
use crate::error::{CoreError, Result};

/// The byte layout of one output file.
#[derive(Clone, Debug)]
pub struct ShardLayout {
    pub header: Vec<u8>,
    /// Absolute file offset of each tensor's data, in the order given.
    pub offsets: Vec<u64>,
    pub total_len: u64,
}

/// One tensor of an output file: its name, safetensors dtype name (`BF16`, `I64`, ...), shape and size in bytes.
pub type LayoutEntry<'a> = (&'a str, &'a str, &'a [usize], u64);

impl ShardLayout {
    pub fn new(tensors: &[LayoutEntry], metadata: &BTreeMap<String, String>) -> Result<Self> {
        let mut obj = Map::new();
        if !metadata.is_empty() {
            obj.insert("__metadata__".into(), json!(metadata));
        }
        let mut rel = Vec::with_capacity(tensors.len());
        let mut pos = 0u64;
        for &(name, dtype, shape, bytes) in tensors {
            if obj.contains_key(name) {
                return Err(CoreError::param(format!("tensor '{name}' appears twice in one output file")));
            }
            let end = pos + bytes;
            obj.insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [pos, end]}));
            rel.push(pos);
            pos = end;
        }
        let mut header = serde_json::to_vec(&Value::Object(obj)).expect("json");
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let data_start = 8 + header.len() as u64;
        Ok(ShardLayout { offsets: rel.iter().map(|r| r + data_start).collect(), total_len: data_start + pos, header })
    }

    /// Create the file at its final size with the header in place; data is written later with `write_at`.
    pub fn create(&self, path: &Path) -> Result<File> {
        let err = |e: std::io::Error| CoreError::output(path, e.to_string());
        let mut f = File::create(path).map_err(err)?;
        f.set_len(self.total_len).map_err(err)?;
        f.write_all(&(self.header.len() as u64).to_le_bytes()).map_err(err)?;
        f.write_all(&self.header).map_err(err)?;
        Ok(f)
    }
}

/// Positioned writes into one output file, safe to call from many threads on disjoint ranges.
pub struct FileSink<'a> {
    pub file: &'a File,
    pub path: &'a Path,
}

impl FileSink<'_> {
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, offset).map_err(|e| CoreError::output(self.path, e.to_string()))
    }
}

/// Write a whole safetensors file from in-memory tensors, atomically (temporary file, then rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, DType, &[usize], &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let specs: Vec<LayoutEntry> = tensors.iter().map(|t| (t.0, t.1.st_name(), t.2, t.3.len() as u64)).collect();
    for (name, dtype, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if data.len() != n * dtype.size() {
            return Err(CoreError::param(format!(
                "tensor '{name}': {} bytes do not hold shape {shape:?} of {}",
                data.len(),
                dtype.name()
            )));
        }
    }
    let layout = ShardLayout::new(&specs, metadata)?;
    let mut tmp = PathBuf::from(path);
    tmp.set_file_name(format!(
        ".{}.partial-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let result = (|| {
        let f = layout.create(&tmp)?;
        let sink = FileSink { file: &f, path: &tmp };
        for ((_, _, _, data), off) in tensors.iter().zip(&layout.offsets) {
            sink.write_at(*off, data)?;
        }
        f.sync_all().map_err(|e| CoreError::output(&tmp, e.to_string()))?;
        fs::rename(&tmp, path).map_err(|e| CoreError::output(path, e.to_string()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
