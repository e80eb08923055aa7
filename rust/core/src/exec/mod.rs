//! Executing a whole plan: open and validate every input first (so bad input fails before any byte is
//! written), lay out every output file, then merge tensor after tensor.
//!
//! Reading: inputs are read with positioned reads, never memory-mapped (`io::reader`). Every merge streams its
//! inputs: each pass reads the chunk it works on from the files into a small per-worker buffer and decodes it
//! while it is still in the cache (`merge::passes`), so no input becomes resident whole. (Reading tensors whole
//! into buffers first, as earlier versions did for tensors that fit the read-ahead share, copied every input byte
//! out of the page cache to memory and read it back from there in each pass; streamed, a task_arithmetic merge of
//! the 1.1B family at one thread took 2.7-2.9 s of CPU instead of 3.6-5.5 s, and 0.3 GB of resident memory
//! instead of 0.8 GB, with the same bytes: docs/benchmarks.md, "Fourth round".) The next tensor's ranges are
//! advised to the kernel while this one merges, so cold reads overlap the merge. A failed or short read is an
//! error naming the file and the tensor.
//! Writing: every tensor goes into an in-memory stretch of its output file that a writer thread writes with direct
//! I/O while the next tensors merge; a merge fills it a window of whole chunks at a time, so the stretch buffers
//! stay a few MiB whatever the tensor's size (`writeback`). The output never accumulates in memory, and each file is
//! fsynced before it is reported done.
//!
//! Checks around the merge: a NaN or infinity in an input stops the run unless the plan allows them
//! (`allow_nonfinite`); every input is checked unchanged (size, mtime, device, inode) at the end, before the caller
//! may commit the output; a non-float tensor is only ever copied byte for byte.

mod budget;
mod read;
mod writeback;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use budget::{chunk_elems, default_memory_limit, memory_plan, MemoryPlan, TensorNeeds, MIN_MEMORY_LIMIT};

use crate::dtype::{self, DType};
use crate::error::{CoreError, Result};
use crate::io::writer::LayoutEntry;
use crate::io::{SafetensorsFile, ShardLayout, TensorEntry};
use crate::merge::{self, Data, Job, Method, Options, Source};
use crate::plan::{Plan, PlanTensor};
use crate::pool;
use writeback::{finish_writeback, OutFile, StagedSink, Stager};

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

/// One output file, finished: written whole and fsynced.
#[derive(Clone, Debug)]
pub struct ShardDone<'a> {
    /// The plan's file name (no directory).
    pub file: &'a str,
    pub size: u64,
    /// CRC-32 (IEEE, as zlib computes it) of the whole file, computed while writing it.
    pub crc32: u32,
}

/// How a plan runs; none of it changes the output bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecOptions {
    pub threads: Option<usize>,
    /// Bytes the run may keep resident (see the module docs); `None` picks [`default_memory_limit`].
    pub memory_limit: Option<u64>,
}

/// What the caller hears of a run while it goes; an error from either callback aborts the run.
pub struct Callbacks<'c> {
    /// Called on the calling thread after each tensor.
    pub progress: &'c mut dyn FnMut(&Progress) -> Result<()>,
    /// Called once per output file, after it is written whole and fsynced (a resume journal's entry).
    pub shard_done: &'c mut dyn FnMut(&ShardDone) -> Result<()>,
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

/// What one output tensor takes: a merge, or a byte-for-byte copy (of a non-float tensor, or a float tensor passed
/// through unscaled into its own dtype, which `float` names: its bytes are checked for NaN and infinities).
enum Work<'a> {
    Merge(Job<'a>),
    Copy { file: &'a SafetensorsFile, name: &'a str, entry: &'a TensorEntry, float: Option<DType> },
}

impl Work<'_> {
    fn input_bytes(&self) -> u64 {
        match self {
            Work::Merge(j) => j.sources().map(|s| s.byte_len() as u64).sum(),
            Work::Copy { entry, .. } => entry.len() as u64,
        }
    }

    fn output_bytes(&self) -> u64 {
        match self {
            Work::Merge(j) => (j.numel * j.out_dtype.size()) as u64,
            Work::Copy { entry, .. } => entry.len() as u64,
        }
    }
}

