//! One safetensors file, read with positioned reads (`pread`), never memory-mapped: a file truncated while a merge
//! reads it gives a short read, which is an error naming the file and the tensor, where a map would kill the process
//! with SIGBUS; and large reads into reusable buffers cost a copy, where a map costs a page fault per 4 KiB.
//!
//! The header is parsed and validated by the `safetensors` crate's `Metadata` (offsets contiguous, sizes consistent
//! with dtype×shape) and checked against the file's size. The file's identity (size, mtime, device, inode) is
//! recorded at open; [`SafetensorsFile::check_unchanged`] tells whether the file was replaced or rewritten since.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use safetensors::tensor::Metadata;

use crate::dtype::DType;
use crate::error::{CoreError, Result};

/// The largest header the `safetensors` crate accepts (its `MAX_HEADER_SIZE`).
const MAX_HEADER: u64 = 100_000_000;

/// Where one tensor lives in its file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The safetensors dtype name (`F32`, `BF16`, `I64`, ...): kept for every dtype, so that non-float tensors
    /// can be copied and unsupported ones reported.
    pub dtype_name: String,
    /// The dtype when it is one the kernels merge (F32, F16, BF16).
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// Byte range in the file (absolute, header included).
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What identifies a file's contents cheaply: a rewrite in place changes the size or the modification time, a
/// replacement (a new file renamed over the old one) the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Self {
        Identity {
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    identity: Identity,
    tensors: HashMap<String, TensorEntry>,
    /// Tensor names in data-offset order: reading in this order is sequential on disk.
    order: Vec<String>,
    metadata: HashMap<String, String>,
    /// The first read failure seen by a streaming pass, which has no error path of its own (see
    /// [`SafetensorsFile::read_into`]); the executor takes it after each tensor.
    fault: Mutex<Option<CoreError>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        // Checked before opening too: opening a FIFO for reading would wait for a writer forever.
        let kind = std::fs::metadata(path).map_err(|e| CoreError::input(path, format!("cannot open: {e}")))?;
        if !kind.is_file() {
            return Err(CoreError::input(path, "not a regular file (a directory, FIFO or device)"));
        }
        let file = File::open(path).map_err(|e| CoreError::input(path, format!("cannot open: {e}")))?;
        let meta = file.metadata().map_err(|e| CoreError::input(path, format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(CoreError::input(path, "not a regular file (a directory, FIFO or device)"));
        }
        let identity = Identity::of(&meta);
        let len = identity.size;
        if len < 8 {
            return Err(CoreError::input(path, format!("not a safetensors file: only {len} bytes")));
        }
        let read = |buf: &mut [u8], off: u64| {
            file.read_exact_at(buf, off).map_err(|e| CoreError::input(path, format!("cannot read the header: {e}")))
        };
        let mut n8 = [0u8; 8];
        read(&mut n8, 0)?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_HEADER || n > len - 8 {
            return Err(CoreError::input(
                path,
                format!("corrupt or truncated safetensors header: it claims {n} bytes in a file of {len}"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        read(&mut header, 8)?;
        let data_len = len - 8 - n;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| {
            // The crate's message may name a tensor picked from a hash map (so it changes from run to run); our
            // own diagnosis names the first offending tensor in offset order.
            let msg = match diagnose(&header, data_len) {
                Some(t) => format!(
                    "corrupt safetensors header: tensor '{t}' has data offsets that do not match its \
                                    dtype and shape, overlap another tensor, or run past the end of the file"
                ),
                None => format!("corrupt or truncated safetensors header: {e}"),
            };
            CoreError::input(path, msg)
        })?;
        if meta.data_len() as u64 != data_len {
            let msg = match diagnose(&header, data_len) {
                Some(t) => format!("corrupt safetensors header: tensor '{t}' runs past the end of the file"),
                None => format!(
                    "truncated or padded: the header describes {} bytes of data, the file holds {data_len}",
                    meta.data_len()
                ),
            };
            return Err(CoreError::input(path, msg));
        }
        let data_start = 8 + n as usize;
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
            file,
            identity,
            tensors,
            order: order.into_iter().map(|(_, n)| n).collect(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            fault: Mutex::new(None),
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

    /// The file's identity when it was opened.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| CoreError::tensor(&self.path, name, "tensor not found in this file"))
    }

    /// A supported-dtype tensor with the expected shape, or an error naming the file and tensor.
    pub fn checked(&self, name: &str, shape: &[usize]) -> Result<(&TensorEntry, DType)> {
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
        Ok((e, dtype))
    }

    /// Read `buf.len()` bytes of tensor `name` (whose entry is `entry`) from byte `offset` within it. A short read
    /// (the file shrank) or an I/O error is an input error naming the file and the tensor, and says when the file
    /// changed since it was opened.
    pub fn read_at(&self, name: &str, entry: &TensorEntry, offset: usize, buf: &mut [u8]) -> Result<()> {
        let in_range = offset.checked_add(buf.len()).is_some_and(|end| end <= entry.len());
        if !in_range {
            return Err(CoreError::tensor(&self.path, name, "read outside the tensor's data"));
        }
        self.file.read_exact_at(buf, (entry.start + offset) as u64).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file ended before the tensor's data (was it truncated while the merge was reading it?)".to_string()
            } else {
                format!("cannot read: {e}")
            };
            match self.check_unchanged() {
                Err(changed) => CoreError::tensor(&self.path, name, format!("{changed}; {why}")),
                Ok(()) => CoreError::tensor(&self.path, name, why),
            }
        })
    }

    /// [`read_at`](Self::read_at) for streaming passes, which cannot return an error: a failure is recorded (the
    /// first one wins, see [`take_fault`](Self::take_fault)) and `buf` is zeroed.
    pub fn read_into(&self, name: &str, entry: &TensorEntry, offset: usize, buf: &mut [u8]) {
        if let Err(e) = self.read_at(name, entry, offset, buf) {
            buf.fill(0);
            let mut slot = self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slot.get_or_insert(e);
        }
    }

    /// The read failure a streaming pass recorded, if any.
    pub fn take_fault(&self) -> Option<CoreError> {
        self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// A tensor's bytes, read whole (tests, small tensors).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        let mut out = vec![0u8; e.len()];
        self.read_at(name, e, 0, &mut out)?;
        Ok(out)
    }

    /// Whether the file is still the one that was opened: the path names the same inode, and neither its size nor
    /// its modification time moved. An input error naming the file otherwise.
    pub fn check_unchanged(&self) -> Result<()> {
        let now_fd = self.file.metadata().map(|m| Identity::of(&m));
        let now_path = std::fs::metadata(&self.path).map(|m| Identity::of(&m));
        let was = self.identity;
        let what = match (now_fd, now_path) {
            (Ok(fd), Ok(p)) if fd == was && p == was => return Ok(()),
            (_, Err(e)) => format!("it can no longer be found: {e}"),
            (Err(e), _) => format!("cannot stat: {e}"),
            (Ok(fd), Ok(p)) => {
                let now = if p == was { fd } else { p };
                let mut parts = Vec::new();
                if now.dev != was.dev || now.ino != was.ino {
                    parts.push("it was replaced by another file".to_string());
                }
                if now.size != was.size {
                    parts.push(format!("size {} -> {}", was.size, now.size));
                }
                if now.mtime_ns != was.mtime_ns {
                    parts.push("modification time moved".to_string());
                }
                parts.join(", ")
            }
        };
        Err(CoreError::input(&self.path, format!("changed while the merge was reading it ({what})")))
    }

    /// Ask the kernel to start reading a tensor we will need soon (advice only).
    pub fn prefetch(&self, entry: &TensorEntry) {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on a file descriptor we own; it never changes contents.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                entry.start as libc::off_t,
                entry.len() as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Which tensor makes a header invalid, when the `safetensors` crate's error does not say: the first (in offset
/// order) whose byte range does not match its dtype and shape, overlaps the previous one, or runs past the file.
fn diagnose(header: &[u8], data_len: u64) -> Option<String> {
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
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
        if e < s || e > data_len || size != Some(e - s) {
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
