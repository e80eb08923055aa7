//! Exact top-k selection by magnitude without sorting: a two-pass radix select over the f32 bit patterns of |x|.
//! For non-negative floats the bit pattern orders like the value, so the k-th largest |x| is found from a
//! histogram of the high 15 bits (sign cleared) and then one of the low 16 bits inside the bucket that holds it.
//! Elements equal to the threshold are kept lowest index first, which makes the kept set a pure function of
//! the values (independent of chunking and threads), and lets each element decide alone:
//! keep = |x| > t  or  (|x| == t and index <= last_tie).

use multiversion::multiversion;
pub const HIGH_BINS: usize = 1 << 15;
pub const LOW_BINS: usize = 1 << 16;

#[inline(always)]
pub fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Counts are u32 to halve the tables' cache footprint (the scatter is the hot loop); `merge` refuses tensors
/// of 2^32 elements or more for magnitude trimming, so they cannot overflow.
#[multiversion(targets = "simd")]
pub fn hist_high(vals: &[f32], hist: &mut [u32; HIGH_BINS]) {
    for &v in vals {
        // The mask proves the index in bounds, so the loop carries no bounds check.
        hist[((abs_bits(v) >> 16) as usize) & (HIGH_BINS - 1)] += 1;
    }
}

#[multiversion(targets = "simd")]
pub fn hist_low(vals: &[f32], high: u32, hist: &mut [u32; LOW_BINS]) {
    for &v in vals {
        let b = abs_bits(v);
        if b >> 16 == high {
            hist[(b & 0xffff) as usize] += 1;
        }
    }
}

/// Walk a histogram from the top: the bin holding the `k`-th largest (1-based) and how many of the
/// selection fall in that bin (the rest lie in higher bins).
pub fn find_bin(hist: &[u32], k: u64) -> (usize, u64) {
    let mut above = 0u64;
    for b in (0..hist.len()).rev() {
        let h = u64::from(hist[b]);
        if above + h >= k {
            return (b, k - above);
        }
        above += h;
    }
    unreachable!("k is at most the number of elements")
}

/// The rule that decides which elements a magnitude trim keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimRule {
    pub threshold_bits: u32,
    /// Elements equal to the threshold are kept up to and including this index.
    pub last_tie: usize,
    pub keep_all: bool,
}

impl TrimRule {
    pub const ALL: TrimRule = TrimRule { threshold_bits: 0, last_tie: usize::MAX, keep_all: true };
    /// Keeps nothing: no |x| bit pattern (at most 0x7fff_ffff) reaches the threshold.
    pub const NONE: TrimRule = TrimRule { threshold_bits: u32::MAX, last_tie: 0, keep_all: false };

    #[inline(always)]
    pub fn keeps(&self, index: usize, x: f32) -> bool {
        let b = abs_bits(x);
        self.keep_all || b > self.threshold_bits || (b == self.threshold_bits && index <= self.last_tie)
    }

    pub fn mask(&self, start: usize, vals: &[f32], keep: &mut [bool]) {
        trim_mask(self, start, vals, keep);
    }
}

#[multiversion(targets = "simd")]
fn trim_mask(rule: &TrimRule, start: usize, vals: &[f32], keep: &mut [bool]) {
    for (j, (k, &v)) in keep.iter_mut().zip(vals).enumerate() {
        *k = rule.keeps(start + j, v);
    }
}

/// The index of the `nth` (1-based) element equal to `bits` in `vals`, which starts at element `start`.
pub fn nth_equal(vals: &[f32], bits: u32, nth: u64, start: usize) -> Option<usize> {
    let mut seen = 0u64;
    for (j, &v) in vals.iter().enumerate() {
        if abs_bits(v) == bits {
            seen += 1;
            if seen == nth {
                return Some(start + j);
            }
        }
    }
    None
}

#[multiversion(targets = "simd")]
pub fn count_equal(vals: &[f32], bits: u32) -> u64 {
    vals.iter().filter(|&&v| abs_bits(v) == bits).count() as u64
}

/// Append the elements of `vals` (element `start` onwards) whose |x| lies in high bin `high`, packed as
/// `low16 << 48 | index` (indices stay below 2^48), in index order.
#[multiversion(targets = "simd")]
pub fn collect_bin(vals: &[f32], high: u32, start: usize, out: &mut Vec<u64>) {
    for (j, &v) in vals.iter().enumerate() {
        let b = abs_bits(v);
        if b >> 16 == high {
            out.push(u64::from(b & 0xffff) << 48 | (start + j) as u64);
        }
    }
}

/// Finish a selection from the collected elements of the threshold's bin (in index order): the `need`-th largest
/// low half is the threshold; of the elements equal to it, the lowest-indexed ones are kept.
pub fn select_in_bin(cands: &[u64], high: u32, need: u64) -> TrimRule {
    let mut hist = [0u32; LOW_BINS];
    for &c in cands {
        hist[(c >> 48) as usize] += 1;
    }
    let (lo, ties_kept) = find_bin(&hist, need);
    let bits = (high << 16) | lo as u32;
    let mut last_tie = usize::MAX;
    if ties_kept < u64::from(hist[lo]) {
        let mut seen = 0u64;
        for &c in cands {
            if (c >> 48) as usize == lo {
                seen += 1;
                if seen == ties_kept {
                    last_tie = (c & ((1 << 48) - 1)) as usize;
                    break;
                }
            }
        }
    }
    TrimRule { threshold_bits: bits, last_tie, keep_all: false }
}