/// The work of one plan tensor over the opened input files, validated; parameter errors name the tensor.
fn work<'a>(t: &'a PlanTensor, files: &'a HashMap<PathBuf, SafetensorsFile>) -> Result<Work<'a>> {
    // A tensor of a dtype the kernels do not merge (integers, booleans, f64, ...) may only be copied as it is:
    // passthrough of exactly one input into the same dtype and shape.
    for (f, name) in t.refs() {
        let file = &files[f];
        let e = file.entry(name)?;
        if e.dtype.is_some() {
            continue;
        }
        let out = dtype::stored_name(&t.out_dtype).unwrap_or(&t.out_dtype);
        // The Python registry runs passthrough as linear over its one input with weight = scale.
        let passthrough = t.method.name == "passthrough"
            || (t.method.name == Method::Linear.name() && t.inputs.first().is_some_and(|i| i.weight == 1.0));
        let copy = passthrough
            && t.base.is_none()
            && t.inputs.len() == 1
            && t.cast_dtype.is_none()
            && out == e.dtype_name
            && e.shape == t.shape;
        if !copy {
            return Err(CoreError::tensor(
                f,
                name,
                format!(
                    "dtype {} is not merged (ferromerge merges F32, F16 and BF16); such a tensor can only be \
                     copied as it is: passthrough of this one input with out_dtype {} and shape {:?}",
                    e.dtype_name, e.dtype_name, e.shape
                ),
            ));
        }
        return Ok(Work::Copy { file, name, entry: e, float: None });
    }
    if let Some(copy) = float_passthrough(t, files)? {
        return Ok(copy);
    }
    let source = |file: &PathBuf, tensor: &'a str| -> Result<Source<'a>> {
        let f = &files[file];
        let (entry, dtype) = f.checked(tensor, &t.shape)?;
        Ok(Source { data: Data::File { file: f, name: tensor, entry }, dtype })
    };
    let base = t.base.as_ref().map(|b| source(&b.file, &b.tensor)).transpose()?;
    let inputs = t.inputs.iter().map(|i| Ok((source(&i.file, &i.tensor)?, i.values()))).collect::<Result<Vec<_>>>()?;
    let job = Job::from_plan(&t.name, t.shape.clone(), &t.method, &t.out_dtype, t.cast_dtype.as_deref(), base, &inputs)
        .map_err(|e| match e {
            CoreError::Parameter(m) => CoreError::param(format!("tensor '{}': {m}", t.name)),
            other => other,
        })?;
    merge::validate(&job)?;
    Ok(Work::Merge(job))
}

/// mergekit's passthrough of one float tensor without a scale (or with scale 1) into its own dtype returns the
/// tensor as it is: a byte copy, not a merge. (Run as the linear kernel it would cost a decode and an encode, and
/// its sum, which starts from +0.0 as torch's does, would turn a −0.0 into +0.0 where mergekit keeps the bytes.)
/// The Python registry runs passthrough as `linear` over its one input with weight = scale and normalize off; a
/// `linear` config of one model with weight 1 and `normalize: false` is the same plan, and mergekit's linear
/// would give +0.0 for a −0.0 there: the one case where the copy differs from mergekit, by the sign of a zero.
fn float_passthrough<'a>(t: &'a PlanTensor, files: &'a HashMap<PathBuf, SafetensorsFile>) -> Result<Option<Work<'a>>> {
    let [input] = t.inputs.as_slice() else { return Ok(None) };
    let linear = t.method.name == Method::Linear.name() && !t.method.normalize && t.method.lambda == 1.0;
    if !linear || t.base.is_some() || input.weight != 1.0 {
        return Ok(None);
    }
    let file = &files[&input.file];
    let entry = file.entry(&input.tensor)?;
    let Some(stored) = entry.dtype else { return Ok(None) };
    let same = |d: &str| DType::parse(d).is_ok_and(|d| d == stored);
    let cast_ok = t.cast_dtype.as_deref().is_none_or(same);
    if !same(&t.out_dtype) || !cast_ok || entry.shape != t.shape {
        return Ok(None);
    }
    Ok(Some(Work::Copy { file, name: &input.tensor, entry, float: Some(stored) }))
}

