//! Merging one tensor, chunk by chunk, over all models at once.
//!
//! Elementwise methods take one pass. Whole-tensor statistics take extra streaming passes over the inputs
//! (re-decoding chunks from the memory maps rather than keeping anything whole): the TIES trim threshold by
//! radix select (two histogram passes, plus a tie-count pass only when ties straddle the threshold), the L1
//! norms for rescaling by fixed-block sums. Every pass's result is independent of chunk size and thread count,
//! so the output bytes are too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use crate::dtype::{self, DType};
use crate::error::{CoreError, Result};
use crate::kernels::combine::{self, Scale, Scratch};
use crate::kernels::norms::{self, BLOCK};
use crate::kernels::select::{self, TrimRule, HIGH_BINS, LOW_BINS};
use crate::rng::Stream;

/// Memory for the elements of the threshold's bin collected in pass B of a TIES trim (all inputs together);
/// beyond it, the exact but slower histogram path is taken.
pub const CANDIDATE_BYTES: usize = 256 << 20;

/// Default elements per chunk: small enough that (models + 4) f32 buffers per worker stay in L2/L3.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sparsify {
    None,
    Magnitude,
    Random,
}

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Method::Linear,
            "task_arithmetic" => Method::TaskArithmetic,
            "ties" => Method::Ties,
            "dare_ties" => Method::DareTies,
            "dare_linear" => Method::DareLinear,
            other => {
                return Err(CoreError::param(format!(
                    "unknown merge method '{other}' (the engine knows linear, task_arithmetic, ties, dare_ties, dare_linear)"
                )))
            }
        })
    }

    fn sparsify(self) -> Sparsify {
        match self {
            Method::Ties => Sparsify::Magnitude,
            Method::DareTies | Method::DareLinear => Sparsify::Random,
            Method::Linear | Method::TaskArithmetic => Sparsify::None,
        }
    }

    fn consensus(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// mergekit: scale kept values so the L1 norm of the delta is unchanged.
    L1,
    /// The DARE paper: divide kept values by the density.
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
}

pub struct Job<'a> {
    pub name: &'a str,
    pub numel: usize,
    pub base: Option<Source<'a>>,
    pub inputs: Vec<Input<'a>>,
    pub cast: Option<DType>,
    pub spec: MethodSpec,
    pub out_dtype: DType,
}

/// Receives encoded output bytes for `[elem_start, elem_start + n)`; called from worker threads on disjoint ranges.
pub trait Sink: Sync {
    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()>;
}

