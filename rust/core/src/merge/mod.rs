//! Merging one tensor, chunk by chunk, over all models at once.
//!
//! Elementwise methods take one pass. Whole-tensor statistics take extra streaming passes over the inputs
//! (re-decoding chunks from the memory maps rather than keeping anything whole): selection thresholds (TIES trim,
//! breadcrumbs, SCE: `trim`), L1 norms for rescaling and dot products (SLERP family, model stock: `gram`) by
//! fixed-block sums, per-row statistics over row-aligned chunks (DELLA ranks, arcee_fusion: `rows`). Every
//! pass's result is independent of chunk size and thread count, so the output bytes are too.
//!
//! Modules: `gta` (task arithmetic family and linear), `gram` (methods that are a linear combination of the
//! inputs with coefficients from their dot products), `pointwise` (nearswap, RAM, SCE), `rows` (row-wise
//! selection and statistics), `trim` (exact top-k), `params` (method-wide parameters).

mod gram;
mod gta;
mod params;
mod pointwise;
mod rows;
mod spectral;
pub(crate) mod trim;

pub use params::Params;

use rayon::prelude::*;

use crate::dtype::{self, DType};
use crate::error::{CoreError, Result};
use crate::kernels::combine::{self, Scratch};

/// Memory for the elements of the threshold's bin collected in pass B of a TIES trim (all inputs together);
/// beyond it, the exact but slower histogram path is taken.
pub const CANDIDATE_BYTES: usize = 256 << 20;

/// Default elements per chunk: small enough that (models + 4) f32 buffers per worker stay in L2/L3.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 16;

/// Elements per block of whole-tensor dot products and sums (a fixed partition: results do not depend on chunks).
const STAT_BLOCK: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    ModelStock,
    Sce,
    Ram,
    RamplusTl,
    Nearswap,
    ArceeFusion,
    TsvM,
    IsoC,
    IsoCts,
    Star,
    Consensus,
    TallMasks,
}

const METHODS: [(&str, Method); 25] = [
    ("linear", Method::Linear),
    ("task_arithmetic", Method::TaskArithmetic),
    ("ties", Method::Ties),
    ("dare_ties", Method::DareTies),
    ("dare_linear", Method::DareLinear),
    ("breadcrumbs", Method::Breadcrumbs),
    ("breadcrumbs_ties", Method::BreadcrumbsTies),
    ("della", Method::Della),
    ("della_linear", Method::DellaLinear),
    ("slerp", Method::Slerp),
    ("nuslerp", Method::Nuslerp),
    ("multislerp", Method::Multislerp),
    ("karcher", Method::Karcher),
    ("model_stock", Method::ModelStock),
    ("sce", Method::Sce),
    ("ram", Method::Ram),
    ("ramplus_tl", Method::RamplusTl),
    ("nearswap", Method::Nearswap),
    ("arcee_fusion", Method::ArceeFusion),
    ("tsv_m", Method::TsvM),
    ("iso_c", Method::IsoC),
    ("iso_cts", Method::IsoCts),
    ("star", Method::Star),
    ("consensus", Method::Consensus),
    ("tall_masks", Method::TallMasks),
];

