//! Executing a whole plan: open and validate every input first (so bad input fails before any byte is
//! written), lay out every output file, then merge tensor after tensor.
//!
//! Memory follows the budget (`memory_limit`), not the model: a quarter of it may hold the inputs of the tensor
//! being merged and a quarter is read ahead (the next tensor's inputs); a tensor whose inputs are larger than
//! that is merged with each chunk's input pages unmapped as soon as a pass is done with them. Input pages are
//! unmapped once their last consumer is done; output pages are written back one tensor behind and dropped from
//! the page cache, so neither the inputs nor the output accumulate in memory.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::io::writer::FileSink;
use crate::io::{SafetensorsFile, ShardLayout};
use crate::merge::{self, Input, Job, Method, MethodSpec, Options, Params, Rescale, Sink, Source, DEFAULT_CHUNK_ELEMS};
use crate::plan::{Plan, PlanTensor};
use crate::pool;

#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub tensors: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// How a plan runs; none of it changes the output bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecOptions {
    pub threads: Option<usize>,
    /// Bytes the run may keep resident (see the module docs); `None` picks [`default_memory_limit`].
    pub memory_limit: Option<u64>,
}

/// The smallest memory budget a run accepts.
pub const MIN_MEMORY_LIMIT: u64 = 64 << 20;

/// Elements per chunk for a budget: each worker holds (inputs + 5) f32 buffers of one chunk, and all of them
/// together stay within an eighth of the budget (between 1024 and the default chunk).
pub fn chunk_elems(budget: u64, workers: usize, inputs: usize) -> usize {
    let fit = budget / 8 / (workers.max(1) as u64 * (inputs as u64 + 5) * 4);
    DEFAULT_CHUNK_ELEMS.min((fit as usize).max(1024))
}

/// Half of what this process may use (physical memory, or the memory cgroup's limit when lower), at most 8 GiB.
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

/// Writes one tensor's chunks at its offset in an output file.
struct TensorSink<'a> {
    file: FileSink<'a>,
    offset: u64,
    elem_size: u64,
    /// Start writing back each chunk at once (for tensors larger than the budget's share).
    eager: bool,
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

