//! arcee_fusion (mergekit 0.1.5): importance = |θ₁ − θ₀| · KL(softmax(θ₁ row) ‖ softmax(θ₀ row)); elements
//! whose importance reaches median + 1.5·IQR take θ₁, the rest keep θ₀. A row is the last dimension; the KL
//! pass reads row-aligned chunks. Quantiles are exact up to 1e6 elements and from a seeded sample of 1e6 (with
//! replacement) beyond, where mergekit's sample is unseeded.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::combine::Scratch;
use crate::kernels::isa::{self, Isa};
use crate::math;
use crate::merge::passes::{chunks, emit, load_raw, row_chunk};
use crate::merge::{Job, Options, Sink};
use crate::rng::Stream;

/// KL(softmax(b) ‖ softmax(a)) of one row, with mergekit's +1e-8 on both distributions: probabilities and logs
/// in f32 (as mergekit's, which runs in the tensors' dtype), the sums in f64.
fn row_kl(a: &[f32], b: &[f32]) -> f32 {
    EXPS.with_borrow_mut(|(ea, eb)| row_kl_on(isa::active(), a, b, ea, eb))
}

thread_local! {
    /// Each worker's exp(x − max) of the two rows of `row_kl`.
    static EXPS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`row_kl`] on path `isa` (narrowed to what this CPU has): one source compiled three ways, the same bits on all
/// (`math::expf_vec` and `math::lnf_vec` are plain IEEE arithmetic; the sums run in [`LANES`] fixed lanes).
fn row_kl_on(isa: Isa, a: &[f32], b: &[f32], ea: &mut Vec<f32>, eb: &mut Vec<f32>) -> f32 {
    ea.resize(a.len(), 0.0);
    eb.resize(b.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(a: &[f32], b: &[f32], ea: &mut [f32], eb: &mut [f32]) -> f32 {
            row_kl_impl(a, b, ea, eb)
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn avx512(a: &[f32], b: &[f32], ea: &mut [f32], eb: &mut [f32]) -> f32 {
            row_kl_impl(a, b, ea, eb)
        }
        match isa.min(isa::detected()) {
            // SAFETY: narrowed to `detected()`, so this CPU has every feature the path was compiled for.
            Isa::Avx512 => return unsafe { avx512(a, b, ea, eb) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(a, b, ea, eb) },
            Isa::Baseline => {}
        }
    }
    row_kl_impl(a, b, ea, eb)
}

/// Lanes of the f64 sums: element i goes to lane i mod LANES, the lanes are added pairwise at the end. A fixed
/// order (so the same bits on every path) that still vectorises, where one running sum is a chain of dependent
/// adds that no compiler may reorder; 32 lanes give an AVX-512 core four independent vectors per step (the exp's
/// polynomial is a chain of 14 dependent operations: one vector at a time would wait on it).
const LANES: usize = 32;

#[inline(always)]
fn lane_total(l: &[f64; LANES]) -> f64 {
    let mut w = *l;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] = w[2 * i] + w[2 * i + 1];
        }
    }
    w[0]
}

#[inline(always)]
fn row_kl_impl(a: &[f32], b: &[f32], ea: &mut [f32], eb: &mut [f32]) -> f32 {
    // Element i goes to lane i mod LANES: whole groups of LANES in a loop of fixed length (which the compiler
    // vectorises, accumulators in registers), then the rest into the first lanes.
    #[inline(always)]
    fn kl_term(x: f32, y: f32, ra: f32, rb: f32) -> f64 {
        // x/Σ as x·(1/Σ): one division a row instead of two an element (the quotient differs by an ulp at most)
        let q = x * ra + 1e-8;
        let p = y * rb + 1e-8;
        f64::from(p * math::lnf_vec(p / q))
    }
    // exp(x − max) of each element once, kept for the KL loop; 1/(their sum).
    #[inline(always)]
    fn softmax_parts(v: &[f32], e: &mut [f32]) -> f32 {
        // max is exact and order-free (f32::max skips NaN; the sign of a zero maximum cannot change x − max's exp)
        let mut m = [f32::NEG_INFINITY; 16];
        let mut it = v.chunks_exact(16);
        for c in &mut it {
            for (m, &x) in m.iter_mut().zip(c) {
                *m = m.max(x);
            }
        }
        let mx = it.remainder().iter().chain(&m).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut acc = [0f64; LANES];
        let (mut vs, mut es) = (v.chunks_exact(LANES), e[..v.len()].chunks_exact_mut(LANES));
        for (vc, ec) in (&mut vs).zip(&mut es) {
            for ((s, e), &x) in acc.iter_mut().zip(ec.iter_mut()).zip(vc) {
                *e = math::expf_vec(x - mx);
                *s += f64::from(*e);
            }
        }
        for ((s, e), &x) in acc.iter_mut().zip(es.into_remainder()).zip(vs.remainder()) {
            *e = math::expf_vec(x - mx);
            *s += f64::from(*e);
        }
        (1.0 / lane_total(&acc)) as f32
    }
    let n = a.len();
    let ra = softmax_parts(a, ea);
    let rb = softmax_parts(b, eb);
    let mut acc = [0f64; LANES];
    let (mut xs, mut ys) = (ea[..n].chunks_exact(LANES), eb[..n].chunks_exact(LANES));
    for (xc, yc) in (&mut xs).zip(&mut ys) {
        for ((k, &x), &y) in acc.iter_mut().zip(xc).zip(yc) {
            *k += kl_term(x, y, ra, rb);
        }
    }
    for ((k, &x), &y) in acc.iter_mut().zip(xs.remainder()).zip(ys.remainder()) {
        *k += kl_term(x, y, ra, rb);
    }
    lane_total(&acc) as f32
}

