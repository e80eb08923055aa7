//! Writing one tensor's chunks into its output file (with their CRC-32, for the file's checksum) and pushing written ranges out of memory: writeback starts
//! as soon as a tensor is done (or per chunk, for tensors larger than the budget's share) and finishes one
//! tensor behind, dropping the range from the page cache so the output never accumulates in memory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use crate::error::Result;
use crate::io::writer::FileSink;
use crate::merge::Sink;

/// Writes one tensor's chunks at its offset in an output file, and keeps the CRC-32 of each chunk so that the
/// file's checksum costs no second read (chunks arrive in any order, from any thread; [`Crc`] combines them).
pub(crate) struct TensorSink<'a> {
    file: FileSink<'a>,
    offset: u64,
    elem_size: u64,
    /// Start writing back each chunk at once (for tensors larger than the budget's share).
    eager: bool,
    crcs: Mutex<Vec<(u64, crc32fast::Hasher)>>,
}

impl<'a> TensorSink<'a> {
    pub(crate) fn new(file: FileSink<'a>, offset: u64, elem_size: usize, eager: bool) -> Self {
        TensorSink { file, offset, elem_size: elem_size as u64, eager, crcs: Mutex::new(Vec::new()) }
    }

    /// The CRC-32 state of everything written, in file order.
    pub(crate) fn finish(self) -> crc32fast::Hasher {
        let mut parts = self.crcs.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        parts.sort_unstable_by_key(|p| p.0);
        let mut all = crc32fast::Hasher::new();
        for (_, h) in &parts {
            all.combine(h);
        }
        all
    }
}

impl Sink for TensorSink<'_> {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()> {
        let off = self.offset + elem_start as u64 * self.elem_size;
        self.file.write_at(off, bytes)?;
        if self.eager {
            start_writeback(self.file.file, off, bytes.len() as u64);
        }
        let mut h = crc32fast::Hasher::new();
        h.update(bytes);
        self.crcs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((off, h));
        Ok(())
    }
}

/// The CRC-32 of one output file: its header, then each tensor's in file order.
pub(crate) struct Crc(crc32fast::Hasher);

impl Crc {
    pub(crate) fn new(header: &[u8]) -> Self {
        let mut h = crc32fast::Hasher::new();
        h.update(&(header.len() as u64).to_le_bytes());
        h.update(header);
        Crc(h)
    }

    pub(crate) fn push(&mut self, tensor: &crc32fast::Hasher) {
        self.0.combine(tensor);
    }

    pub(crate) fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// File offsets and lengths as the syscalls take them (`off_t`); output files are far below 2^63 bytes.
fn off_t(v: u64) -> libc::off_t {
    v as libc::off_t
}

/// Ask the kernel to start writing a range back (without waiting).
pub(crate) fn start_writeback(file: &File, off: u64, len: u64) {
    // SAFETY: plain syscalls on a file we own; failures only mean the kernel writes back later on its own.
    unsafe { libc::sync_file_range(file.as_raw_fd(), off_t(off), off_t(len), libc::SYNC_FILE_RANGE_WRITE) };
}

/// Wait until a written range is on disk, then drop it from the page cache.
pub(crate) fn finish_writeback(file: &File, off: u64, len: u64) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: as above; both calls are advisory for correctness (the final fsync makes the data durable).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off_t(off), off_t(len), flags);
        libc::posix_fadvise(file.as_raw_fd(), off_t(off), off_t(len), libc::POSIX_FADV_DONTNEED);
    }
}
