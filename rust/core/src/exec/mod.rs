//! Executing a whole plan: open and validate every input first (so bad input fails before any byte is
//! written), lay out every output file, then merge tensor after tensor.
//!
//! Memory follows the budget (`memory_limit`), not the model (`budget`: the memory plan): a tensor whose inputs
//! are larger than the read-ahead share is merged with each chunk's input pages unmapped as soon as a pass is
//! done with them. Input pages are unmapped once their last consumer is done; output pages are written back one
//! tensor behind and dropped from the page cache (`writeback`), so neither the inputs nor the output accumulate
//! in memory.

mod budget;
mod writeback;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use budget::{chunk_elems, default_memory_limit, memory_plan, MemoryPlan, TensorNeeds, MIN_MEMORY_LIMIT};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::io::writer::FileSink;
use crate::io::{SafetensorsFile, ShardLayout};
use crate::merge::{self, Job, Options, Source};
use crate::plan::{Plan, PlanTensor};
use crate::pool;
use writeback::{finish_writeback, start_writeback, TensorSink};

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

/// The job of one plan tensor over the opened input files, validated; parameter errors name the tensor.
fn job<'a>(t: &'a PlanTensor, files: &'a HashMap<PathBuf, SafetensorsFile>) -> Result<Job<'a>> {
    let source = |file: &PathBuf, tensor: &str| -> Result<Source<'a>> {
        let (bytes, dtype) = files[file].checked(tensor, &t.shape)?;
        Ok(Source { bytes, dtype })
    };
    let base = t.base.as_ref().map(|b| source(&b.file, &b.tensor)).transpose()?;
    let inputs =
        t.inputs.iter().map(|i| Ok((source(&i.file, &i.tensor)?, i.values()))).collect::<Result<Vec<_>>>()?;
    let job = Job::from_plan(&t.name, t.shape.clone(), &t.method, &t.out_dtype, t.cast_dtype.as_deref(), base, &inputs)
        .map_err(|e| match e {
            CoreError::Parameter(m) => CoreError::param(format!("tensor '{}': {m}", t.name)),
            other => other,
        })?;
    merge::validate(&job)?;
    Ok(job)
}

/// An external merge: a merge done outside the core for some tensors (the torch hand-off of the spectral methods
/// to a GPU). Asked first for every tensor, it returns the merged values (f32, θ whole) or `None` to leave the
/// tensor to the kernels. It reads inputs with [`merge::decode`]; the executor encodes and writes what it returns.
pub trait ExternalMerge: Sync {
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

/// [`execute`] with an [`ExternalMerge`] consulted before the kernels.
pub fn execute_with(
    plan: &Plan,
    out_dir: &Path,
    opts: &ExecOptions,
    external: Option<&dyn ExternalMerge>,
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
    let workers = pool.current_num_threads();
    let needs: Vec<TensorNeeds> = jobs
        .iter()
        .map(|j| TensorNeeds {
            input_bytes: in_bytes(j),
            inputs: j.inputs.len(),
            working_bytes: merge::working_bytes(&j.spec.params, &j.shape),
        })
        .collect();
    let memory = memory_plan(budget, workers, &needs, plan.chunk_elems);
    let share = memory.read_ahead;
    // Spectral methods factorize whole matrices: refuse before writing anything when one cannot fit the budget
    // (an external merge, torch on a GPU, holds its factors on the device instead).
    for (job, need) in jobs.iter().zip(&needs).filter(|_| external.is_none()) {
        let need = need.working_bytes;
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
    let chunk = memory.chunk_elems;

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
            let mopts = Options { chunk_elems: chunk, candidate_bytes: usize::try_from(share).unwrap_or(usize::MAX), release_inputs: large };
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
