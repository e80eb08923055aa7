//! One memory-mapped safetensors file. The header is parsed and validated by the `safetensors` crate (offsets
//! contiguous, sizes consistent with dtype×shape, file not truncated); tensors are then borrowed straight from
//! the map, never copied whole.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::dtype::DType;
use crate::error::{CoreError, Result};

/// Where one tensor lives in its file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The safetensors dtype name (`F32`, `BF16`, `I64`, ...): unsupported dtypes are kept so they can be reported.
    pub dtype_name: String,
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// Byte range in the file (absolute, header included).
    pub start: usize,
    pub end: usize,
}

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    tensors: HashMap<String, TensorEntry>,
    /// Tensor names in data-offset order: reading in this order is sequential on disk.
    order: Vec<String>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| CoreError::input(path, format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| CoreError::input(path, format!("cannot stat: {e}")))?.len();
        if len < 8 {
            return Err(CoreError::input(path, format!("not a safetensors file: only {len} bytes")));
        }
        // SAFETY: the map is read-only; a file truncated under us while mapped would fault, as with any mmap
        // reader (safetensors, torch). We never write through it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CoreError::input(path, format!("cannot mmap: {e}")))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            // The crate's message may name a tensor picked from a hash map (so it changes from run to run); our
            // own diagnosis names the first offending tensor in offset order.
            let msg = match diagnose(&mmap) {
                Some(t) => format!(
                    "corrupt safetensors header: tensor '{t}' has data offsets that do not match its \
                                    dtype and shape, overlap another tensor, or run past the end of the file"
                ),
                None => format!("corrupt or truncated safetensors header: {e}"),
            };
            CoreError::input(path, msg)
        })?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        let mut order: Vec<(usize, String)> = Vec::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            order.push((s, name.clone()));
            tensors.insert(
                name,
                TensorEntry {
                    dtype_name: info.dtype.to_string(),
                    dtype: DType::from_safetensors(info.dtype),
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                },
            );
        }
        order.sort();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap: Some(mmap),
            tensors,
            order: order.into_iter().map(|(_, n)| n).collect(),
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &HashMap<String, TensorEntry> {
        &self.tensors
    }

    pub fn names_in_file_order(&self) -> &[String] {
        &self.order
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| CoreError::tensor(&self.path, name, "tensor not found in this file"))
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap.as_ref().expect("mapped")[entry.start..entry.end]
    }

    /// A supported-dtype tensor with the expected shape, or an error naming the file and tensor.
    pub fn checked(&self, name: &str, shape: &[usize]) -> Result<(&[u8], DType)> {
        let e = self.entry(name)?;
        let dtype = e.dtype.ok_or_else(|| {
            CoreError::tensor(
                &self.path,
                name,
                format!("unsupported dtype {} (ferromerge merges F32, F16 and BF16)", e.dtype_name),
            )
        })?;
        if e.shape != shape {
            return Err(CoreError::tensor(
                &self.path,
                name,
                format!("shape {:?} does not match the expected {:?}", e.shape, shape),
            ));
        }
        Ok((self.bytes(e), dtype))
    }

    /// Tell the kernel we are done with a tensor's pages, so resident memory stays flat on huge models.
    pub fn release(&self, entry: &TensorEntry) {
        release(self.bytes(entry));
    }

    /// Ask the kernel to start reading a range we will need soon.
    pub fn prefetch(&self, entry: &TensorEntry) {
        will_need(self.bytes(entry));
    }
}

const PAGE: usize = 4096;

/// Unmap the whole pages inside `bytes`, which must lie in a read-only, shared file map (as every
/// `SafetensorsFile` is): the pages stay in the page cache and are re-read from it (or the file) if touched again.
/// Never call this on anonymous memory, where MADV_DONTNEED would discard the contents.
pub fn release(bytes: &[u8]) {
    #[cfg(unix)]
    {
        let addr = bytes.as_ptr() as usize;
        let start = addr.div_ceil(PAGE) * PAGE;
        let end = (addr + bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: advice on whole pages inside a live read-only file map (see above); no memory is freed
            // that Rust still owns.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// Start reading the pages that hold `bytes` (advice only).
pub fn will_need(bytes: &[u8]) {
    #[cfg(unix)]
    {
        let addr = bytes.as_ptr() as usize;
        let start = addr / PAGE * PAGE;
        let end = addr + bytes.len();
        if end > start {
            // SAFETY: advice only; WILLNEED never changes contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_WILLNEED) };
        }
    }
}

/// Which tensor makes a header invalid, when the `safetensors` crate's error does not say: the first (in offset
/// order) whose byte range does not match its dtype and shape, overlaps the previous one, or runs past the file.
fn diagnose(buf: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = buf.len() - 8 - n;
    let mut entries: Vec<(u64, u64, &str, &serde_json::Value)> = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(k, v)| {
            let off = v.get("data_offsets")?.as_array()?;
            Some((off.first()?.as_u64()?, off.get(1)?.as_u64()?, k.as_str(), v))
        })
        .collect();
    entries.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    // A tensor wrong on its own (size or range) first; only then one that leaves a gap or overlaps.
    for &(s, e, name, v) in &entries {
        let dtype: Option<safetensors::Dtype> = serde_json::from_value(v.get("dtype")?.clone()).ok();
        let numel = v.get("shape")?.as_array()?.iter().try_fold(1u64, |a, d| a.checked_mul(d.as_u64()?));
        let size = match (dtype, numel) {
            (Some(d), Some(n)) => n.checked_mul(d.bitsize() as u64).map(|b| b / 8),
            _ => None,
        };
        if e < s || e > data_len as u64 || size != Some(e - s) {
            return Some(name.to_string());
        }
    }
    let mut pos = 0u64;
    for &(s, e, name, _) in &entries {
        if s != pos {
            return Some(name.to_string());
        }
        pos = e;
    }
    None
}