/// How a task-arithmetic-family method sparsifies each delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sparsify {
    None,
    /// TIES: the k largest |delta|.
    Magnitude,
    /// DARE: Bernoulli(density).
    Random,
    /// breadcrumbs: drop the largest gamma·n and the smallest, keeping density·n.
    Outliers,
    /// DELLA: Bernoulli with a keep probability rising with the magnitude rank in the row.
    Della,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is the reference of task vectors (or the first endpoint of an interpolation).
    Required,
    /// With a base the method works on task vectors, without one on the tensors themselves.
    Optional,
    /// A base model is one more input (linear, karcher), so the job itself has none.
    Forbidden,
}

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        METHODS.iter().find(|(n, _)| *n == name).map(|&(_, m)| m).ok_or_else(|| {
            let names: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
            CoreError::param(format!("unknown merge method '{name}' (the engine knows {})", names.join(", ")))
        })
    }

    pub fn name(self) -> &'static str {
        METHODS.iter().find(|(_, m)| *m == self).map(|(n, _)| *n).expect("every method is listed")
    }

    fn sparsify(self) -> Sparsify {
        match self {
            Method::Ties => Sparsify::Magnitude,
            Method::DareTies | Method::DareLinear => Sparsify::Random,
            Method::Breadcrumbs | Method::BreadcrumbsTies => Sparsify::Outliers,
            Method::Della | Method::DellaLinear => Sparsify::Della,
            _ => Sparsify::None,
        }
    }

    /// Sign election and disjoint mean (mergekit's `consensus: sum`).
    fn consensus(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della)
    }

    fn is_gta(self) -> bool {
        matches!(
            self,
            Method::Linear
                | Method::TaskArithmetic
                | Method::Ties
                | Method::DareTies
                | Method::DareLinear
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
                | Method::Della
                | Method::DellaLinear
        )
    }

    /// Methods that work in the singular-vector space of each whole 2-D task vector (`spectral`).
    pub fn is_spectral(self) -> bool {
        matches!(self, Method::TsvM | Method::IsoC | Method::IsoCts | Method::Star)
    }

    pub fn base_policy(self) -> BasePolicy {
        match self {
            Method::Linear | Method::Karcher => BasePolicy::Forbidden,
            Method::Nuslerp | Method::Multislerp => BasePolicy::Optional,
            _ => BasePolicy::Required,
        }
    }

    /// The least and most number of non-base inputs.
    pub fn input_counts(self) -> (usize, Option<usize>) {
        match self {
            Method::Slerp | Method::Nearswap | Method::ArceeFusion => (1, Some(1)),
            Method::Nuslerp => (2, Some(2)),
            Method::ModelStock => (2, None),
            _ => (1, None),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// mergekit: scale kept values so the L1 norm of the delta is unchanged.
    L1,
    /// The DARE paper: divide kept values by the density (DELLA: by each element's keep probability).
    InverseDensity,
}

impl Rescale {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Rescale::None),
            "l1" => Ok(Rescale::L1),
            "inverse_density" => Ok(Rescale::InverseDensity),
            other => Err(CoreError::param(format!("unknown rescale '{other}' (expected none, l1 or inverse_density)"))),
        }
    }
}

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
    /// A spec with default parameters (tests and simple callers).
    pub fn new(method: Method, normalize: bool, lambda: f64, rescale: Rescale, seed: u64) -> Self {
        MethodSpec { method, normalize, lambda, rescale, seed, params: Params::default() }
    }
}

/// Stored bytes of one input tensor.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
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
    /// An input with mergekit's defaults for gamma (0.01) and epsilon (0.15).
    pub fn new(src: Source<'a>, weight: f64, density: f64, model_id: u32) -> Self {
        Input { src, weight, density, model_id, gamma: 0.01, epsilon: 0.15 }
    }
}

pub struct Job<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub base: Option<Source<'a>>,
    pub inputs: Vec<Input<'a>>,
    pub cast: Option<DType>,
    pub spec: MethodSpec,
    pub out_dtype: DType,
}

impl Job<'_> {
    /// Elements per row: the last dimension (a 1-D tensor is one row, a scalar a row of one).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1)
    }
}

/// Receives encoded output bytes for `[elem_start, elem_start + n)`; called from worker threads on disjoint ranges.
pub trait Sink: Sync {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()>;
}

