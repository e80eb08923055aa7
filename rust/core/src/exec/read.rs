//! Reading inputs for the executor besides the merges' own streaming reads (`merge::passes`): pieces of
//! byte-for-byte copies (non-float tensors and unscaled float passthroughs), read straight into the output's
//! staging buffer, and read-ahead advice for the disk (the next tensor's ranges, so a cold read overlaps the merge
//! of this one as a memory map's read-ahead did).

use crate::dtype::{self, DType};
use crate::error::Result;
use crate::io::{SafetensorsFile, TensorEntry};
use crate::merge::{Data, Job};

/// Read bytes `[at, at + buf.len())` of a tensor's stored data into `buf`, as they are; for a float tensor
/// (`float`), count its NaN and infinite values among them (returned as (NaN, infinite); (0, 0) otherwise).
pub(crate) fn copy_piece(
    file: &SafetensorsFile,
    name: &str,
    entry: &TensorEntry,
    float: Option<DType>,
    at: usize,
    buf: &mut [u8],
) -> Result<(u64, u64)> {
    file.read_at(name, entry, at, buf)?;
    Ok(float.map_or((0, 0), |dt| dtype::count_nonfinite(dt, buf)))
}

/// Ask the kernel to start reading a job's file sources (advice only).
pub(crate) fn prefetch(job: &Job) {
    for src in job.sources() {
        if let Data::File { file, entry, .. } = src.data {
            file.prefetch(entry);
        }
    }
}