/// The error for a NaN or an infinity in an input (`job`'s sources are the files): the first input holding any,
/// with its counts.
fn nonfinite_error(job: &Job) -> Result<CoreError> {
    let counts = merge::nonfinite_counts(job)?;
    for (src, (nan, inf)) in job.sources().zip(counts) {
        if let (Data::File { file, name, .. }, true) = (src.data, nan + inf > 0) {
            return Ok(nonfinite_message(file.path(), name, nan, inf));
        }
    }
    Err(CoreError::Internal(format!("tensor '{}': a non-finite value was seen but not found again", job.name)))
}

/// The error naming a file's tensor that holds `nan` NaN and `inf` infinite values.
fn nonfinite_message(path: &Path, name: &str, nan: u64, inf: u64) -> CoreError {
    CoreError::tensor(
        path,
        name,
        format!(
            "{nan} NaN and {inf} infinite values; pass --allow-nonfinite (allow_nonfinite=True) to merge them as they \
             are"
        ),
    )
}

/// The read failure a streaming pass recorded in one of the job's files, if any.
fn take_read_fault(job: &Job) -> Result<()> {
    for src in job.sources() {
        if let Data::File { file, .. } = src.data {
            if let Some(e) = file.take_fault() {
                return Err(e);
            }
        }
    }
    Ok(())
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
    execute_with(plan, out_dir, opts, None, &mut Callbacks { progress, shard_done: &mut |_| Ok(()) })
}

