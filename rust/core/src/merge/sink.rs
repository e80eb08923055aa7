//! Where merged bytes go: the [`Sink`] trait the passes write through, and [`SliceSink`], one in-memory buffer.

use crate::dtype::DType;
use crate::error::Result;

/// Receives encoded output bytes for `[elem_start, elem_start + n)`; called from worker threads on disjoint ranges.
pub trait Sink: Sync {
    /// Store the encoded bytes of the elements from `elem_start` on.
    ///
    /// # Errors
    /// The sink's own failure (an output write).
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()>;
}

/// A sink into one contiguous output buffer (in-memory merges).
pub struct SliceSink {
    ptr: *mut u8,
    len: usize,
    elem_size: usize,
}

// SAFETY: `merge` hands every chunk to exactly one worker and chunks never overlap, so concurrent `put`s write
// disjoint byte ranges of a buffer that outlives the merge (the borrow in `SliceSink::new`).
unsafe impl Sync for SliceSink {}

impl SliceSink {
    pub fn new(out: &mut [u8], dtype: DType) -> Self {
        Self::with_elem_size(out, dtype.size())
    }

    /// A sink whose elements are `elem_size` bytes (1 for a byte-for-byte copy).
    pub fn with_elem_size(out: &mut [u8], elem_size: usize) -> Self {
        SliceSink { ptr: out.as_mut_ptr(), len: out.len(), elem_size }
    }
}

impl Sink for SliceSink {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()> {
        let off = elem_start * self.elem_size;
        assert!(off + bytes.len() <= self.len, "sink range out of bounds");
        // SAFETY: in bounds (checked above) and disjoint from every other concurrent put (see the Sync impl).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
        Ok(())
    }
}
