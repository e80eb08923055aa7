//! Merging one tensor, chunk by chunk, over all models at once.
//!
//! Elementwise methods take one pass. Whole-tensor statistics take extra streaming passes over the inputs
//! (re-decoding chunks from the inputs rather than keeping anything decoded whole): selection thresholds (TIES trim,
//! breadcrumbs, SCE: `select::topk`), L1 norms for rescaling and dot products (SLERP family, model stock: `gram`)
//! by fixed-block sums, per-row statistics over row-aligned chunks (DELLA ranks, arcee_fusion). Every pass's
//! result is independent of chunk size and thread count, so the output bytes are too.
//!
//! Layout: `method` (the method table), `params` (typed parameters and their defaults), `validate`, `passes`
//! (the streaming building blocks), `sink`, `gram` (Gram matrices for the spherical methods and model stock),
//! `select` (top-k and sparsifiers) and `methods/`, one file per method family named after its methods. This
//! file holds the job types and the dispatch.

mod gram;
mod method;
mod methods;
pub mod params;
mod passes;
pub(crate) mod select;
mod sink;
mod validate;

pub use method::{BasePolicy, Family, Method, MethodInfo, Sparsify, METHODS};
pub use params::{ParamDef, ParamKind, Params};
pub use passes::{decode, emit_values, nonfinite_counts};
pub use sink::{Sink, SliceSink};
pub use validate::validate;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::io::{SafetensorsFile, TensorEntry};
use crate::plan::{InputValues, PlanMethod};

/// Memory for the elements of the threshold's bin collected in pass B of a TIES trim (all inputs together);
/// beyond it, the exact but slower histogram path is taken.
pub const CANDIDATE_BYTES: usize = 256 << 20;

/// Default elements per chunk: small enough that (models + 4) f32 buffers per worker stay in L2/L3.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// mergekit: scale kept values so the L1 norm of the delta is unchanged.
    L1,
    /// The DARE paper: divide kept values by the density (DELLA: by each element's keep probability).
    InverseDensity,
}

impl Rescale {
    /// # Errors
    /// A parameter error for an unknown name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Rescale::None),
            "l1" => Ok(Rescale::L1),
            "inverse_density" => Ok(Rescale::InverseDensity),
            other => Err(CoreError::param(format!("unknown rescale '{other}' (expected none, l1 or inverse_density)"))),
        }
    }
}

/// The method of one tensor's merge with its method-wide values (the plan's `method` object, parsed).
#[derive(Clone, Copy, Debug)]
pub struct MethodSpec {
    pub method: Method,
    pub normalize: bool,
    pub lambda: f64,
    pub rescale: Rescale,
    pub seed: u64,
    pub params: Params,
}

impl MethodSpec {
    /// A spec with the method's default parameters (tests and simple callers).
    #[must_use]
    pub fn new(method: Method, normalize: bool, lambda: f64, rescale: Rescale, seed: u64) -> Self {
        MethodSpec { method, normalize, lambda, rescale, seed, params: Params::defaults(method) }
    }

    /// The plan's `method` object, checked.
    ///
    /// # Errors
    /// A parameter error (naming no tensor) for an unknown method or rescale, or a bad parameter.
    pub fn from_plan(m: &PlanMethod) -> Result<Self> {
        let method = Method::parse(&m.name)?;
        Ok(MethodSpec {
            method,
            normalize: m.normalize,
            lambda: m.lambda,
            rescale: Rescale::parse(&m.rescale)?,
            seed: m.seed,
            params: Params::parse(method, &m.params)?,
        })
    }
}

/// Where one input tensor's stored bytes are: in memory (an in-memory merge, or a tensor the executor read whole),
/// or in a file, read chunk by chunk with positioned reads as the passes need them (a tensor too large for the
/// memory budget: nothing of it is resident beyond the chunk being merged).
#[derive(Clone, Copy)]
pub enum Data<'a> {
    Mem(&'a [u8]),
    File { file: &'a SafetensorsFile, name: &'a str, entry: &'a TensorEntry },
}

/// Stored bytes of one input tensor.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub data: Data<'a>,
    pub dtype: DType,
}

impl<'a> Source<'a> {
    /// A source in memory.
    #[must_use]
    pub fn mem(bytes: &'a [u8], dtype: DType) -> Self {
        Source { data: Data::Mem(bytes), dtype }
    }

    /// Its size in bytes.
    #[must_use]
    pub fn byte_len(&self) -> usize {
        match self.data {
            Data::Mem(b) => b.len(),
            Data::File { entry, .. } => entry.len(),
        }
    }
}

#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub src: Source<'a>,
    pub weight: f64,
    pub density: f64,
    pub model_id: u32,
    /// breadcrumbs: fraction of the largest |delta| removed.
    pub gamma: f64,
    /// DELLA: half-width of the keep-probability window around the density.
    pub epsilon: f64,
}

impl<'a> Input<'a> {
    /// An input with the defaults of gamma and epsilon (`params::GAMMA`, `params::DELLA_EPSILON`).
    #[must_use]
    pub fn new(src: Source<'a>, weight: f64, density: f64, model_id: u32) -> Self {
        let gamma = params::GAMMA.default_value();
        Input { src, weight, density, model_id, gamma, epsilon: params::DELLA_EPSILON.default_value() }
    }

