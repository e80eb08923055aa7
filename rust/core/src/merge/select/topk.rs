//! Exact top-k selection by magnitude over whole tensors, streamed in passes (TIES trim, breadcrumbs, SCE).
//!
//! Usually two passes in all (this one and the merge's own): a sample brackets the k-th largest |x|, one pass
//! counts the elements above the bracket and collects those inside it, and an exact selection among the
//! collected finishes the job in memory. If the sample misled or the bracket would not fit the memory budget,
//! radix select over histograms (`radix_rules`) is the exact fallback. Ties are kept lowest index first, so the
//! kept set is a pure function of the values.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use crate::kernels::combine::Scratch;
use crate::kernels::select::{self, TrimRule, HIGH_BINS, LOW_BINS};
use crate::merge::passes::chunks;
use crate::merge::Options;

/// The vectors a selection ranks: `count()` of them, `numel()` elements each, decoded chunk by chunk into
/// `s.x[0..count()]` by `load`.
pub(crate) trait SelectionKeys: Sync {
    fn numel(&self) -> usize;
    fn count(&self) -> usize;
    fn load(&self, start: usize, len: usize, s: &mut Scratch);
}

/// The keep rule of each key vector: for `Some(k)` (0 < k < numel) the k largest |x|, ties lowest index first;
/// `None` keeps everything.
fn trim_rules(keys: &dyn SelectionKeys, chunk: usize, opts: &Options, ks: &[Option<u64>]) -> Vec<TrimRule> {
    let mut rules = vec![TrimRule::ALL; keys.count()];
    if ks.iter().all(Option::is_none) {
        return rules;
    }
    let brackets = sample_brackets(keys, ks, opts.candidate_bytes);
    let m = keys.count();
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
        let pass1 = chunks(keys.numel(), chunk)
            .fold(new_acc, |mut acc, (start, len)| {
                keys.load(start, len, &mut acc.s);
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
                    keys.load(chunk_start, chunk_len, &mut s);
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
        for (i, r) in radix_rules(keys, chunk, opts, &rest).into_iter().enumerate() {
            if rest[i].is_some() {
                rules[i] = r;
            }
        }
    }
    rules
}

/// Top-k rules for `ks` (None: keep all; Some(0): keep none; Some(k >= n): keep all).
pub(crate) fn select_rules(
    keys: &dyn SelectionKeys,
    chunk: usize,
    opts: &Options,
    ks: &[Option<u64>],
) -> Vec<TrimRule> {
    let n = keys.numel() as u64;
    let inner: Vec<Option<u64>> = ks.iter().map(|k| k.filter(|&k| k > 0 && k < n)).collect();
    let mut rules = trim_rules(keys, chunk, opts, &inner);
    for (r, k) in rules.iter_mut().zip(ks) {
        if *k == Some(0) {
            *r = TrimRule::NONE;
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

fn sample_brackets(keys: &dyn SelectionKeys, ks: &[Option<u64>], budget_bytes: usize) -> Vec<Option<Bracket>> {
    let n = keys.numel();
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
        keys.load(start, SAMPLE_BLOCK, &mut s);
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
fn radix_rules(keys: &dyn SelectionKeys, chunk: usize, opts: &Options, ks: &[Option<u64>]) -> Vec<TrimRule> {
    let ks = ks.to_vec();
    if ks.iter().all(Option::is_none) {
        return vec![TrimRule::ALL; keys.count()];
    }
    let m = keys.count();
    let high = chunks(keys.numel(), chunk)
        .fold(
            || (Scratch::default(), vec![[0u32; HIGH_BINS]; m]),
            |(mut s, mut h), (start, len)| {
                keys.load(start, len, &mut s);
                for (i, k) in ks.iter().enumerate() {
                    if k.is_some() {
                        select::hist_high(&s.x[i][..len], &mut h[i]);
                    }
                }
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
    let pass_b = chunks(keys.numel(), chunk)
        .fold(new_acc, |mut acc, (start, len)| {
            keys.load(start, len, &mut acc.s);
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
            if ties_kept < u64::from(hist[lo]) {
                pending.push((i, ties_kept));
            }
        }
    }
    drop(cands);
    // Ties straddle the threshold: find the index of the last tie kept (lowest indices first).
    if !pending.is_empty() {
        let counts: Vec<Vec<u64>> = chunks(keys.numel(), chunk)
            .map_init(Scratch::pooled, |s, (start, len)| {
                keys.load(start, len, s);
                pending.iter().map(|&(i, _)| select::count_equal(&s.x[i][..len], rules[i].threshold_bits)).collect()
            })
            .collect();
        let size = chunk.max(1);
        for (p, &(i, ties_kept)) in pending.iter().enumerate() {
            let mut before = 0u64;
            for (c, cnt) in counts.iter().enumerate() {
                if before + cnt[p] >= ties_kept {
                    let start = c * size;
                    let len = size.min(keys.numel() - start);
                    let mut s = Scratch::default();
                    keys.load(start, len, &mut s);
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