/// Largest element index a bracket key can carry (indices are stored as `MAX_INDEX - index`, so a larger key is a
/// larger magnitude or, at equal magnitude, a lower index: exactly the keep order).
const INDEX_BITS: u32 = 33;
const MAX_INDEX: u64 = (1 << INDEX_BITS) - 1;

/// How many frequent values a bracket counts instead of collecting.
pub const SPECIALS: usize = 4;

/// Count the elements whose |x| bit pattern is above `hi`; of those in `[lo, hi]`, count the ones equal to a
/// special value (in `counts`) and collect the keys of the others.
/// Groups of 16 are first scanned with vectorisable compares (above `hi`; equal to each special; in the bracket
/// as `b - lo <= hi - lo` in wrapping arithmetic), and only groups holding a non-special bracket element are
/// walked element by element to collect keys (their specials were already counted by the scan).
#[multiversion(targets = "simd")]
pub fn bracket_collect(
    vals: &[f32],
    lo: u32,
    hi: u32,
    specials: &[u32; SPECIALS],
    start: usize,
    out: &mut Vec<u64>,
    counts: &mut [u64; SPECIALS],
) -> u64 {
    const G: usize = 16;
    let width = hi.wrapping_sub(lo);
    let mut above = 0u64;
    let walk = |group: &[f32], first: usize, out: &mut Vec<u64>, counts: &mut [u64; SPECIALS]| {
        for (j, &v) in group.iter().enumerate() {
            let b = abs_bits(v);
            if b.wrapping_sub(lo) <= width {
                match specials.iter().position(|&s| s == b) {
                    Some(p) => counts[p] += 1,
                    None => out.push((u64::from(b) << INDEX_BITS) | (MAX_INDEX - (first + j) as u64)),
                }
            }
        }
    };
    let mut groups = vals.chunks_exact(G);
    for (g, group) in (&mut groups).enumerate() {
        // Vectorisable: counts above, counts of each special, and whether any other element is in the bracket.
        let mut n_above = 0u32;
        let mut eq = [0u32; SPECIALS];
        let mut hit = false;
        for &v in group {
            let b = abs_bits(v);
            n_above += u32::from(b > hi);
            let mut special = false;
            for (e, &sv) in eq.iter_mut().zip(specials) {
                *e += u32::from(b == sv);
                special |= b == sv;
            }
            hit |= (b.wrapping_sub(lo) <= width) && !special;
        }
        above += u64::from(n_above);
        if hit {
            walk(group, start + g * G, out, &mut [0; SPECIALS]);
        }
        counts.iter_mut().zip(eq).for_each(|(c, e)| *c += u64::from(e));
    }
    let rest = groups.remainder();
    above += rest.iter().filter(|&&v| abs_bits(v) > hi).count() as u64;
    walk(rest, start + vals.len() - rest.len(), out, counts);
    above
}

/// Where the `r`-th largest of a bracket lies.
pub enum Selected {
    Rule(TrimRule),
    /// On a special value: the threshold is `bits`, and the last tie kept is its `nth` occurrence in the chunk
    /// `[chunk_start, chunk_start + chunk_len)`, which the caller finds by rescanning that chunk.
    Special {
        bits: u32,
        chunk_start: usize,
        chunk_len: usize,
        nth: u64,
    },
}

/// The `r`-th largest (1-based, lowest index first among equals) of a bracket's elements: the collected keys
/// `cands` plus the special values, counted per chunk in `chunk_counts` (sorted by chunk start). `None` when
/// the bracket holds fewer than `r` elements (the sample misled).
pub fn select_with_specials(
    mut cands: Vec<u64>,
    specials: &[u32; SPECIALS],
    chunk_counts: &[(usize, usize, [u64; SPECIALS])],
    r: u64,
) -> Option<Selected> {
    let totals: Vec<(u32, usize)> =
        (0..SPECIALS).filter(|&p| specials[p] != u32::MAX).map(|p| (specials[p], p)).collect();
    let special_total = |p: usize| chunk_counts.iter().map(|c| c.2[p]).sum::<u64>();
    // Walk the distinct values from the top: collected keys in descending order, specials merged in.
    cands.sort_unstable_by(|a, b| b.cmp(a));
    let mut order: Vec<(u32, usize)> = totals.clone();
    order.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
    let mut kept = 0u64;
    let mut c = 0usize;
    let mut next_special = order.iter().peekable();
    loop {
        let cand_bits = cands.get(c).map(|&k| (k >> INDEX_BITS) as u32);
        let special = next_special.peek().copied();
        let take_cand = match (cand_bits, special) {
            (None, None) => return None,
            (Some(cb), Some(&(sb, _))) => cb > sb,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if take_cand {
            let cb = cand_bits.expect("present");
            if kept + 1 == r {
                let key = cands[c];
                return Some(Selected::Rule(TrimRule {
                    threshold_bits: cb,
                    last_tie: (MAX_INDEX - (key & MAX_INDEX)) as usize,
                    keep_all: false,
                }));
            }
            kept += 1;
            c += 1;
        } else {
            let &(sb, p) = special.expect("present");
            let total = special_total(p);
            if kept + total >= r {
                let mut nth = r - kept;
                for &(start, len, counts) in chunk_counts {
                    if counts[p] >= nth {
                        return Some(Selected::Special { bits: sb, chunk_start: start, chunk_len: len, nth });
                    }
                    nth -= counts[p];
                }
                unreachable!("the totals cover nth");
            }
            kept += total;
            next_special.next();
        }
    }
}
