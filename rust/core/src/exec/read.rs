//! Reading inputs for the executor: whole tensors into reusable buffers (the tensors that fit the read-ahead
//! share), byte-for-byte copies of non-float tensors, and read-ahead advice for the disk (the next tensor's
//! ranges, so a cold read overlaps the merge of this one as a memory map's read-ahead did).
//!
//! The buffers are kept from tensor to tensor and only ever grow, so the process faults their pages in once (as
//! transparent huge pages where the kernel allows), not once per tensor as a fresh allocation or a memory map
//! would.

use rayon::prelude::*;

use crate::dtype::{self, DType};
use crate::error::Result;
use crate::io::{SafetensorsFile, TensorEntry};
use crate::merge::{Data, Job, Sink, Source};

/// One buffer per source of a tensor (base first), holding its stored bytes.
#[derive(Default)]
pub(crate) struct Held {
    bufs: Vec<Vec<u8>>,
}

impl Held {
    /// Read every file source of `job` whole. A short read (a truncated file) is an error naming the file and
    /// the tensor.
    ///
    /// The reads run in pieces on the current rayon pool: from the page cache they are memory copies, which one
    /// thread alone would make the bottleneck; from disk the kernel has usually read the tensor ahead already
    /// ([`prefetch`], issued while the previous tensor merged).
    pub(crate) fn fill(&mut self, job: &Job) -> Result<()> {
        const PIECE: usize = 4 << 20;
        for (i, src) in job.sources().enumerate() {
            if self.bufs.len() <= i {
                self.bufs.push(Vec::new());
            }
            if let Data::File { entry, .. } = src.data {
                grow(&mut self.bufs[i], entry.len());
            }
        }
        self.bufs.par_iter_mut().zip(job.sources().collect::<Vec<_>>()).try_for_each(|(buf, src)| {
            let Data::File { file, name, entry } = src.data else { return Ok(()) };
            buf[..entry.len()]
                .par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(k, piece)| file.read_at(name, entry, k * PIECE, piece))
        })
    }

    /// `job` over the bytes read by [`fill`](Self::fill).
    pub(crate) fn bind<'b, 'a: 'b>(&'b self, job: &Job<'a>) -> Job<'b> {
        let mut srcs = job.sources().zip(&self.bufs).map(|(src, buf)| match src.data {
            Data::File { entry, .. } => Source::mem(&buf[..entry.len()], src.dtype),
            Data::Mem(_) => *src,
        });
        let base = job.base.as_ref().map(|_| srcs.next().expect("one buffer per source"));
        let inputs: Vec<Source<'b>> = srcs.collect();
        job.rebind(base, &inputs)
    }
}

/// Grow `buf` to at least `n` bytes, asking for huge pages on a new allocation (advice only).
fn grow(buf: &mut Vec<u8>, n: usize) {
    if buf.len() >= n {
        return;
    }
    // Zeroed by the allocator, which maps large blocks fresh from the kernel (zero pages, not yet touched): no
    // memset pass over memory the reads are about to fill anyway.
    let mut fresh: Vec<u8> = vec![0; n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let addr = fresh.as_mut_ptr() as usize;
        let start = addr.div_ceil(HUGE) * HUGE;
        let end = (addr + n) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice on whole pages inside an allocation we own; contents unaffected.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    *buf = fresh;
}

/// Copy a tensor's stored bytes as they are, in pieces of a few MiB, into a sink of 1-byte elements; for a float
/// tensor (`float`), count its NaN and infinite values on the way (returned as (NaN, infinite); (0, 0) otherwise).
pub(crate) fn copy(
    file: &SafetensorsFile,
    name: &str,
    entry: &TensorEntry,
    float: Option<DType>,
    sink: &dyn Sink,
    buf: &mut Vec<u8>,
) -> Result<(u64, u64)> {
    const PIECE: usize = 8 << 20;
    grow(buf, PIECE.min(entry.len()));
    let mut at = 0;
    let mut counts = (0, 0);
    while at < entry.len() {
        let n = PIECE.min(entry.len() - at);
        file.read_at(name, entry, at, &mut buf[..n])?;
        if let Some(dt) = float {
            let (nan, inf) = dtype::count_nonfinite(dt, &buf[..n]);
            counts = (counts.0 + nan, counts.1 + inf);
        }
        sink.put(at, &buf[..n])?;
        at += n;
    }
    Ok(counts)
}

/// Ask the kernel to start reading a job's file sources (advice only).
pub(crate) fn prefetch(job: &Job) {
    for src in job.sources() {
        if let Data::File { file, entry, .. } = src.data {
            file.prefetch(entry);
        }
    }
}
