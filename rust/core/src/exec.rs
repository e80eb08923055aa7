//! Executing a whole plan: open and validate every input first (so bad input fails before any byte is
//! written), lay out every output file, then merge tensor after tensor, prefetching the next tensor's inputs
//! and releasing each input's pages once its last consumer is done so resident memory stays flat.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::io::writer::FileSink;
use crate::io::{SafetensorsFile, ShardLayout};
use crate::merge::{
    self, Input, Job, Method, MethodSpec, Rescale, Sink, Source, DEFAULT_CHUNK_ELEMS,
};
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

/// Writes one tensor's chunks at its offset in an output file.
struct TensorSink<'a> {
    file: FileSink<'a>,
    offset: u64,
    elem_size: u64,
}

impl Sink for TensorSink<'_> {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()> {
        self.file
            .write_at(self.offset + elem_start as u64 * self.elem_size, bytes)
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
    let spec = MethodSpec {
        method: Method::parse(&m.name).map_err(ctx)?,
        normalize: m.normalize,
        lambda: m.lambda,
        rescale: Rescale::parse(&m.rescale).map_err(ctx)?,
        seed: m.seed,
    };
    let base = t
        .base
        .as_ref()
        .map(|b| source(&b.file, &b.tensor))
        .transpose()?;
    let inputs = t
        .inputs
        .iter()
        .map(|i| {
            Ok(Input {
                src: source(&i.file, &i.tensor)?,
                weight: i.weight,
                density: i.density,
                model_id: i.model_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let job = Job {
        name: &t.name,
        numel: t.numel(),
        base,
        inputs,
        cast: t
            .cast_dtype
            .as_deref()
            .map(DType::parse)
            .transpose()
            .map_err(ctx)?,
        spec,
        out_dtype: DType::parse(&t.out_dtype).map_err(ctx)?,
    };
    merge::validate(&job)?;
    Ok(job)
}

/// Run a plan, writing its output files into `out_dir` (which must exist). `progress` is called on the calling
/// thread after each tensor; an error from it aborts the run.
pub fn execute(
    plan: &Plan,
    out_dir: &Path,
    threads: Option<usize>,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Stats> {
    let files = open_all(plan)?;
    let jobs: Vec<Job> = plan
        .tensors()
        .map(|t| job(t, &files))
        .collect::<Result<_>>()?;
    let in_bytes = |j: &Job| -> u64 {
        j.base
            .iter()
            .chain(j.inputs.iter().map(|i| &i.src))
            .map(|s| s.bytes.len() as u64)
            .sum()
    };
    let bytes_total: u64 = jobs.iter().map(in_bytes).sum();
    // How many outputs read each input tensor: its pages are released after the last one.
    let mut uses: HashMap<(&PathBuf, &str), usize> = HashMap::new();
    for t in plan.tensors() {
        for r in t.refs() {
            *uses.entry(r).or_default() += 1;
        }
    }
    let pool = pool::pool(threads)?;
    let chunk = plan.chunk_elems.unwrap_or(DEFAULT_CHUNK_ELEMS).max(1);

    let mut outputs: Vec<(PathBuf, File, ShardLayout)> = Vec::new();
    for shard in &plan.shards {
        let specs: Vec<(&str, DType, &[usize])> = shard
            .tensors
            .iter()
            .map(|t| {
                Ok((
                    t.name.as_str(),
                    DType::parse(&t.out_dtype)?,
                    t.shape.as_slice(),
                ))
            })
            .collect::<Result<_>>()?;
        let layout = ShardLayout::new(&specs, &plan.metadata)?;
        let path = out_dir.join(&shard.file);
        let file = layout.create(&path)?;
        outputs.push((path, file, layout));
    }

    let all: Vec<&PlanTensor> = plan.tensors().collect();
    let mut p = Progress {
        tensors_total: jobs.len(),
        bytes_total,
        ..Default::default()
    };
    let mut bytes_written = 0u64;
    let mut idx = 0usize;
    for (s, shard) in plan.shards.iter().enumerate() {
        let (path, file, layout) = &outputs[s];
        for (k, _) in shard.tensors.iter().enumerate() {
            if let Some(next) = all.get(idx + 1) {
                for (f, name) in next.refs() {
                    if let Ok(e) = files[f].entry(name) {
                        files[f].prefetch(e);
                    }
                }
            }
            let job = &jobs[idx];
            let sink = TensorSink {
                file: FileSink { file, path },
                offset: layout.offsets[k],
                elem_size: job.out_dtype.size() as u64,
            };
            pool.install(|| merge::merge(job, chunk, &sink))?;
            for r in all[idx].refs() {
                let n = uses.get_mut(&r).expect("counted");
                *n -= 1;
                if *n == 0 {
                    files[r.0].release(files[r.0].entry(r.1)?);
                }
            }
            bytes_written += (job.numel * job.out_dtype.size()) as u64;
            p.tensors_done += 1;
            p.bytes_done += in_bytes(job);
            idx += 1;
            progress(&p)?;
        }
        file.sync_all()
            .map_err(|e| CoreError::output(path, e.to_string()))?;
    }
    Ok(Stats {
        tensors: jobs.len(),
        bytes_read: bytes_total,
        bytes_written,
    })
}