/// Method-level checks that need no data; the message names the tensor.
pub fn validate(job: &Job) -> Result<()> {
    let err = |m: String| Err(CoreError::param(format!("tensor '{}': {m}", job.name)));
    let spec = &job.spec;
    let method = spec.method;
    let name = method.name();
    if job.inputs.is_empty() {
        return err("no input models".into());
    }
    match (method.base_policy(), job.base.is_some()) {
        (BasePolicy::Forbidden, true) => return err(format!("{name} takes no base (a base model is one more input)")),
        (BasePolicy::Required, false) => return err(format!("method {name} requires a base model")),
        _ => {}
    }
    let (lo, hi) = method.input_counts();
    let m = job.inputs.len();
    if m < lo || hi.is_some_and(|hi| m > hi) {
        let want = match hi {
            Some(hi) if hi == lo => format!("exactly {lo}"),
            Some(hi) => format!("{lo} to {hi}"),
            None => format!("at least {lo}"),
        };
        let other = if method.base_policy() == BasePolicy::Forbidden { "" } else { " non-base" };
        return err(format!("{name} takes {want}{other} input(s), got {m}"));
    }
    if job.shape.iter().product::<usize>() != job.numel {
        return err(format!("shape {:?} does not hold {} elements", job.shape, job.numel));
    }
    if !spec.lambda.is_finite() {
        return err(format!("lambda must be finite, got {}", spec.lambda));
    }
    let sparsify = method.sparsify();
    for (i, inp) in job.inputs.iter().enumerate() {
        if !inp.weight.is_finite() {
            return err(format!("input {i}: weight must be finite, got {}", inp.weight));
        }
        if !(inp.density > 0.0 && inp.density <= 1.0) {
            return err(format!("input {i}: density must be in (0, 1], got {}", inp.density));
        }
        if sparsify == Sparsify::Outliers && !(0.0..=1.0).contains(&inp.gamma) {
            return err(format!("input {i}: gamma must be in [0, 1], got {}", inp.gamma));
        }
        if sparsify == Sparsify::Della && inp.density < 1.0 {
            let (d, e) = (inp.density, inp.epsilon);
            // mergekit: "Epsilon must be chosen such that density +/- epsilon is in (0, 1)".
            if !e.is_finite() || d + e >= 1.0 || d - e <= 0.0 {
                return err(format!(
                    "input {i}: epsilon must be chosen such that density ± epsilon is in (0, 1), got density {d}, epsilon {e}"
                ));
            }
        }
    }
    let selects_whole = sparsify == Sparsify::Magnitude
        || (sparsify == Sparsify::Outliers && !spec.params.per_row)
        || (method == Method::Sce && spec.params.select_topk < 1.0);
    if selects_whole && job.numel as u64 >= u32::MAX as u64 {
        return err(format!("{} elements: magnitude selection supports tensors of fewer than 2^32", job.numel));
    }
    let row_sorts = sparsify == Sparsify::Della || (sparsify == Sparsify::Outliers && spec.params.per_row);
    if row_sorts && job.row_len() as u64 >= u32::MAX as u64 {
        return err(format!("rows of {} elements: row-wise ranking supports rows of fewer than 2^32", job.row_len()));
    }
    if method == Method::TallMasks && spec.params.task >= job.inputs.len() {
        return err(format!("tall_masks: task {} is out of range ({m} models)", spec.params.task));
    }
    if method.is_spectral() && job.shape.len() == 2 && job.shape[0].max(job.shape[1]) as u64 >= 1 << 31 {
        return err(format!("shape {:?}: a dimension of 2^31 or more is beyond the SVD kernels", job.shape));
    }
    if method == Method::Linear && spec.normalize && job.inputs.iter().map(|i| i.weight).sum::<f64>() == 0.0 {
        return err("linear with normalize: the weights sum to zero".into());
    }
    if method == Method::Multislerp
        && spec.params.normalize_weights
        && job.inputs.iter().map(|i| i.weight).sum::<f64>() == 0.0
    {
        return err("multislerp with normalize_weights: the weights sum to zero".into());
    }
    let sizes = job.base.iter().chain(job.inputs.iter().map(|i| &i.src));
    for s in sizes {
        if s.bytes.len() != job.numel * s.dtype.size() {
            return err(format!("{} bytes do not hold {} {} elements", s.bytes.len(), job.numel, s.dtype.name()));
        }
    }
    Ok(())
}

fn load(src: &Source, cast: Option<DType>, start: usize, out: &mut [f32]) {
    let sz = src.dtype.size();
    dtype::decode(src.dtype, &src.bytes[start * sz..(start + out.len()) * sz], out);
    if let Some(c) = cast {
        // Widening casts are exact; only a narrower (or differently rounded) dtype changes values.
        if c != DType::F32 && c != src.dtype {
            dtype::round_to(c, out);
        }
    }
}

/// Decode chunk `[start, start+len)` of every input into `s.x` (as deltas from the base when there is one).
fn load_deltas(job: &Job, start: usize, len: usize, s: &mut Scratch) {
    load_raw(job, start, len, s);
    if job.base.is_some() {
        for x in s.x.iter_mut() {
            combine::sub(&mut x[..len], &s.base[..len]);
        }
    }
}

/// Decode chunk `[start, start+len)` of the base into `s.base` and of every input into `s.x`, as stored.
fn load_raw(job: &Job, start: usize, len: usize, s: &mut Scratch) {
    s.resize(job.inputs.len(), len);
    if let Some(b) = &job.base {
        load(b, job.cast, start, &mut s.base[..len]);
    }
    for (inp, x) in job.inputs.iter().zip(s.x.iter_mut()) {
        load(&inp.src, job.cast, start, &mut x[..len]);
    }
}

fn release_chunk(job: &Job, opts: &Options, start: usize, len: usize) {
    if opts.release_inputs {
        for src in job.base.iter().chain(job.inputs.iter().map(|i| &i.src)) {
            let sz = src.dtype.size();
            crate::io::reader::release(&src.bytes[start * sz..(start + len) * sz]);
        }
    }
}

fn chunks(n: usize, size: usize) -> impl IndexedParallelIterator<Item = (usize, usize)> {
    let size = size.max(1);
    (0..n.div_ceil(size)).into_par_iter().map(move |c| (c * size, size.min(n - c * size)))
}

/// A chunk size rounded to whole rows (at least one row), for passes that need rows whole.
fn row_chunk(chunk: usize, row_len: usize) -> usize {
    (chunk / row_len).max(1) * row_len
}

/// The deltas of a job's inputs as selection keys.
struct Deltas<'a> {
    job: &'a Job<'a>,
    opts: &'a Options,
}