/// Quantile sample size, as mergekit's `_QUANTILE_SAMPLE_SIZE`.
const QUANTILE_SAMPLE: usize = 1_000_000;

/// Draws of a bucket: the elements of a chunk in one bucket are within this many of each other (256 KiB of f32 a
/// model, the two models' together within a core's L2 cache), so reading the importances of a chunk's draws bucket
/// after bucket walks the chunk forward instead of jumping at random (a cache miss a draw).
const BUCKET: usize = 1 << 16;

/// The draws `idx` grouped by chunk of `block` elements, and within a chunk by [`BUCKET`]: `offsets` has
/// `per_chunk = block.div_ceil(BUCKET)` buckets a chunk, and chunk `c`'s draws are
/// `pos[offsets[c·per_chunk]..offsets[(c + 1)·per_chunk]]`, as offsets within the chunk (a counting sort; the
/// sample's order does not matter to its order statistics). Returns `per_chunk`.
fn bucket_by_chunk(idx: &[u64], block: usize, n_chunks: usize, offsets: &mut Vec<usize>, pos: &mut Vec<u64>) -> usize {
    let per_chunk = block.div_ceil(BUCKET);
    let bucket = |i: u64| {
        let (c, j) = (i as usize / block, i as usize % block);
        (c * per_chunk + j / BUCKET, j)
    };
    offsets.clear();
    offsets.resize(n_chunks * per_chunk + 1, 0);
    for &i in idx {
        offsets[bucket(i).0 + 1] += 1;
    }
    for k in 0..n_chunks * per_chunk {
        offsets[k + 1] += offsets[k];
    }
    pos.clear();
    pos.resize(idx.len(), 0);
    // `fill` is the next free slot of each bucket: offsets shifted by one, restored after the pass
    let mut fill = offsets[..n_chunks * per_chunk].to_vec();
    for &i in idx {
        let (k, j) = bucket(i);
        pos[fill[k]] = j as u64;
        fill[k] += 1;
    }
    per_chunk
}