fn start_writeback(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on a file we own; failures only mean the kernel writes back later on its own.
    unsafe { libc::sync_file_range(file.as_raw_fd(), off as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Wait until a written range is on disk, then drop it from the page cache.
fn finish_writeback(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: as above; both calls are advisory for correctness (the final fsync makes the data durable).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off as i64, len as i64, flags);
        libc::posix_fadvise(file.as_raw_fd(), off as i64, len as i64, libc::POSIX_FADV_DONTNEED);
    }
}

fn open_all(plan: &Plan) -> Result<HashMap<PathBuf, SafetensorsFile>> {
    let mut files = HashMap::new();
    for t in plan.tensors() {
        for (f, _) in t.refs() {
            if !files.contains_key(f) {
                files.insert(f.clone(), SafetensorsFile::open(f)?);
            }
        }
    }
    Ok(files)
}

fn job<'a>(t: &'a PlanTensor, files: &'a HashMap<PathBuf, SafetensorsFile>) -> Result<Job<'a>> {
    let ctx = |e: CoreError| match e {
        CoreError::Parameter(m) => CoreError::param(format!("tensor '{}': {m}", t.name)),
        other => other,
    };
    let source = |file: &PathBuf, tensor: &str| -> Result<Source<'a>> {
        let (bytes, dtype) = files[file].checked(tensor, &t.shape)?;
        Ok(Source { bytes, dtype })
    };
    let m = &t.method;
    let method = Method::parse(&m.name).map_err(ctx)?;
    let spec = MethodSpec {
        method,
        normalize: m.normalize,
        lambda: m.lambda,
        rescale: Rescale::parse(&m.rescale).map_err(ctx)?,
        seed: m.seed,
        params: Params::parse(method, &m.params).map_err(ctx)?,
    };
    let base = t.base.as_ref().map(|b| source(&b.file, &b.tensor)).transpose()?;
    let inputs = t
        .inputs
        .iter()
        .map(|i| {
            Ok(Input {
                src: source(&i.file, &i.tensor)?,
                weight: i.weight,
                density: i.density,
                model_id: i.model_id,
                gamma: i.gamma,
                epsilon: i.epsilon,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let job = Job {
        name: &t.name,
        shape: t.shape.clone(),
        numel: t.numel(),
        base,
        inputs,
        cast: t.cast_dtype.as_deref().map(DType::parse).transpose().map_err(ctx)?,
        spec,
        out_dtype: DType::parse(&t.out_dtype).map_err(ctx)?,
    };
    merge::validate(&job)?;
    Ok(job)
}

/// A merge done outside the core for some tensors (the torch hand-off of the spectral methods to a GPU): asked
/// first for every tensor, it returns the merged values (f32, θ whole) or `None` to leave the tensor to the
/// kernels. It reads inputs with [`merge::decode`]; the executor encodes and writes what it returns.
pub trait External: Sync {
    fn merge(&self, job: &Job) -> Result<Option<Vec<f32>>>;
}

/// Run a plan, writing its output files into `out_dir` (which must exist). `progress` is called on the calling
/// thread after each tensor; an error from it aborts the run.
pub fn execute(
    plan: &Plan,
    out_dir: &Path,
    opts: &ExecOptions,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Stats> {
    execute_with(plan, out_dir, opts, None, progress)
}

/// [`execute`] with an [`External`] merge consulted before the kernels.
pub fn execute_with(
    plan: &Plan,
    out_dir: &Path,
    opts: &ExecOptions,
    external: Option<&dyn External>,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Stats> {
    let files = open_all(plan)?;
    let jobs: Vec<Job> = plan.tensors().map(|t| job(t, &files)).collect::<Result<_>>()?;
    let in_bytes =
        |j: &Job| -> u64 { j.base.iter().chain(j.inputs.iter().map(|i| &i.src)).map(|s| s.bytes.len() as u64).sum() };
    let bytes_total: u64 = jobs.iter().map(in_bytes).sum();
    // How many outputs read each input tensor: its pages are released after the last one.
    let mut uses: HashMap<(&PathBuf, &str), usize> = HashMap::new();
    for t in plan.tensors() {
        for r in t.refs() {
            *uses.entry(r).or_default() += 1;
        }
    }
    let pool = pool::pool(opts.threads)?;
    let budget = opts.memory_limit.unwrap_or_else(default_memory_limit);
    if budget < MIN_MEMORY_LIMIT {
        return Err(CoreError::param(format!("memory limit of {budget} bytes is too small (at least 64 MiB)")));
    }
    let share = budget / 4;
    // Spectral methods factorize whole matrices: refuse before writing anything when one cannot fit the budget
    // (an external merge, torch on a GPU, holds its factors on the device instead).
    for job in jobs.iter().filter(|_| external.is_none()) {
        let need = merge::working_bytes(job);
        if need > budget {
            return Err(CoreError::param(format!(
                "tensor '{}' {:?}: {} factorizes whole matrices and needs about {:.1} GiB for this one, above the \
                 memory limit of {:.1} GiB; raise the limit (--memory-limit), or give such tensors the mean task \
                 vector with the method's `exclude` parameter (a regex of tensor names, e.g. \"embed_tokens|lm_head\")",
                job.name,
                job.shape,
                job.spec.method.name(),
                need as f64 / (1u64 << 30) as f64,
                budget as f64 / (1u64 << 30) as f64
            )));
        }
    }
    let workers = pool.current_num_threads();
    let max_inputs = jobs.iter().map(|j| j.inputs.len() + 1).max().unwrap_or(1);
    let chunk = plan.chunk_elems.unwrap_or_else(|| chunk_elems(budget, workers, max_inputs)).max(1);

    let mut outputs: Vec<(PathBuf, File, ShardLayout)> = Vec::new();
    for shard in &plan.shards {
        let specs: Vec<(&str, DType, &[usize])> = shard
            .tensors
            .iter()
            .map(|t| Ok((t.name.as_str(), DType::parse(&t.out_dtype)?, t.shape.as_slice())))
            .collect::<Result<_>>()?;
        let layout = ShardLayout::new(&specs, &plan.metadata)?;
        let path = out_dir.join(&shard.file);
        let file = layout.create(&path)?;
        outputs.push((path, file, layout));
    }

    let all: Vec<&PlanTensor> = plan.tensors().collect();
    let mut p = Progress { tensors_total: jobs.len(), bytes_total, ..Default::default() };
    let mut bytes_written = 0u64;
    let mut idx = 0usize;
    for (s, shard) in plan.shards.iter().enumerate() {
        let (path, file, layout) = &outputs[s];
        // The previous tensor's output range, still being written back.
        let mut behind: Option<(u64, u64)> = None;
        for (k, _) in shard.tensors.iter().enumerate() {
            let job = &jobs[idx];
            let large = in_bytes(job) > share;
            if let Some(next) = all.get(idx + 1).filter(|_| idx + 1 < jobs.len() && in_bytes(&jobs[idx + 1]) <= share) {
                for (f, name) in next.refs() {
                    if let Ok(e) = files[f].entry(name) {
                        files[f].prefetch(e);
                    }
                }
            }
            let out_len = (job.numel * job.out_dtype.size()) as u64;
            let sink = TensorSink {
                file: FileSink { file, path },
                offset: layout.offsets[k],
                elem_size: job.out_dtype.size() as u64,
                eager: large,
            };
            let mopts = Options { chunk_elems: chunk, candidate_bytes: share as usize, release_inputs: large };
            let outside = match external {
                Some(ext) => pool.install(|| ext.merge(job))?,
                None => None,
            };
            match outside {
                Some(values) => pool.install(|| merge::emit_values(job, &mopts, &values, &sink))?,
                None => pool.install(|| merge::merge_with(job, &mopts, &sink))?,
            }
            for r in all[idx].refs() {
                let n = uses.get_mut(&r).expect("counted");
                *n -= 1;
                if *n == 0 {
                    files[r.0].release(files[r.0].entry(r.1)?);
                }
            }
            start_writeback(file, layout.offsets[k], out_len);
            if let Some((off, len)) = behind.replace((layout.offsets[k], out_len)) {
                finish_writeback(file, off, len);
            }
            bytes_written += out_len;
            p.tensors_done += 1;
            p.bytes_done += in_bytes(job);
            idx += 1;
            progress(&p)?;
        }
        file.sync_all().map_err(|e| CoreError::output(path, e.to_string()))?;
        finish_writeback(file, 0, layout.total_len);
    }
    Ok(Stats { tensors: jobs.len(), bytes_read: bytes_total, bytes_written })
}
