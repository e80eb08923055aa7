//! The streaming passes every kernel is built from: decoding a chunk of the inputs (as stored or as deltas from
//! the base; from memory, or read from the file with a positioned read), fixed-block sums whose result does not depend on the chunking, and the final
//! pass that encodes merged values into a [`Sink`]. Also whole-tensor decoding, for the spectral methods and the
//! external merge (the torch hand-off).

use rayon::prelude::*;

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use super::{Data, Job, Options, Sink, Source, DEFAULT_CHUNK_ELEMS};
use crate::dtype::{self, DType};
use crate::error::{CoreError, Result};
use crate::kernels::combine::{self, Scratch};

/// Elements per block of whole-tensor dot products and sums (a fixed partition: results do not depend on chunks).
pub(crate) const STAT_BLOCK: usize = 1 << 16;

thread_local! {
    /// Each worker's buffer for the stored bytes of a chunk read from a file (reused: it only ever grows).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decode `out.len()` elements of `src` from `start`, after the job's cast. A NaN or infinity among the stored
/// values sets the job's flag (the check is part of the decode loop). A failed read (a file truncated under us)
/// is recorded with the file and decodes as zeros; the executor reports it after the tensor.
pub(crate) fn load(job: &Job, src: &Source, start: usize, out: &mut [f32]) {
    load_minus(job, src, start, out, None);
}

/// [`load`], then minus `base` when given: decoded and subtracted in one loop where the job's cast leaves the
/// source as it is (always, unless a `dtype:` narrows it), which gives the same values as the two steps.
fn load_minus(job: &Job, src: &Source, start: usize, out: &mut [f32], base: Option<&[f32]>) {
    let sz = src.dtype.size();
    // Widening casts are exact; only a narrower (or differently rounded) dtype changes values.
    let round = job.cast.filter(|&c| c != DType::F32 && c != src.dtype);
    let fused = if round.is_none() { base } else { None };
    let decode = |bytes: &[u8], out: &mut [f32]| match fused {
        Some(b) => dtype::decode_sub_checked(src.dtype, bytes, b, out),
        None => dtype::decode_checked(src.dtype, bytes, out),
    };
    let bad = match src.data {
        Data::Mem(bytes) => decode(&bytes[start * sz..(start + out.len()) * sz], out),
        Data::File { file, name, entry } => READ_BUF.with_borrow_mut(|buf| {
            let n = out.len() * sz;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            file.read_into(name, entry, start * sz, &mut buf[..n]);
            decode(&buf[..n], out)
        }),
    };
    if bad {
        job.nonfinite.store(true, Ordering::Relaxed);
    }
    if let Some(c) = round {
        dtype::round_to(c, out);
        if let Some(b) = base {
            combine::sub(out, b);
        }
    }
}

/// How many NaN and how many infinite values each stored input holds, base first (the slow, exact count run
/// when a pass has seen one).
///
/// # Errors
/// A read failure, naming the file and the tensor.
pub fn nonfinite_counts(job: &Job) -> Result<Vec<(u64, u64)>> {
    let mut counts = Vec::new();
    for src in job.sources() {
        let sz = src.dtype.size();
        let mut buf = vec![0u8; DEFAULT_CHUNK_ELEMS * sz];
        let (mut nan, mut inf) = (0u64, 0u64);
        for start in (0..job.numel).step_by(DEFAULT_CHUNK_ELEMS) {
            let len = DEFAULT_CHUNK_ELEMS.min(job.numel - start);
            let bytes = match src.data {
                Data::Mem(b) => &b[start * sz..(start + len) * sz],
                Data::File { file, name, entry } => {
                    file.read_at(name, entry, start * sz, &mut buf[..len * sz])?;
                    &buf[..len * sz]
                }
            };
            let (n, i) = dtype::count_nonfinite(src.dtype, bytes);
            nan += n;
            inf += i;
        }
        counts.push((nan, inf));
    }
    Ok(counts)
}

/// Decode chunk `[start, start+len)` of every input into `s.x` (as deltas from the base when there is one).
pub(crate) fn load_deltas(job: &Job, start: usize, len: usize, s: &mut Scratch) {
    s.resize(job.inputs.len(), len);
    if let Some(b) = &job.base {
        load(job, b, start, &mut s.base[..len]);
    }
    let base = job.base.is_some().then_some(&s.base[..len]);
    for (inp, x) in job.inputs.iter().zip(s.x.iter_mut()) {
        load_minus(job, &inp.src, start, &mut x[..len], base);
    }
}

/// Decode chunk `[start, start+len)` of the base into `s.base` and of every input into `s.x`, as stored.
pub(crate) fn load_raw(job: &Job, start: usize, len: usize, s: &mut Scratch) {
    s.resize(job.inputs.len(), len);
    if let Some(b) = &job.base {
        load(job, b, start, &mut s.base[..len]);
    }
    for (inp, x) in job.inputs.iter().zip(s.x.iter_mut()) {
        load(job, &inp.src, start, &mut x[..len]);
    }
}

/// `(start, len)` of each chunk of `size` elements over `n`, in parallel.
pub(crate) fn chunks(n: usize, size: usize) -> impl IndexedParallelIterator<Item = (usize, usize)> {
    let size = size.max(1);
    (0..n.div_ceil(size)).into_par_iter().map(move |c| (c * size, size.min(n - c * size)))
}

/// A chunk size rounded to whole rows (at least one row), for passes that need rows whole.
pub(crate) fn row_chunk(chunk: usize, row_len: usize) -> usize {
    (chunk / row_len).max(1) * row_len
}

/// Sums of per-block vectors over fixed blocks of `block` elements, added in block order (so independent of
/// threads); `f` computes one block's vector.
pub(crate) fn block_sums<F>(numel: usize, block: usize, width: usize, f: F) -> Vec<f64>
where
    F: Fn(&mut Scratch, usize, usize) -> Vec<f64> + Sync,
{
    let parts: Vec<Vec<f64>> = chunks(numel, block).map_init(Scratch::pooled, |s, (st, len)| f(s, st, len)).collect();
    let mut total = vec![0f64; width];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// The final pass: `f` fills `s.mixed[..len]` with the merged values of chunk `[start, start+len)`, which are
/// encoded to the output dtype and handed to the sink (a window of chunks at a time when the sink asks for it).
pub(crate) fn emit<F>(job: &Job, chunk: usize, sink: &dyn Sink, f: F) -> Result<()>
where
    F: Fn(&mut Scratch, usize, usize) + Sync,
{
    let out_size = job.out_dtype.size();
    let chunk = chunk.max(1);
    // Windows of whole chunks: the chunks (and so the bytes) are the same whatever the window.
    let window = sink.window_elems().map_or(job.numel, |w| (w / chunk).max(1) * chunk).max(1);
    for wstart in (0..job.numel).step_by(window) {
        let wlen = window.min(job.numel - wstart);
        sink.begin_window(wstart, wlen)?;
        chunks(wlen, chunk).try_for_each_init(Scratch::pooled, |s, (at, len)| {
            let s: &mut Scratch = s;
            let start = wstart + at;
            f(s, start, len);
            // SAFETY: this chunk's range, asked once, by this worker, inside the open window.
            if let Some(dst) = unsafe { sink.place(start, len * out_size) } {
                dtype::encode(job.out_dtype, &s.mixed[..len], dst);
                return Ok(());
            }
            s.bytes.resize(len * out_size, 0);
            dtype::encode(job.out_dtype, &s.mixed[..len], &mut s.bytes);
            sink.put(start, &s.bytes)
        })?;
        sink.end_window()?;
    }
    Ok(())
}

/// Write a whole tensor's merged values computed elsewhere (the torch hand-off), encoded like any merge.
///
/// # Errors
/// A parameter error when `values` does not hold the tensor's elements; the sink's errors.
pub fn emit_values(job: &Job, opts: &Options, values: &[f32], sink: &dyn Sink) -> Result<()> {
    if values.len() != job.numel {
        return Err(CoreError::param(format!(
            "tensor '{}': {} merged values for {} elements",
            job.name,
            values.len(),
            job.numel
        )));
    }
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        s.resize(0, len);
        s.mixed[..len].copy_from_slice(&values[start..start + len]);
    })
}

/// Input `i` of a job (`None`: the base) decoded whole to f32, after the job's cast.
///
/// # Errors
/// A parameter error when the job has no such input.
pub fn decode(job: &Job, input: Option<usize>) -> Result<Vec<f32>> {
    let src = match input {
        None => job.base.as_ref(),
        Some(i) => job.inputs.get(i).map(|x| &x.src),
    }
    .ok_or_else(|| CoreError::param(format!("tensor '{}': no input {input:?}", job.name)))?;
    Ok(load_whole(job, src))
}

/// One stored tensor of a job decoded whole to f32, after the job's cast (in parallel blocks; decoding is
/// elementwise, so the block size does not matter).
pub(crate) fn load_whole(job: &Job, src: &Source) -> Vec<f32> {
    let mut out = vec![0f32; job.numel];
    let chunk = DEFAULT_CHUNK_ELEMS;
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| load(job, src, c * chunk, o));
    out
}
