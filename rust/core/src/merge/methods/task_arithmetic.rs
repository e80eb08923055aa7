//! linear and mergekit's generalized task arithmetic family: task_arithmetic, ties, dare_ties, dare_linear,
//! breadcrumbs, breadcrumbs_ties, della, della_linear.
//!
//! With base θ₀ and task vectors τ_i = θ_i − θ₀, each τ_i is sparsified to m_i ⊙ τ_i (the method table's
//! sparsifier: TIES keeps the ⌊density·n⌋ largest |τ|, DARE a Bernoulli(density) mask, breadcrumbs the outlier
//! band, DELLA a Bernoulli with rank-dependent probabilities; see `select/`), optionally rescaled (L1 norm
//! matching or division by the keep probability), and weighted: δ_i = w_i·s_i·(m_i ⊙ τ_i). Then
//! θ = θ₀ + λ·Σ δ_i (optionally divided by Σ w_i), or, with consensus (ties, dare_ties, breadcrumbs_ties, della),
//! θ = θ₀ + λ·Σ_{i: sign δ_i = sign Σ δ} δ_i / Σ_{i: agrees} w_i elementwise. linear has no base:
//! θ = Σ w_i θ_i (/ Σ w_i with normalize).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::combine::{self, Scale, Scratch};
use crate::kernels::norms::{self, BLOCK};
use crate::kernels::select::TrimRule;
use crate::merge::params::TaskArithmeticParams;
use crate::merge::passes::{chunks, emit, load_deltas, row_chunk};
use crate::merge::select::sparsify::{band_mask, della_probs, outlier_band, outlier_band_rows, RowRanks};
use crate::merge::select::topk::{select_rules, SelectionKeys};
use crate::merge::{Job, Method, Options, Rescale, Sink, Sparsify};
use crate::rng::Stream;

/// The task vectors (deltas from the base) of a job's inputs, as selection keys.
struct TaskVectorKeys<'a> {
    job: &'a Job<'a>,
}

impl SelectionKeys for TaskVectorKeys<'_> {
    fn numel(&self) -> usize {
        self.job.numel
    }
    fn count(&self) -> usize {
        self.job.inputs.len()
    }
    fn load(&self, start: usize, len: usize, s: &mut Scratch) {
        load_deltas(self.job, start, len, s);
    }
}

/// Each task vector twice (inputs 0..m, then m..2m again): breadcrumbs ranks every delta for two sets (the outer
/// band and the top outliers), and one selection over the doubled keys reads and decodes the inputs once for both.
struct TwiceKeys<'a> {
    job: &'a Job<'a>,
}

impl SelectionKeys for TwiceKeys<'_> {
    fn numel(&self) -> usize {
        self.job.numel
    }
    fn count(&self) -> usize {
        2 * self.job.inputs.len()
    }
    fn load(&self, start: usize, len: usize, s: &mut Scratch) {
        let m = self.job.inputs.len();
        // Keep the copies' buffers across chunks (the load below trims `s.x` to the inputs).
        let copies = if s.x.len() > m { s.x.split_off(m) } else { Vec::new() };
        load_deltas(self.job, start, len, s);
        s.x.extend(copies);
        s.x.resize_with(2 * m, Vec::new);
        let (x, copies) = s.x.split_at_mut(m);
        for (c, x) in copies.iter_mut().zip(x.iter()) {
            c.clear();
            c.extend_from_slice(&x[..len]);
        }
    }
}

/// What decides each input's keep mask.
struct MaskRules {
    /// TIES: the trim; breadcrumbs: the top (n − n_bot) by |delta|.
    rules: Vec<TrimRule>,
    /// breadcrumbs: the top outliers removed from `rules`' set.
    tops: Vec<TrimRule>,
    streams: Vec<Stream>,
    row_len: usize,
    per_row: bool,
}

thread_local! {
    /// Each worker's buffers for the row-wise sparsifiers' rankings (reused: they only ever grow).
    static RANKS: RefCell<RowRanks> = RefCell::new(RowRanks::default());
}

