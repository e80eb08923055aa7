//! The memory budget of a run and everything derived from it: the default budget, the chunk size, and the
//! run's memory plan (read-ahead, scratch, working set, peak), which the executor follows and
//! `_core.memory_plan` reports to the estimate, so the figure has one home.
//!
//! Under a budget B: inputs are streamed chunk by chunk, never held whole (`exec`), and the next tensor's inputs
//! are advised to the kernel for reading ahead when they fit a quarter of B (that read-ahead lives in the page
//! cache); each worker holds (inputs + 5) f32 buffers of one chunk and one buffer for a chunk's stored bytes
//! (counted at 8 bytes an element, at most 4 in fact), all of them together within an eighth of B; a spectral
//! method adds its whole-matrix working set; the output is staged in two buffers (`writeback`), each holding a
//! window of a merge's final pass (four chunks of f32 output per worker, at least an 8 MiB stretch) plus a 4 KiB
//! block, at most a sixteenth of B, whatever the tensors' sizes. The resident peak is at most min(B, scratch +
//! largest working set + staging); the OS page cache is not counted.

use super::writeback::{ALIGN, STRETCH};
use crate::merge::DEFAULT_CHUNK_ELEMS;

/// The smallest memory budget a run accepts.
pub const MIN_MEMORY_LIMIT: u64 = 64 << 20;

/// f32 buffers each worker holds per chunk beyond one per input (base, mixed, total, divisor, probabilities).
const SCRATCH_BUFFERS: u64 = 5;

/// Bytes counted for an element of a worker's read buffer (the stored bytes of one input's chunk, read from its
/// file before they are decoded: `merge::passes`). An over-count: the widest dtype a merge decodes is F32
/// (`dtype::DType`), 4 bytes; non-float tensors are only ever copied, never read through this buffer.
const READ_BYTES: u64 = 8;

/// Elements per chunk for a budget: each worker holds (inputs + 5) f32 buffers of one chunk and a read buffer of
/// it, and all of them together stay within an eighth of the budget (between 1024 and the default chunk).
#[must_use]
pub fn chunk_elems(budget: u64, workers: usize, inputs: usize) -> usize {
    let fit = budget / 8 / (workers.max(1) as u64 * ((inputs as u64 + SCRATCH_BUFFERS) * 4 + READ_BYTES));
    DEFAULT_CHUNK_ELEMS.min(usize::try_from(fit).unwrap_or(usize::MAX).max(1024))
}

/// Half of what this process may use (physical memory, or the memory cgroup's limit when lower), at most 8 GiB.
#[must_use]
pub fn default_memory_limit() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ram = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) as u64 * libc::sysconf(libc::_SC_PAGESIZE) as u64 };
    let avail = cgroup_limit().map_or(ram, |c| c.min(ram));
    (avail / 2).min(8 << 30)
}

/// The memory limit of this process's cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`), if any.
fn cgroup_limit() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            continue;
        };
        if let Ok(v) = std::fs::read_to_string(file) {
            if let Ok(n) = v.trim().parse::<u64>() {
                return Some(n);
            }
        }
    }
    None
}

/// What one output tensor asks of memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorNeeds {
    /// Bytes of all its stored inputs, base included.
    pub input_bytes: u64,
    /// Its non-base inputs.
    pub inputs: usize,
    /// Bytes its method holds beyond the chunk buffers (`merge::working_bytes`).
    pub working_bytes: u64,
}

/// How a run uses its budget (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub budget: u64,
    pub chunk_elems: usize,
    /// The largest inputs of a tensor advised to the kernel for reading ahead while the previous tensor merges
    /// (page cache, not resident memory of the run).
    pub read_ahead: u64,
    /// Every worker's chunk buffers and read buffer.
    pub scratch: u64,
    /// The largest working set of a single tensor's method.
    pub working: u64,
    /// Both output staging buffers (twice [`stage_capacity`]).
    pub staging: u64,
    /// Index of the tensor with the most input bytes (the first of equals), and those bytes (streamed, not held).
    pub largest: usize,
    pub largest_input_bytes: u64,
    /// The bound on resident memory.
    pub peak: u64,
}