impl trim::Keys for Deltas<'_> {
    fn numel(&self) -> usize {
        self.job.numel
    }
    fn count(&self) -> usize {
        self.job.inputs.len()
    }
    fn load(&self, start: usize, len: usize, s: &mut Scratch) {
        load_deltas(self.job, start, len, s)
    }
    fn release(&self, start: usize, len: usize) {
        release_chunk(self.job, self.opts, start, len)
    }
}

/// Sums of per-block vectors over fixed blocks of `block` elements, added in block order (so independent of
/// threads); `f` computes one block's vector.
fn block_sums<F>(numel: usize, block: usize, width: usize, f: F) -> Vec<f64>
where
    F: Fn(&mut Scratch, usize, usize) -> Vec<f64> + Sync,
{
    let parts: Vec<Vec<f64>> = chunks(numel, block).map_init(Scratch::default, |s, (st, len)| f(s, st, len)).collect();
    let mut total = vec![0f64; width];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// The final pass: `f` fills `s.mixed[..len]` with the merged values of chunk `[start, start+len)`, which are
/// encoded to the output dtype and handed to the sink.
fn emit<F>(job: &Job, opts: &Options, chunk: usize, sink: &dyn Sink, f: F) -> Result<()>
where
    F: Fn(&mut Scratch, usize, usize) + Sync,
{
    let out_size = job.out_dtype.size();
    chunks(job.numel, chunk).try_for_each_init(Scratch::default, |s, (start, len)| {
        f(s, start, len);
        release_chunk(job, opts, start, len);
        s.bytes.resize(len * out_size, 0);
        dtype::encode(job.out_dtype, &s.mixed[..len], &mut s.bytes);
        sink.put(start, &s.bytes)
    })
}

/// Bytes a tensor's merge holds beyond the streaming chunk buffers: the whole-matrix working set of a spectral
/// method (0 for every other method and for tensors a spectral method only averages).
pub fn working_bytes(job: &Job) -> u64 {
    if job.spec.method.is_spectral() && !job.spec.params.mean_only {
        spectral::working_bytes(&job.shape)
    } else {
        0
    }
}

/// Write a whole tensor's merged values computed elsewhere (the torch hand-off), encoded like any merge.
pub fn emit_values(job: &Job, opts: &Options, values: &[f32], sink: &dyn Sink) -> Result<()> {
    if values.len() != job.numel {
        return Err(CoreError::param(format!(
            "tensor '{}': {} merged values for {} elements",
            job.name,
            values.len(),
            job.numel
        )));
    }
    emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
        s.resize(0, len);
        s.mixed[..len].copy_from_slice(&values[start..start + len]);
    })
}

/// Input `i` of a job (`None`: the base) decoded whole to f32, after the job's cast.
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
fn load_whole(job: &Job, src: &Source) -> Vec<f32> {
    let mut out = vec![0f32; job.numel];
    let chunk = DEFAULT_CHUNK_ELEMS;
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| load(src, job.cast, c * chunk, o));
    out
}

/// How a merge is split up; none of it changes the result.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub chunk_elems: usize,
    /// See [`CANDIDATE_BYTES`].
    pub candidate_bytes: usize,
    /// Unmap each chunk's input pages once a pass is done with them, so a tensor larger than the memory budget
    /// never becomes resident whole. Only for inputs that are read-only file maps (pages are re-read from the
    /// file if needed again); never for in-memory buffers.
    pub release_inputs: bool,
}

impl Options {
    pub fn with_chunk(chunk_elems: usize) -> Self {
        Options { chunk_elems, candidate_bytes: CANDIDATE_BYTES, release_inputs: false }
    }
}

/// Merge one tensor, writing encoded output through `sink`. Runs on the current rayon pool.
pub fn merge(job: &Job, chunk_elems: usize, sink: &dyn Sink) -> Result<()> {
    merge_with(job, &Options::with_chunk(chunk_elems), sink)
}

pub fn merge_with(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    validate(job)?;
    let m = job.spec.method;
    if m.is_gta() {
        return gta::merge(job, opts, sink);
    }
    match m {
        Method::Slerp | Method::Nuslerp | Method::Multislerp | Method::Karcher | Method::ModelStock => {
            gram::merge(job, opts, sink)
        }
        Method::ArceeFusion => rows::arcee_fusion(job, opts, sink),
        m if m.is_spectral() => spectral::merge(job, opts, sink),
        _ => pointwise::merge(job, opts, sink),
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
        SliceSink { ptr: out.as_mut_ptr(), len: out.len(), elem_size: dtype.size() }
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

/// Merge into a new in-memory buffer.
pub fn merge_to_vec(job: &Job, opts: &Options) -> Result<Vec<u8>> {
    let mut out = vec![0u8; job.numel * job.out_dtype.size()];
    let sink = SliceSink::new(&mut out, job.out_dtype);
    merge_with(job, opts, &sink)?;
    Ok(out)
}