/// [`execute`] with an [`ExternalMerge`] consulted before the kernels, and a callback per finished shard.
pub fn execute_with(
    plan: &Plan,
    out_dir: &Path,
    opts: &ExecOptions,
    external: Option<&dyn ExternalMerge>,
    callbacks: &mut Callbacks,
) -> Result<Stats> {
    let files = open_all(plan)?;
    let works: Vec<Work> = plan.tensors().map(|t| work(t, &files)).collect::<Result<_>>()?;
    let bytes_total: u64 = works.iter().map(Work::input_bytes).sum();
    let pool = pool::pool(opts.threads)?;
    let budget = opts.memory_limit.unwrap_or_else(default_memory_limit);
    if budget < MIN_MEMORY_LIMIT {
        return Err(CoreError::param(format!("memory limit of {budget} bytes is too small (at least 64 MiB)")));
    }
    let workers = pool.current_num_threads();
    let needs: Vec<TensorNeeds> = works
        .iter()
        .map(|w| match w {
            Work::Merge(j) => TensorNeeds {
                input_bytes: w.input_bytes(),
                inputs: j.inputs.len(),
                working_bytes: merge::working_bytes(&j.spec, &j.shape, j.inputs.len()),
            },
            Work::Copy { .. } => TensorNeeds { input_bytes: w.input_bytes(), inputs: 1, working_bytes: 0 },
        })
        .collect();
    let memory = memory_plan(budget, workers, &needs, plan.chunk_elems);
    let share = memory.read_ahead;
    // Spectral methods factorize whole matrices: refuse before writing anything when one cannot fit the budget
    // (an external merge, torch on a GPU, holds its factors on the device instead).
    for (w, need) in works.iter().zip(&needs).filter(|_| external.is_none()) {
        let (Work::Merge(job), need) = (w, need.working_bytes) else { continue };
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
    let mut idx = 0usize;
    for shard in &plan.shards {
        let mut specs: Vec<LayoutEntry> = Vec::with_capacity(shard.tensors.len());
        for t in &shard.tensors {
            let dtype = match &works[idx] {
                Work::Merge(j) => j.out_dtype.st_name(),
                Work::Copy { entry, .. } => entry.dtype_name.as_str(),
            };
            specs.push((t.name.as_str(), dtype, t.shape.as_slice(), works[idx].output_bytes()));
            idx += 1;
        }
        let layout = ShardLayout::new(&specs, &plan.metadata)?;
        let path = out_dir.join(&shard.file);
        let file = layout.create(&path)?;
        outputs.push((path, file, layout));
    }

    // Merges whose inputs fit the read-ahead share: the next one is advised to the kernel while this one merges
    // (a larger one is left to the kernel's own read-ahead).
    let fits_share = |i: usize| works[i].input_bytes() <= share && matches!(works[i], Work::Merge(_));
    let outs: Vec<OutFile> = outputs.iter().map(|(path, file, _)| OutFile::new(file, path)).collect();
    let (to_writer, stretches) = std::sync::mpsc::channel();
    let (written, from_writer) = std::sync::mpsc::channel();
    let cap = budget::stage_capacity(budget, workers, chunk);
    let bytes_written = std::thread::scope(|scope| -> Result<u64> {
        std::thread::Builder::new()
            .name("ferromerge-writer".into())
            .spawn_scoped(scope, move || writeback::writer(&stretches, &written))
            .map_err(|e| CoreError::Internal(format!("cannot start the output writer thread: {e}")))?;
        // Owns the sending side: when this closure returns (done or failed), the writer thread ends.
        let mut stager = Stager::new(to_writer, from_writer, cap);
        let mut p = Progress { tensors_total: works.len(), bytes_total, ..Default::default() };
        let mut bytes_written = 0u64;
        let mut idx = 0usize;
        for (s, shard) in plan.shards.iter().enumerate() {
            let (path, file, layout) = &outputs[s];
            let mut head = (layout.header.len() as u64).to_le_bytes().to_vec();
            head.extend_from_slice(&layout.header);
            stager.begin(&outs[s], &head)?;
            for k in 0..shard.tensors.len() {
                let out_len = works[idx].output_bytes();
                let off = layout.offsets[k];
                match &works[idx] {
                    Work::Copy { file: src, name, entry, float } => {
                        // Read piece by piece straight into the staging buffer, whatever the tensor's size.
                        let (mut nan, mut inf) = (0, 0);
                        stager.stage_pieces(off, out_len, |at, buf| {
                            let (a, b) = read::copy_piece(src, name, entry, *float, at, buf)?;
                            (nan, inf) = (nan + a, inf + b);
                            Ok(())
                        })?;
                        if nan + inf > 0 && !plan.allow_nonfinite {
                            return Err(nonfinite_message(src.path(), name, nan, inf));
                        }
                    }
                    Work::Merge(job) => {
                        let fill = |sink: &dyn merge::Sink| -> Result<()> {
                            // Start the disk on the next tensor while this one merges.
                            if let Some(Work::Merge(j)) = works.get(idx + 1).filter(|_| fits_share(idx + 1)) {
                                read::prefetch(j);
                            }
                            let mopts = Options {
                                chunk_elems: chunk,
                                candidate_bytes: usize::try_from(share).unwrap_or(usize::MAX),
                            };
                            let merged = (|| {
                                let outside = match external {
                                    Some(ext) => pool.install(|| ext.merge(job))?,
                                    None => None,
                                };
                                match outside {
                                    Some(values) => pool.install(|| merge::emit_values(job, &mopts, &values, sink)),
                                    None => pool.install(|| merge::merge_with(job, &mopts, sink)),
                                }
                            })();
                            take_read_fault(job)?;
                            // Before the merge's own error: a NaN is the likelier cause of a kernel's complaint.
                            if job.saw_nonfinite() && !plan.allow_nonfinite {
                                return Err(nonfinite_error(job)?);
                            }
                            merged
                        };
                        fill(&StagedSink::new(&mut stager, off, job.out_dtype.size()))?;
                    }
                }
                bytes_written += out_len;
                p.tensors_done += 1;
                p.bytes_done += works[idx].input_bytes();
                idx += 1;
                (callbacks.progress)(&p)?;
            }
            let crc32 = stager.finish(layout.total_len)?;
            file.sync_all().map_err(|e| CoreError::output(path, e.to_string()))?;
            finish_writeback(file, 0, layout.total_len);
            (callbacks.shard_done)(&ShardDone { file: &shard.file, size: layout.total_len, crc32 })?;
        }
        Ok(bytes_written)
    })?;
    // Every input must still be the file that was read: a shard rewritten or replaced during the run would give an
    // output mixing two models.
    for f in files.values() {
        f.check_unchanged()?;
    }
    Ok(Stats { tensors: works.len(), bytes_read: bytes_total, bytes_written })
}