/// The keep mask of input `i` for chunk `[start, start+len)` (row-aligned for row-wise sparsifiers), from its
/// delta already in `s.x[i]`; DELLA also leaves each element's keep probability in `s.probs`.
fn mask_into(job: &Job, i: usize, masks: &MaskRules, start: usize, len: usize, s: &mut Scratch) {
    let inp = &job.inputs[i];
    let x = &s.x[i][..len];
    let keep = &mut s.keep[..len];
    match job.spec.method.sparsify() {
        Sparsify::Magnitude => masks.rules[i].mask(start, x, keep),
        Sparsify::Random => masks.streams[i].keep_mask(start, inp.density, keep),
        Sparsify::Outliers if masks.per_row => RANKS.with_borrow_mut(|r| {
            outlier_band_rows(x, masks.row_len, inp.density, inp.gamma, keep, r);
        }),
        Sparsify::Outliers => band_mask(&masks.rules[i], &masks.tops[i], start, x, keep),
        Sparsify::Della => {
            RANKS.with_borrow_mut(|r| della_probs(x, masks.row_len, inp.density, inp.epsilon, &mut s.probs[..len], r));
            masks.streams[i].keep_mask_each(start, &s.probs[..len], keep);
        }
        Sparsify::None => keep.fill(true),
    }
}

/// One L1 block's (all, kept) norms per input, and its sparse inputs' keep masks as bits when they are cached.
type BlockNorms = (Vec<(f64, f64)>, Vec<Vec<u64>>);

/// A keep mask as bits, 64 to a word (element j in bit j % 64 of word j / 64). Eight bools at a time: read as a
/// little-endian u64 of 0/1 bytes, one multiply gathers byte i's bit into bit 56 + i (no two partial products
/// share a bit position, so nothing carries into the top byte).
fn pack_bits(keep: &[bool]) -> Vec<u64> {
    let byte = |e: &[bool]| {
        let mut b = [0u8; 8];
        b.iter_mut().zip(e).for_each(|(d, &k)| *d = u8::from(k));
        u64::from_le_bytes(b).wrapping_mul(0x0102_0408_1020_4080) >> 56
    };
    let mut words = keep.chunks_exact(64);
    let mut out: Vec<u64> =
        (&mut words).map(|c| c.chunks_exact(8).enumerate().fold(0u64, |w, (j, e)| w | (byte(e) << (8 * j)))).collect();
    let rest = words.remainder();
    if !rest.is_empty() {
        out.push(rest.chunks(8).enumerate().fold(0u64, |w, (j, e)| w | (byte(e) << (8 * j))));
    }
    out
}

/// The inverse of [`pack_bits`], eight elements at a time: the byte broadcast to all eight bytes, byte i keeps
/// its bit i, and adding 0x7f carries any set bit into bit 7 of the same byte.
fn unpack_bits(bits: &[u64], keep: &mut [bool]) {
    let spread = |w: u64, j: usize| {
        let byte = (w >> (8 * j)) & 0xff;
        ((((byte.wrapping_mul(0x0101_0101_0101_0101) & 0x8040_2010_0804_0201) + 0x7f7f_7f7f_7f7f_7f7f) >> 7)
            & 0x0101_0101_0101_0101)
            .to_le_bytes()
    };
    let whole = keep.len() / 64;
    let mut words = keep.chunks_exact_mut(64);
    for (c, &w) in (&mut words).zip(bits) {
        for (j, e) in c.chunks_exact_mut(8).enumerate() {
            // The eight 0/1 bytes stored at once, not compared and stored one by one (which had made this a tenth
            // of a DARE merge's time).
            let e: &mut [bool; 8] = e.try_into().expect("eight elements");
            // SAFETY: every byte of `spread` is 0 or 1, the two valid representations of a bool.
            *e = unsafe { std::mem::transmute::<[u8; 8], [bool; 8]>(spread(w, j)) };
        }
    }
    let rest = words.into_remainder();
    if let Some(&w) = bits.get(whole) {
        for (j, e) in rest.chunks_mut(8).enumerate() {
            e.iter_mut().zip(spread(w, j)).for_each(|(k, d)| *k = d != 0);
        }
    }
}