    /// An input with the plan's per-input values.
    #[must_use]
    pub fn with_values(src: Source<'a>, v: &InputValues) -> Self {
        Input { src, weight: v.weight, density: v.density, model_id: v.model_id, gamma: v.gamma, epsilon: v.epsilon }
    }
}

/// One tensor's merge: its sources, method and output dtype.
pub struct Job<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub base: Option<Source<'a>>,
    pub inputs: Vec<Input<'a>>,
    pub cast: Option<DType>,
    pub spec: MethodSpec,
    pub out_dtype: DType,
    /// Set by any pass that decodes a NaN or an infinity from a stored input (the check is folded into the decode
    /// loop, so it costs nothing); [`nonfinite_counts`] then counts them exactly, input by input.
    pub nonfinite: AtomicBool,
}

impl<'a> Job<'a> {
    /// A job from the plan's description of one tensor (name, shape, `method` object, dtypes) and its sources;
    /// the executor and the in-memory binding both build jobs here. The job is not validated yet ([`validate`]).
    ///
    /// # Errors
    /// A parameter error naming no tensor (the caller adds its context): an unknown method, rescale or dtype, or
    /// a bad parameter.
    pub fn from_plan(
        name: &'a str,
        shape: Vec<usize>,
        method: &PlanMethod,
        out_dtype: &str,
        cast_dtype: Option<&str>,
        base: Option<Source<'a>>,
        inputs: &[(Source<'a>, InputValues)],
    ) -> Result<Self> {
        let spec = MethodSpec::from_plan(method)?;
        Ok(Job {
            name,
            numel: shape.iter().product(),
            shape,
            base,
            inputs: inputs.iter().map(|(src, values)| Input::with_values(*src, values)).collect(),
            cast: cast_dtype.map(DType::parse).transpose()?,
            spec,
            out_dtype: DType::parse(out_dtype)?,
            nonfinite: AtomicBool::new(false),
        })
    }

    /// Every stored source, base first.
    pub fn sources(&self) -> impl Iterator<Item = &Source<'a>> {
        self.base.iter().chain(self.inputs.iter().map(|i| &i.src))
    }

    /// Whether a pass has decoded a NaN or an infinity from an input.
    #[must_use]
    pub fn saw_nonfinite(&self) -> bool {
        self.nonfinite.load(Ordering::Relaxed)
    }

    /// Elements per row: the last dimension (a 1-D tensor is one row, a scalar a row of one).
    #[must_use]
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1)
    }
}

/// Bytes a tensor's merge holds beyond the streaming chunk buffers: the whole-matrix working set of a spectral
/// method (0 for every other method and for tensors a spectral method only averages).
#[must_use]
pub fn working_bytes(spec: &MethodSpec, shape: &[usize], inputs: usize) -> u64 {
    match &spec.params {
        Params::Spectral(p) if !p.mean_only => methods::spectral::working_bytes(spec.method, shape, inputs),
        _ => 0,
    }
}

/// How a merge is split up; none of it changes the result.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub chunk_elems: usize,
    /// See [`CANDIDATE_BYTES`].
    pub candidate_bytes: usize,
}

impl Options {
    #[must_use]
    pub fn with_chunk(chunk_elems: usize) -> Self {
        Options { chunk_elems, candidate_bytes: CANDIDATE_BYTES }
    }
}

/// Merge one tensor, writing encoded output through `sink`. Runs on the current rayon pool.
///
/// # Errors
/// See [`merge_with`].
pub fn merge(job: &Job, chunk_elems: usize, sink: &dyn Sink) -> Result<()> {
    merge_with(job, &Options::with_chunk(chunk_elems), sink)
}

/// Validate the job, then run its method family's kernel.
///
/// # Errors
/// The job's validation errors, a kernel's parameter errors, the sink's errors.
pub fn merge_with(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    validate(job)?;
    // A panic in a kernel (a bug) unwinds out of the rayon pool to here and becomes an error naming the tensor,
    // never an abort of the caller's process.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_kernel(job, opts, sink))).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(CoreError::Internal(format!("tensor '{}': {what}", job.name)))
    })
}

fn run_kernel(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    match &job.spec.params {
        Params::TaskArithmetic(p) => methods::task_arithmetic::merge(job, *p, opts, sink),
        Params::Slerp(p) => methods::slerp::merge(job, p, opts, sink),
        Params::ModelStock(p) => methods::model_stock::merge(job, *p, opts, sink),
        Params::Sce(p) => methods::sce::merge(job, *p, opts, sink),
        Params::Ram(p) => methods::ram::merge(job, p, opts, sink),
        Params::Nearswap(p) => methods::nearswap::merge(job, *p, opts, sink),
        Params::ArceeFusion => methods::arcee_fusion::merge(job, opts, sink),
        Params::Tall(p) => methods::tall::merge(job, p, opts, sink),
        Params::Spectral(p) => methods::spectral::merge(job, p, opts, sink),
    }
}

/// Merge into a new in-memory buffer.
///
/// # Errors
/// See [`merge_with`].
pub fn merge_to_vec(job: &Job, opts: &Options) -> Result<Vec<u8>> {
    let mut out = vec![0u8; job.numel * job.out_dtype.size()];
    let sink = SliceSink::new(&mut out, job.out_dtype);
    merge_with(job, opts, &sink)?;
    Ok(out)
}