/// The memory plan of a run of `tensors` under `budget` with `workers` threads; `chunk_elems` overrides the
/// chunk size the budget gives (a plan's own `chunk_elems`).
#[must_use]
pub fn memory_plan(budget: u64, workers: usize, tensors: &[TensorNeeds], chunk_override: Option<usize>) -> MemoryPlan {
    // Every tensor has a base slot in the chunk buffers, used or not.
    let models = tensors.iter().map(|t| t.inputs + 1).max().unwrap_or(1);
    let chunk = chunk_override.unwrap_or_else(|| chunk_elems(budget, workers, models)).max(1);
    let buffers = workers as u64 * (models as u64 + SCRATCH_BUFFERS);
    let scratch = (buffers * 4 + workers as u64 * READ_BYTES) * chunk as u64;
    let read_ahead = budget / 4;
    let working = tensors.iter().map(|t| t.working_bytes).max().unwrap_or(0);
    let (largest, largest_input_bytes) = tensors.iter().enumerate().fold((0, 0), |best, (i, t)| {
        if i == 0 || t.input_bytes > best.1 {
            (i, t.input_bytes)
        } else {
            best
        }
    });
    let staging = 2 * stage_capacity(budget, workers, chunk) as u64;
    let peak = budget.min(scratch + working + staging);
    MemoryPlan { budget, chunk_elems: chunk, read_ahead, scratch, working, staging, largest, largest_input_bytes, peak }
}

/// Bytes of each of the two output staging buffers: a window of the final pass (four chunks of f32 output per
/// worker, so that the window's chunks keep every worker busy, and at least a stretch) plus a block for an
/// unaligned stretch end, within a sixteenth of the budget; a multiple of the block.
#[must_use]
pub fn stage_capacity(budget: u64, workers: usize, chunk_elems: usize) -> usize {
    let limit = usize::try_from(budget / 16).unwrap_or(usize::MAX) / ALIGN * ALIGN;
    let window = (4 * workers.max(1)).saturating_mul(chunk_elems).saturating_mul(4).max(STRETCH);
    window.saturating_add(ALIGN).next_multiple_of(ALIGN).min(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_shrinks_with_the_budget_within_bounds() {
        assert_eq!(chunk_elems(8 << 30, 2, 3), DEFAULT_CHUNK_ELEMS);
        assert_eq!(chunk_elems(MIN_MEMORY_LIMIT, 64, 40), 1024);
        // 64 MiB / 8 / (2 · ((3 + 5) · 4 + 8)) = 104857 → capped at the default.
        assert_eq!(chunk_elems(64 << 20, 2, 3), DEFAULT_CHUNK_ELEMS);
        // 64 MiB / 8 / (16 · 40) = 13107.
        assert_eq!(chunk_elems(64 << 20, 16, 3), 13107);
    }

    #[test]
    fn peak_is_scratch_working_set_and_staging_capped_by_the_budget() {
        let tensors = [
            TensorNeeds { input_bytes: 100, inputs: 2, working_bytes: 0 },
            TensorNeeds { input_bytes: 300, inputs: 1, working_bytes: 7 },
            TensorNeeds { input_bytes: 300, inputs: 3, working_bytes: 0 },
        ];
        let plan = memory_plan(1 << 30, 2, &tensors, Some(1000));
        assert_eq!((plan.largest, plan.largest_input_bytes), (1, 300));
        assert_eq!(plan.scratch, 2 * ((4 + 5) * 4 + 8) * 1000);
        assert_eq!(plan.read_ahead, 1 << 28);
        assert_eq!(plan.staging, 2 * (STRETCH + ALIGN) as u64);
        assert_eq!(plan.peak, plan.scratch + 7 + plan.staging);
        assert_eq!(memory_plan(1000, 2, &tensors, Some(1000)).peak, 1000);
        assert_eq!(memory_plan(1 << 30, 1, &[], None).largest_input_bytes, 0);
    }

    #[test]
    fn staging_holds_a_window_of_chunks_for_every_worker_within_a_sixteenth_of_the_budget() {
        // Two workers' four chunks of 64 Ki f32 (2 MiB) are less than a stretch: a stretch and a block.
        assert_eq!(stage_capacity(4 << 30, 2, DEFAULT_CHUNK_ELEMS), STRETCH + ALIGN);
        // Sixteen workers: 16 MiB of window and a block.
        assert_eq!(stage_capacity(4 << 30, 16, DEFAULT_CHUNK_ELEMS), (16 << 20) + ALIGN);
        // Never more than the sixteenth, whatever the tensors' sizes, and whole blocks.
        assert_eq!(stage_capacity(64 << 20, 2, DEFAULT_CHUNK_ELEMS), 4 << 20);
        assert_eq!(stage_capacity(4 << 30, 3, 1000) % ALIGN, 0);
    }
}