/// Method-level checks that need no data; the message names the tensor.
pub fn validate(job: &Job) -> Result<()> {
    let err = |m: String| Err(CoreError::param(format!("tensor '{}': {m}", job.name)));
    let spec = &job.spec;
    if job.inputs.is_empty() {
        return err("no input models".into());
    }
    match (spec.method, job.base.is_some()) {
        (Method::Linear, true) => return err("linear takes no base (a base model is one more input)".into()),
        (m, false) if m != Method::Linear => return err(format!("method {m:?} requires a base model")),
        _ => {}
    }
    if !spec.lambda.is_finite() {
        return err(format!("lambda must be finite, got {}", spec.lambda));
    }
    for (i, inp) in job.inputs.iter().enumerate() {
        if !inp.weight.is_finite() {
            return err(format!("input {i}: weight must be finite, got {}", inp.weight));
        }
        if !(inp.density > 0.0 && inp.density <= 1.0) {
            return err(format!("input {i}: density must be in (0, 1], got {}", inp.density));
        }
    }
    if spec.method.sparsify() == Sparsify::Magnitude && job.numel as u64 >= u32::MAX as u64 {
        return err(format!("{} elements: magnitude trimming supports tensors of fewer than 2^32", job.numel));
    }
    if spec.method == Method::Linear && spec.normalize && job.inputs.iter().map(|i| i.weight).sum::<f64>() == 0.0 {
        return err("linear with normalize: the weights sum to zero".into());
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
    s.resize(job.inputs.len(), len);
    if let Some(b) = &job.base {
        load(b, job.cast, start, &mut s.base[..len]);
    }
    for (inp, x) in job.inputs.iter().zip(s.x.iter_mut()) {
        load(&inp.src, job.cast, start, &mut x[..len]);
        if job.base.is_some() {
            combine::sub(&mut x[..len], &s.base[..len]);
        }
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

/// The keep rule of every input for magnitude trimming (TIES): k = max(1, int(density·n)) largest |delta|.
///
/// Usually two passes in all (this one and the merge's own): a sample brackets the k-th largest |delta|, one
/// pass counts the elements above the bracket and collects those inside it, and an exact selection among the
/// collected finishes the job in memory. If the sample misled (the k-th largest is outside the bracket) or the
/// bracket would hold more than the memory budget allows, that input falls back to radix select over
/// histograms (`radix_rules`): exact too, two or three passes more.
fn trim_rules(job: &Job, chunk: usize, opts: &Options) -> Vec<TrimRule> {
    let n = job.numel as u64;
    let ks: Vec<Option<u64>> = job
        .inputs
        .iter()
        .map(|i| {
            // mergekit 0.1.5: k = max(1, int(density·n)); density 1 keeps everything.
            let k = ((i.density * n as f64) as u64).max(1);
            (i.density < 1.0 && k < n).then_some(k)
        })
        .collect();
    let mut rules = vec![TrimRule::ALL; job.inputs.len()];
    if ks.iter().all(Option::is_none) {
        return rules;
    }
    let brackets = sample_brackets(job, &ks, opts.candidate_bytes);
    let m = job.inputs.len();
    if brackets.iter().any(Option::is_some) {
        // Hard cap on what is collected, in case the sample underestimated the bracket's population.
        let cap_all = (opts.candidate_bytes / 8) as u64;
        let caps: Vec<u64> =
            brackets.iter().map(|b| b.map_or(0, |b| (2 * b.expected + (1 << 20)).min(cap_all))).collect();
        let collected: Vec<AtomicU64> = (0..m).map(|_| AtomicU64::new(0)).collect();
        let overflow: Vec<AtomicBool> = (0..m).map(|_| AtomicBool::new(false)).collect();
        struct Pass1 {
            s: Scratch,
            above: Vec<u64>,
            cands: Vec<Vec<u64>>,
            /// (input, chunk start, chunk length, count of each special value in the chunk)
            specials: Vec<(usize, usize, usize, [u64; select::SPECIALS])>,
        }
        let new_acc =
            || Pass1 { s: Scratch::default(), above: vec![0; m], cands: vec![Vec::new(); m], specials: Vec::new() };
        let pass1 = chunks(job.numel, chunk)
            .fold(new_acc, |mut acc, (start, len)| {
                load_deltas(job, start, len, &mut acc.s);
                for (i, b) in brackets.iter().enumerate() {
                    let Some(b) = b else { continue };
                    if overflow[i].load(Ordering::Relaxed) {
                        continue;
                    }
                    let before = acc.cands[i].len();
                    let mut counts = [0u64; select::SPECIALS];
                    acc.above[i] += select::bracket_collect(
                        &acc.s.x[i][..len],
                        b.lo,
                        b.hi,
                        &b.specials,
                        start,
                        &mut acc.cands[i],
                        &mut counts,
                    );
                    if counts.iter().any(|&c| c > 0) {
                        acc.specials.push((i, start, len, counts));
                    }
                    let added = (acc.cands[i].len() - before) as u64;
                    if collected[i].fetch_add(added, Ordering::Relaxed) + added > caps[i] {
                        overflow[i].store(true, Ordering::Relaxed);
                        acc.cands[i] = Vec::new();
                    }
                }
                release_chunk(job, opts, start, len);
                acc
            })
            .reduce(new_acc, |mut a, mut b| {
                // Candidate keys carry their element index, so the order they are gathered in does not matter.
                for i in 0..m {
                    a.above[i] += b.above[i];
                    a.cands[i].append(&mut b.cands[i]);
                }
                a.specials.append(&mut b.specials);
                a
            });
        let mut pass1 = pass1;
        pass1.specials.sort_unstable_by_key(|c| (c.0, c.1));
        for (i, k) in ks.iter().enumerate() {
            let (Some(k), Some(b)) = (k, brackets[i]) else { continue };
            if overflow[i].load(Ordering::Relaxed) || pass1.above[i] >= *k {
                continue;
            }
            let chunk_counts: Vec<(usize, usize, [u64; select::SPECIALS])> =
                pass1.specials.iter().filter(|c| c.0 == i).map(|c| (c.1, c.2, c.3)).collect();
            let cands = std::mem::take(&mut pass1.cands[i]);
            match select::select_with_specials(cands, &b.specials, &chunk_counts, k - pass1.above[i]) {
                Some(select::Selected::Rule(r)) => rules[i] = r,
                Some(select::Selected::Special { bits, chunk_start, chunk_len, nth }) => {
                    // The threshold is a special value: find the index of its nth occurrence in that chunk.
                    let mut s = Scratch::default();
                    load_deltas(job, chunk_start, chunk_len, &mut s);
                    let last_tie = select::nth_equal(&s.x[i][..chunk_len], bits, nth, chunk_start).expect("counted");
                    rules[i] = TrimRule { threshold_bits: bits, last_tie, keep_all: false };
                }
                None => {}
            }
        }
    }
    // Inputs the bracket did not settle (or that had none).
    let rest: Vec<Option<u64>> = ks.iter().zip(&rules).map(|(k, r)| if r.keep_all { *k } else { None }).collect();
    if rest.iter().any(Option::is_some) {
        for (i, r) in radix_rules(job, chunk, opts, &rest).into_iter().enumerate() {
            if rest[i].is_some() {
                rules[i] = r;
            }
        }
    }
    rules
}

/// Elements per sample block, blocks per sample, and the size up to which a whole tensor is simply collected.
const SAMPLE_BLOCK: usize = 4096;
const SAMPLE_BLOCKS: usize = 256;
const COLLECT_ALL: usize = 1 << 20;

/// |delta| bit patterns expected to bracket the k-th largest: elements above `hi` are counted, those in
/// `[lo, hi]` collected (`expected` of them, judging by the sample) — except those equal to one of the
/// `specials`, values frequent in the sample (bf16 deltas sit on a coarse grid, so thousands of elements share a
/// value), which are only counted per chunk.
#[derive(Clone, Copy, Debug)]
struct Bracket {
    lo: u32,
    hi: u32,
    expected: u64,
    specials: [u32; select::SPECIALS],
}

fn sample_brackets(job: &Job, ks: &[Option<u64>], budget_bytes: usize) -> Vec<Option<Bracket>> {
    let n = job.numel;
    let mut budget = (budget_bytes / 8) as u64;
    let mut take = |expected: u64| {
        let ok = expected <= budget;
        if ok {
            budget -= expected;
        }
        ok
    };
    if n <= COLLECT_ALL {
        return ks
            .iter()
            .map(|k| {
                k.and_then(|_| {
                    take(n as u64).then_some(Bracket {
                        lo: 0,
                        hi: u32::MAX,
                        expected: n as u64,
                        specials: [u32::MAX; select::SPECIALS],
                    })
                })
            })
            .collect();
    }
    // Evenly spaced blocks, first and last at the ends of the tensor; about n/64 elements in all.
    let nb = (n / 64 / SAMPLE_BLOCK).clamp(16, SAMPLE_BLOCKS);
    let mut samples: Vec<Vec<u32>> = vec![Vec::new(); ks.len()];
    let mut s = Scratch::default();
    for b in 0..nb {
        let start = b * (n - SAMPLE_BLOCK) / (nb - 1);
        load_deltas(job, start, SAMPLE_BLOCK, &mut s);
        for (i, k) in ks.iter().enumerate() {
            if k.is_some() {
                samples[i].extend(s.x[i][..SAMPLE_BLOCK].iter().map(|&v| select::abs_bits(v)));
            }
        }
    }
    ks.iter()
        .zip(samples)
        .map(|(k, mut sample)| {
            let k = (*k)?;
            let ms = sample.len() as f64;
            let p = k as f64 / n as f64;
            let rank = p * ms;
            // Four binomial standard deviations, plus slack for the correlation within blocks.
            let margin = 4.0 * (ms * p * (1.0 - p)).sqrt() + 0.002 * ms + 4.0;
            let (top, bottom) = (rank - margin, rank + margin);
            // The sample's values at those ranks from the top (selection, not a sort).
            let mut at_rank = |r: usize| *sample.select_nth_unstable_by(r, |a, b| b.cmp(a)).1;
            let hi = if top < 0.0 { u32::MAX } else { at_rank(top as usize) };
            let lo = if bottom >= ms - 1.0 { 0 } else { at_rank(bottom.ceil() as usize) };
            let specials = frequent_values(&mut sample, lo, hi);
            // What will be collected: the bracket's share of the sample, less its special values.
            let inside = sample.iter().filter(|&&b| b >= lo && b <= hi && !specials.contains(&b)).count();
            let expected = (inside as f64 / ms * n as f64) as u64 + 1;
            take(expected).then_some(Bracket { lo, hi, expected, specials })
        })
        .collect()
}

/// Up to `SPECIALS` values that fill at least 2% of the sample's part inside `[lo, hi]` (most frequent first);
/// unused slots hold `u32::MAX`, which no |x| bit pattern equals.
fn frequent_values(sample: &mut [u32], lo: u32, hi: u32) -> [u32; select::SPECIALS] {
    let mut inside: Vec<u32> = sample.iter().copied().filter(|&b| b >= lo && b <= hi).collect();
    inside.sort_unstable();
    let mut runs: Vec<(usize, u32)> = inside.chunk_by(|a, b| a == b).map(|r| (r.len(), r[0])).collect();
    runs.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = [u32::MAX; select::SPECIALS];
    let floor = (inside.len() / 50).max(16);
    for (slot, &(count, v)) in out.iter_mut().zip(runs.iter().filter(|r| r.0 >= floor)) {
        let _ = count;
        *slot = v;
    }
    out
}

/// Radix select over histograms of the |delta| bit patterns, for the inputs with `Some(k)` in `ks`: a pass for the
/// high 15 bits, one for the low 16 bits of the bin holding the k-th largest (or collecting that bin's elements
/// when they fit the budget), and one counting ties when they straddle the threshold.
fn radix_rules(job: &Job, chunk: usize, opts: &Options, ks: &[Option<u64>]) -> Vec<TrimRule> {
    let ks = ks.to_vec();
    if ks.iter().all(Option::is_none) {
        return vec![TrimRule::ALL; job.inputs.len()];
    }
    let m = job.inputs.len();
    let high = chunks(job.numel, chunk)
        .fold(
            || (Scratch::default(), vec![[0u32; HIGH_BINS]; m]),
            |(mut s, mut h), (start, len)| {
                load_deltas(job, start, len, &mut s);
                for (i, k) in ks.iter().enumerate() {
                    if k.is_some() {
                        select::hist_high(&s.x[i][..len], &mut h[i]);
                    }
                }
                release_chunk(job, opts, start, len);
                (s, h)
            },
        )
        .map(|(_, h)| h)
        .reduce(|| vec![[0u32; HIGH_BINS]; m], add_hist);
    let bins: Vec<Option<(u32, u64)>> = ks
        .iter()
        .enumerate()
        .map(|(i, k)| {
            k.map(|k| {
                let (b, need) = select::find_bin(&high[i], k);
                (b as u32, need)
            })
        })
        .collect();
    // Pass B. Where the threshold's bin is small enough, collect its elements (index order) and finish the
    // selection in memory; otherwise histogram its low bits, and count ties in one more pass if they straddle.
    let mut budget = opts.candidate_bytes;
    let collect: Vec<bool> = bins
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            Some((bin, _)) => {
                let bytes = high[i][*bin as usize] as usize * std::mem::size_of::<u64>();
                let fits = bytes <= budget;
                if fits {
                    budget -= bytes;
                }
                fits
            }
            None => false,
        })
        .collect();
    // Candidates are kept per (input, chunk start) and put back in index order after the parallel pass;
    // low-bit histograms are summed as they go, never kept per chunk.
    struct PassB {
        s: Scratch,
        cands: Vec<(usize, usize, Vec<u64>)>,
        lows: Vec<[u32; LOW_BINS]>,
    }
    let any_hist = bins.iter().zip(&collect).any(|(b, &c)| b.is_some() && !c);
    let new_acc = || PassB {
        s: Scratch::default(),
        cands: Vec::new(),
        lows: vec![[0u32; LOW_BINS]; if any_hist { m } else { 0 }],
    };
    let pass_b = chunks(job.numel, chunk)
        .fold(new_acc, |mut acc, (start, len)| {
            load_deltas(job, start, len, &mut acc.s);
            for (i, b) in bins.iter().enumerate() {
                if let Some((bin, _)) = b {
                    if collect[i] {
                        let mut c = Vec::new();
                        select::collect_bin(&acc.s.x[i][..len], *bin, start, &mut c);
                        acc.cands.push((i, start, c));
                    } else {
                        select::hist_low(&acc.s.x[i][..len], *bin, &mut acc.lows[i]);
                    }
                }
            }
            release_chunk(job, opts, start, len);
            acc
        })
        .reduce(new_acc, |mut a, b| {
            a.cands.extend(b.cands);
            a.lows = add_hist(std::mem::take(&mut a.lows), b.lows);
            a
        });
    let mut cands = pass_b.cands;
    cands.sort_unstable_by_key(|c| (c.0, c.1));
    let mut rules = vec![TrimRule::ALL; m];
    // (input, ties to keep) for inputs whose last kept tie still has to be found by a counting pass.
    let mut pending: Vec<(usize, u64)> = Vec::new();
    for (i, b) in bins.iter().enumerate() {
        let Some((bin, need)) = *b else { continue };
        if collect[i] {
            let mine: Vec<u64> = cands.iter().filter(|c| c.0 == i).flat_map(|c| c.2.iter().copied()).collect();
            rules[i] = select::select_in_bin(&mine, bin, need);
        } else {
            let hist = &pass_b.lows[i];
            let (lo, ties_kept) = select::find_bin(hist, need);
            let bits = (bin << 16) | lo as u32;
            rules[i] = TrimRule { threshold_bits: bits, last_tie: usize::MAX, keep_all: false };
            if ties_kept < hist[lo] as u64 {
                pending.push((i, ties_kept));
            }
        }
    }
    drop(cands);
    // Ties straddle the threshold: find the index of the last tie kept (lowest indices first).
    if !pending.is_empty() {
        let counts: Vec<Vec<u64>> = chunks(job.numel, chunk)
            .map_init(Scratch::default, |s, (start, len)| {
                load_deltas(job, start, len, s);
                pending.iter().map(|&(i, _)| select::count_equal(&s.x[i][..len], rules[i].threshold_bits)).collect()
            })
            .collect();
        let size = chunk.max(1);
        for (p, &(i, ties_kept)) in pending.iter().enumerate() {
            let mut before = 0u64;
            for (c, cnt) in counts.iter().enumerate() {
                if before + cnt[p] >= ties_kept {
                    let start = c * size;
                    let len = size.min(job.numel - start);
                    let mut s = Scratch::default();
                    load_deltas(job, start, len, &mut s);
                    let bits = rules[i].threshold_bits;
                    rules[i].last_tie =
                        select::nth_equal(&s.x[i][..len], bits, ties_kept - before, start).expect("counted");
                    break;
                }
                before += cnt[p];
            }
        }
    }
    rules
}

fn add_hist<const N: usize>(mut a: Vec<[u32; N]>, b: Vec<[u32; N]>) -> Vec<[u32; N]> {
    if a.len() < b.len() {
        return add_hist(b, a);
    }
    for (x, y) in a.iter_mut().zip(&b) {
        x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
    }
    a
}

/// The keep mask of input `i` for chunk `[start, start+len)`, from its delta already in `s.x[i]`.
fn mask_into(job: &Job, i: usize, rules: &[TrimRule], streams: &[Stream], start: usize, len: usize, s: &mut Scratch) {
    let inp = &job.inputs[i];
    match job.spec.method.sparsify() {
        Sparsify::Magnitude => rules[i].mask(start, &s.x[i][..len], &mut s.keep[..len]),
        Sparsify::Random => streams[i].keep_mask(start, inp.density, &mut s.keep[..len]),
        Sparsify::None => s.keep[..len].fill(true),
    }
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
    let chunk = opts.chunk_elems.max(1);
    let spec = job.spec;
    let m = job.inputs.len();
    let sparsify = spec.method.sparsify();
    let rules = if sparsify == Sparsify::Magnitude { trim_rules(job, chunk, opts) } else { vec![TrimRule::ALL; m] };
    let streams: Vec<Stream> = job.inputs.iter().map(|i| Stream::new(spec.seed, job.name, i.model_id)).collect();
    // Density 1 is the identity and is not rescaled (as in mergekit); any lower density is, even where the
    // trim happens to keep every element (k = max(1, int(d·n)) = n on tiny tensors).
    let sparse: Vec<bool> = job.inputs.iter().map(|inp| sparsify != Sparsify::None && inp.density < 1.0).collect();
    let mut scales = vec![Scale::Mul(1.0); m];
    match spec.rescale {
        Rescale::None => {}
        Rescale::InverseDensity => {
            for i in 0..m {
                if sparse[i] {
                    // Divide, as the DARE paper and PEFT do (not multiply by a rounded reciprocal).
                    scales[i] = Scale::Div(job.inputs[i].density as f32);
                }
            }
        }
        Rescale::L1 if sparse.iter().any(|&s| s) => {
            let per_block: Vec<Vec<(f64, f64)>> = chunks(job.numel, BLOCK)
                .map_init(Scratch::default, |s, (start, len)| {
                    load_deltas(job, start, len, s);
                    release_chunk(job, opts, start, len);
                    (0..m)
                        .map(|i| {
                            mask_into(job, i, &rules, &streams, start, len, s);
                            norms::l1_pair(&s.x[i][..len], &s.keep[..len])
                        })
                        .collect()
                })
                .collect();
            for i in (0..m).filter(|&i| sparse[i]) {
                let (all, kept) = per_block.iter().fold((0f64, 0f64), |(a, k), b| (a + b[i].0, k + b[i].1));
                // mergekit skips the rescale when either norm is below 1e-7.
                if all >= 1e-7 && kept >= 1e-7 {
                    scales[i] = Scale::Mul((all / kept) as f32);
                }
            }
        }
        Rescale::L1 => {}
    }
    let weights: Vec<f32> = job.inputs.iter().map(|i| i.weight as f32).collect();
    let weight_sum: f32 = weights.iter().sum();
    let lambda = spec.lambda as f32;
    let out_size = job.out_dtype.size();
    chunks(job.numel, chunk).try_for_each_init(Scratch::default, |s, (start, len)| {
        load_deltas(job, start, len, s);
        release_chunk(job, opts, start, len);
        for i in 0..m {
            let keep = if sparse[i] {
                mask_into(job, i, &rules, &streams, start, len, s);
                Some(&s.keep[..len])
            } else {
                None
            };
            combine::weigh(&mut s.x[i][..len], keep, scales[i], weights[i]);
        }
        let xs = &s.x;
        if spec.method == Method::Linear {
            combine::sum(xs, &mut s.mixed[..len]);
            // Linear divides by the weight sum (validated non-zero) and has no base.
            if spec.normalize {
                s.divisor[..len].fill(weight_sum);
            }
            let divisor = spec.normalize.then_some(&s.divisor[..len]);
            combine::finish(&mut s.mixed[..len], divisor, 1.0, None);
        } else {
            if spec.method.consensus() {
                combine::elect_and_mix(xs, &weights, &mut s.total[..len], &mut s.mixed[..len], &mut s.divisor[..len]);
            } else {
                combine::sum(xs, &mut s.mixed[..len]);
                let d = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
                s.divisor[..len].fill(d);
            }
            let divisor = spec.normalize.then_some(&s.divisor[..len]);
            combine::finish(&mut s.mixed[..len], divisor, lambda, Some(&s.base[..len]));
        }
        s.bytes.resize(len * out_size, 0);
        dtype::encode(job.out_dtype, &s.mixed[..len], &mut s.bytes);
        sink.put(start, &s.bytes)
    })
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
