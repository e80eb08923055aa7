//! Writing one tensor's chunks into its output file and pushing written ranges out of memory: writeback starts
//! as soon as a tensor is done (or per chunk, for tensors larger than the budget's share) and finishes one
//! tensor behind, dropping the range from the page cache so the output never accumulates in memory.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::Result;
use crate::io::writer::FileSink;
use crate::merge::Sink;

/// Writes one tensor's chunks at its offset in an output file.
pub(crate) struct TensorSink<'a> {
    pub(crate) file: FileSink<'a>,
    pub(crate) offset: u64,
    pub(crate) elem_size: u64,
    /// Start writing back each chunk at once (for tensors larger than the budget's share).
    pub(crate) eager: bool,
}

impl Sink for TensorSink<'_> {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()> {
        let off = self.offset + elem_start as u64 * self.elem_size;
        self.file.write_at(off, bytes)?;
        if self.eager {
            start_writeback(self.file.file, off, bytes.len() as u64);
        }
        Ok(())
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
