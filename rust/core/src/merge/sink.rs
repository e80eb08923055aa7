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

    /// Elements per window when the sink takes a tensor's output in order, a window at a time (a staging buffer
    /// far smaller than the tensor): the final pass then merges window after window, each of whole chunks in
    /// parallel, announcing each with [`begin_window`](Self::begin_window) and closing it with
    /// [`end_window`](Self::end_window). `None`: any order, the whole tensor at once.
    fn window_elems(&self) -> Option<usize> {
        None
    }

    /// The elements `[start, start + len)` are put next, and no others until [`end_window`](Self::end_window).
    ///
    /// # Errors
    /// The sink's own failure (making room for the window).
    fn begin_window(&self, _start: usize, _len: usize) -> Result<()> {
        Ok(())
    }

    /// Where the encoded bytes of the elements from `elem_start` on (`len` bytes, a chunk of the open window) may be
    /// written in place, when the sink holds them in memory: the final pass encodes straight into it instead of
    /// into a buffer it then puts (a copy of the whole output saved). `None`: use [`put`](Self::put).
    ///
    /// # Safety
    /// The caller writes only through the slice, before the window ends, and asks for disjoint ranges only (one
    /// chunk, one worker), as with [`put`](Self::put).
    #[allow(clippy::mut_from_ref)] // disjoint ranges of memory the sink owns, handed to one worker each
    unsafe fn place(&self, _elem_start: usize, _len: usize) -> Option<&mut [u8]> {
        None
    }

    /// Every element of the window has been put.
    ///
    /// # Errors
    /// The sink's own failure (handing the window on to be written).
    fn end_window(&self) -> Result<()> {
        Ok(())
    }
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
        // SAFETY: the range is this put's own, disjoint from every other concurrent put (see the Sync impl).
        unsafe { self.place(elem_start, bytes.len()) }.expect("in memory").copy_from_slice(bytes);
        Ok(())
    }

    unsafe fn place(&self, elem_start: usize, len: usize) -> Option<&mut [u8]> {
        let off = elem_start * self.elem_size;
        assert!(off + len <= self.len, "sink range out of bounds");
        // SAFETY: in bounds (checked above); disjoint from every other range asked for (the trait's contract).
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) })
    }
}