pub(crate) fn merge(job: &Job, params: TaskArithmeticParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let spec = job.spec;
    let m = job.inputs.len();
    let n = job.numel as u64;
    let sparsify = spec.method.sparsify();
    let row_len = job.row_len();
    let per_row = sparsify == Sparsify::Della || (sparsify == Sparsify::Outliers && params.per_row);
    let chunk = if per_row { row_chunk(opts.chunk_elems.max(1), row_len) } else { opts.chunk_elems.max(1) };
    let keys = TaskVectorKeys { job };
    let (rules, tops) = match sparsify {
        Sparsify::Magnitude => {
            // mergekit 0.1.5: k = max(1, int(density·n)); density 1 keeps everything.
            let ks: Vec<Option<u64>> =
                job.inputs.iter().map(|i| (i.density < 1.0).then(|| ((i.density * n as f64) as u64).max(1))).collect();
            (select_rules(&keys, chunk, opts, &ks), Vec::new())
        }
        Sparsify::Outliers if !per_row => {
            let bands: Vec<Option<(u64, u64)>> =
                job.inputs.iter().map(|i| (i.density < 1.0).then(|| outlier_band(n, i.density, i.gamma))).collect();
            let outer = bands.iter().map(|b| b.map(|b| b.0));
            let top = bands.iter().map(|b| Some(b.map_or(0, |b| b.1)));
            let mut rules = select_rules(&TwiceKeys { job }, chunk, opts, &outer.chain(top).collect::<Vec<_>>());
            let tops = rules.split_off(m);
            (rules, tops)
        }
        _ => (vec![TrimRule::ALL; m], Vec::new()),
    };
    let streams: Vec<Stream> = job.inputs.iter().map(|i| Stream::new(spec.seed, job.name, i.model_id)).collect();
    let masks = MaskRules { rules, tops, streams, row_len, per_row };
    // Density 1 is the identity and is not rescaled (as in mergekit); any lower density is, even where the
    // selection happens to keep every element.
    let sparse: Vec<bool> = job.inputs.iter().map(|inp| sparsify != Sparsify::None && inp.density < 1.0).collect();
    let mut scales = vec![Scale::Mul(1.0); m];
    let mut per_element = false;
    // (block size, each block's keep bits of its sparse inputs in input order) from the L1 pass, if kept.
    let mut cached: Option<(usize, Vec<Vec<Vec<u64>>>)> = None;
    match spec.rescale {
        Rescale::InverseDensity if sparsify == Sparsify::Della => per_element = true,
        Rescale::InverseDensity => {
            for i in 0..m {
                if sparse[i] {
                    // Divide, as the DARE paper and PEFT do (not multiply by a rounded reciprocal).
                    scales[i] = Scale::Div(job.inputs[i].density as f32);
                }
            }
        }
        Rescale::L1 if sparse.iter().any(|&s| s) => {
            // Fixed blocks (whole rows for row-wise masks), so the norms do not depend on the chunking. Row-wise
            // masks (DELLA, breadcrumbs per row) rank every row, and DARE's draws (Philox) cost more than the rest
            // of its merge: this pass keeps each block's masks as bits (n·m/8 bytes, when the selection's memory
            // share holds them) for the final pass to reuse instead of ranking or drawing again.
            let block = if per_row { row_chunk(BLOCK, row_len) } else { BLOCK };
            let keep_bits =
                (per_row || sparsify == Sparsify::Random) && job.numel.saturating_mul(m) / 8 <= opts.candidate_bytes;
            let per_block: Vec<BlockNorms> = chunks(job.numel, block)
                .map_init(Scratch::pooled, |s, (start, len)| {
                    load_deltas(job, start, len, s);
                    let mut bits = Vec::new();
                    let norms = (0..m)
                        .map(|i| {
                            if !sparse[i] {
                                return (0.0, 0.0);
                            }
                            mask_into(job, i, &masks, start, len, s);
                            if keep_bits {
                                bits.push(pack_bits(&s.keep[..len]));
                            }
                            norms::l1_pair(&s.x[i][..len], &s.keep[..len])
                        })
                        .collect();
                    (norms, bits)
                })
                .collect();
            for i in (0..m).filter(|&i| sparse[i]) {
                let (all, kept) = per_block.iter().fold((0f64, 0f64), |(a, k), b| (a + b.0[i].0, k + b.0[i].1));
                // mergekit skips the rescale when either norm is below 1e-7.
                if all >= 1e-7 && kept >= 1e-7 {
                    scales[i] = Scale::Mul((all / kept) as f32);
                }
            }
            if keep_bits {
                cached = Some((block, per_block.into_iter().map(|b| b.1).collect()));
            }
        }
        Rescale::None | Rescale::L1 => {}
    }
    let weights: Vec<f32> = job.inputs.iter().map(|i| i.weight as f32).collect();
    let weight_sum: f32 = weights.iter().sum();
    let lambda = spec.lambda as f32;
    // With cached masks, the final pass's chunks are whole blocks of the L1 pass.
    let chunk = cached.as_ref().map_or(chunk, |(block, _)| row_chunk(chunk, *block));
    let slot: Vec<usize> =
        sparse.iter().scan(0, |n, &sp| Some(if sp { (*n, *n += 1).0 } else { usize::MAX })).collect();
    let dense = !sparse.iter().any(|&s| s) && !spec.method.consensus();
    // mergekit's passthrough, planned as linear over its one input (weight = scale, not normalized)
    let passthrough = spec.method == Method::Linear && m == 1 && !spec.normalize;
    emit(job, chunk, sink, |s, start, len| {
        load_deltas(job, start, len, s);
        if passthrough {
            // mergekit's passthrough is `tensor * scale`: no sum, whose +0.0 start would turn a −0.0 into +0.0
            // (unscaled into its own dtype, the executor copies the bytes instead: `exec::float_passthrough`).
            combine::scaled(&s.x[0][..len], weights[0], &mut s.mixed[..len]);
            return;
        }
        if dense {
            // No input is sparsified: weighing, sum and finish in one kernel (the same bytes as the steps below).
            let (divisor, lambda, base) = if spec.method == Method::Linear {
                (spec.normalize.then_some(weight_sum), 1.0, None)
            } else {
                let d = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
                (spec.normalize.then_some(d), lambda, Some(&s.base[..len]))
            };
            combine::weighted_sum_finish(&s.x[..m], &weights, divisor, lambda, base, &mut s.mixed[..len]);
            return;
        }
        for i in 0..m {
            if sparse[i] {
                match &cached {
                    Some((block, bits)) => {
                        for (b, keep) in (start / block..).zip(s.keep[..len].chunks_mut(*block)) {
                            unpack_bits(&bits[b][slot[i]], keep);
                        }
                    }
                    // TIES: the trim's mask computed inside the weighing loop (no keep buffer).
                    None if sparsify == Sparsify::Magnitude && !per_element => {
                        masks.rules[i].weigh(start, &mut s.x[i][..len], scales[i], weights[i]);
                        continue;
                    }
                    None => mask_into(job, i, &masks, start, len, s),
                }
                if per_element {
                    combine::weigh_each(&mut s.x[i][..len], &s.keep[..len], &s.probs[..len], weights[i]);
                } else {
                    combine::weigh(&mut s.x[i][..len], Some(&s.keep[..len]), scales[i], weights[i]);
                }
            } else {
                combine::weigh(&mut s.x[i][..len], None, scales[i], weights[i]);
            }
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
        } else if spec.method.consensus() {
            // Election, disjoint mean and finish fused in one pass (same bytes as elect_and_mix + finish).
            let (mixed, total, divisor) = (&mut s.mixed[..len], &mut s.total[..len], &mut s.divisor[..len]);
            combine::elect_finish(xs, &weights, spec.normalize, lambda, &s.base[..len], mixed, total, divisor);
        } else {
            combine::sum(xs, &mut s.mixed[..len]);
            let d = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
            s.divisor[..len].fill(d);
            let divisor = spec.normalize.then_some(&s.divisor[..len]);
            combine::finish(&mut s.mixed[..len], divisor, lambda, Some(&s.base[..len]));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bit packing is the plain one (element j in bit j % 64 of word j / 64) and unpacks to the same mask,
    /// at lengths on and off whole bytes and words.
    #[test]
    fn keep_bits_round_trip() {
        let mut next = crate::rng::xorshift(0x9e37_79b9_7f4a_7c15);
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 200, 4096, 4099] {
            let keep: Vec<bool> = (0..n).map(|_| next() % 3 == 0).collect();
            let bits = pack_bits(&keep);
            assert_eq!(bits.len(), n.div_ceil(64));
            for (j, &k) in keep.iter().enumerate() {
                assert_eq!((bits[j / 64] >> (j % 64)) & 1 == 1, k, "n {n} j {j}");
            }
            let mut back = vec![!keep.first().copied().unwrap_or(false); n];
            unpack_bits(&bits, &mut back);
            assert_eq!(back, keep, "n {n}");
        }
    }
}