thread_local! {
    /// The calling thread's buffers for one tensor's quantile sample (draws, bucket offsets, positions,
    /// importances), kept from tensor to tensor: fresh ones cost a page fault per 4 KiB, about a tenth of the
    /// method's time.
    static SAMPLE: RefCell<SampleBufs> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Draws, bucket offsets, positions in their chunks, importances.
type SampleBufs = (Vec<u64>, Vec<usize>, Vec<u64>, Vec<f32>);

/// The kernel (a: the base, b: the other model).
pub(crate) fn merge(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let row_len = job.row_len();
    let n = job.numel;
    let block = row_chunk(opts.chunk_elems.max(1), row_len);
    let importance = |a: f32, b: f32, row_kl: f32| (b - a).abs() * row_kl;
    // One pass computes each row's KL and, from the same decoded chunk, the importances the quantiles need:
    // every element's up to 1e6 elements, else those of the seeded sample's draws that fall in the chunk
    // (bucketed by chunk beforehand: a counting sort of the draws, where a sort of 1e6 indices and a decode per
    // draw cost more than the KL itself). The sample's order does not matter to its order statistics.
    let sampled = n > QUANTILE_SAMPLE;
    let mut kl = Vec::with_capacity(n / row_len.max(1));
    let threshold = SAMPLE.with_borrow_mut(|(idx, offsets, draws, sample)| {
        let per_chunk = if sampled {
            Stream::new(job.spec.seed, job.name, 0).sample_indices_into(n as u64, QUANTILE_SAMPLE, idx);
            bucket_by_chunk(idx, block, n.div_ceil(block), offsets, draws)
        } else {
            0
        };
        let (offsets, draws) = (&*offsets, &*draws);
        let parts: Vec<(Vec<f32>, Vec<f32>)> = chunks(n, block)
            .map_init(Scratch::pooled, |s, (start, len)| {
                load_raw(job, start, len, s);
                let (a, b) = (&s.base[..len], &s.x[0][..len]);
                // Chunks hold whole rows.
                let kl: Vec<f32> = a.chunks(row_len).zip(b.chunks(row_len)).map(|(a, b)| row_kl(a, b)).collect();
                let imp = if sampled {
                    let c = start / block;
                    draws[offsets[c * per_chunk]..offsets[(c + 1) * per_chunk]]
                        .iter()
                        .map(|&j| {
                            let j = j as usize;
                            importance(a[j], b[j], kl[j / row_len])
                        })
                        .collect()
                } else {
                    let rows = a.chunks(row_len).zip(b.chunks(row_len)).zip(&kl);
                    rows.flat_map(|((a, b), &k)| a.iter().zip(b).map(move |(&a, &b)| importance(a, b, k))).collect()
                };
                (kl, imp)
            })
            .collect();
        sample.clear();
        for (k, imp) in parts {
            kl.extend_from_slice(&k);
            sample.extend_from_slice(&imp);
        }
        if sample.is_empty() {
            return f32::INFINITY;
        }
        // The order statistics a sort would put at those positions, by three selections (no sort): the median
        // first, then the quartiles within the halves on either side of it.
        let at = |q: f64| (q * (sample.len() - 1) as f64) as usize;
        let (i1, i2, i3) = (at(0.25), at(0.5), at(0.75));
        let (below, &mut median, above) = sample.select_nth_unstable_by(i2, f32::total_cmp);
        let q1 = if i1 < i2 { *below.select_nth_unstable_by(i1, f32::total_cmp).1 } else { median };
        let q3 = if i3 > i2 { *above.select_nth_unstable_by(i3 - i2 - 1, f32::total_cmp).1 } else { median };
        median + 1.5 * (q3 - q1)
    });
    emit(job, opts.chunk_elems.max(1), sink, |s, start, len| {
        load_raw(job, start, len, s);
        // Row by row: the chunk need not start on a row, so the first row may be partial.
        let mut j = 0;
        while j < len {
            let row = (start + j) / row_len;
            let end = ((row + 1) * row_len - start).min(len);
            let k = kl[row];
            for ((o, &a), &b) in s.mixed[j..end].iter_mut().zip(&s.base[j..end]).zip(&s.x[0][j..end]) {
                let take = importance(a, b, k) >= threshold;
                *o = a + (b - a) * if take { 1.0 } else { 0.0 };
            }
            j = end;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of pseudo-random values around `center` (an LCG: the test needs variety, not quality).
    fn row(n: usize, seed: u64, center: f32, spread: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                center + spread * (((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    }

    /// The KL the slow way: libm's exp and logf in f64, one running sum.
    fn plain_kl(a: &[f32], b: &[f32]) -> f64 {
        let parts = |v: &[f32]| {
            let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = v.iter().map(|&x| math::exp(f64::from(x - mx))).collect();
            let s: f64 = e.iter().sum();
            (e, s)
        };
        let ((ea, sa), (eb, sb)) = (parts(a), parts(b));
        ea.iter()
            .zip(&eb)
            .map(|(&x, &y)| {
                let q = ((x / sa) as f32) + 1e-8;
                let p = ((y / sb) as f32) + 1e-8;
                f64::from(p * math::lnf(p / q))
            })
            .sum()
    }

    #[test]
    fn row_kl_same_bits_on_every_path_and_close_to_the_plain_sum() {
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        for (i, &n) in [1usize, 2, 7, 8, 15, 16, 17, 63, 100, 2048, 4099].iter().enumerate() {
            for (spread, dspread) in [(0.05f32, 0.002f32), (3.0, 0.5), (200.0, 40.0)] {
                let a = row(n, i as u64, 0.0, spread);
                let d = row(n, 1000 + i as u64, 0.0, dspread);
                let b: Vec<f32> = a.iter().zip(&d).map(|(&a, &d)| a + d).collect();
                let got = row_kl_on(Isa::Baseline, &a, &b, &mut ea, &mut eb);
                for isa in [Isa::Avx2, Isa::Avx512] {
                    let other = row_kl_on(isa, &a, &b, &mut ea, &mut eb);
                    assert_eq!(other.to_bits(), got.to_bits(), "n={n} spread={spread} {isa:?}");
                }
                let plain = plain_kl(&a, &b);
                // the same f32 terms summed in another order, from exps an ulp or two apart: a p or q may round
                // to the neighbouring f32, which moves a term by ~6e-8·p (so ~6e-8 in all, absolute)
                let tol = 1e-5 * plain.abs() + 1e-7;
                assert!((f64::from(got) - plain).abs() <= tol, "n={n} spread={spread}: {got} vs {plain}");
            }
        }
    }

    #[test]
    fn row_kl_keeps_nan_and_infinities_as_the_plain_sum_does() {
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        let a = row(37, 3, 0.0, 1.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = a.clone();
            b[20] = bad;
            let plain = plain_kl(&a, &b);
            for isa in Isa::ALL {
                let got = row_kl_on(isa, &a, &b, &mut ea, &mut eb);
                assert_eq!(got.is_nan(), plain.is_nan(), "{bad} {isa:?}: {got} vs {plain}");
                if !plain.is_nan() {
                    assert!((f64::from(got) - plain).abs() <= 1e-5 * plain.abs() + 1e-9, "{bad}: {got} vs {plain}");
                }
            }
        }
    }
}
