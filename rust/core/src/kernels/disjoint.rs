//! PEFT's TIES sign election and disjoint mean (`peft.utils.merge_utils`: `calculate_majority_sign_mask` then
//! `disjoint_merge`), for LoRA adapter merges. It is not mergekit's rule (`combine::elect_and_mix`): the sign is
//! elected on the *unweighted* tensors (the sign of Σ x_i, or of Σ sign(x_i) for `Frequency`; a score of 0 elects
//! +), x_i agrees where its sign is the elected one (a zero never does), and the weighted agreeing values are
//! divided by how many agree (at least 1), not by the sum of their weights:
//! out = Σ_{agreeing} (w_i·x_i) / max(count, 1).
//!
//! Elementwise, in float32, with the operations of the NumPy restatement (`tests/reference/peft_ties.py`) in its
//! order: the score and the weighted sum accumulate input by input from +0, a disagreeing input adds +0. So the
//! bytes do not depend on chunking, threads or instruction set (no operation is fused or reordered).

use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per task of the parallel loop (the per-chunk score and count buffers stay in L1/L2).
const CHUNK: usize = 1 << 14;

/// How the sign of an element is elected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Majority {
    /// The sign of Σ x_i (PEFT's `"total"`).
    Total,
    /// The sign of Σ sign(x_i) (PEFT's `"frequency"`).
    Frequency,
}

#[inline(always)]
fn sign(x: f32) -> f32 {
    // NumPy's sign: -1, 0 or 1 (inputs are finite)
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// One chunk: `out[j]` from `xs[i][j]` (every slice as long as `out`), with `score` and `count` as scratch.
#[multiversion(targets = "simd")]
fn chunk(xs: &[&[f32]], weights: &[f32], majority: Majority, out: &mut [f32], score: &mut [f32], count: &mut [f32]) {
    score.fill(0.0);
    for x in xs {
        match majority {
            Majority::Total => score.iter_mut().zip(x.iter()).for_each(|(s, &v)| *s += v),
            Majority::Frequency => score.iter_mut().zip(x.iter()).for_each(|(s, &v)| *s += sign(v)),
        }
    }
    out.fill(0.0);
    count.fill(0.0);
    for (x, &w) in xs.iter().zip(weights) {
        for (((o, c), &s), &v) in out.iter_mut().zip(count.iter_mut()).zip(score.iter()).zip(x.iter()) {
            let agree = if s >= 0.0 { v > 0.0 } else { v < 0.0 };
            *o += if agree { v * w } else { 0.0 };
            *c += if agree { 1.0 } else { 0.0 };
        }
    }
    for (o, &c) in out.iter_mut().zip(count.iter()) {
        *o /= c.max(1.0);
    }
}

/// out ← PEFT's disjoint mean of `xs` weighted by `weights` (see the module docs), in parallel on the current
/// rayon pool. Every `xs[i]` has `out.len()` elements and `weights.len() == xs.len()`.
///
/// # Panics
/// When the lengths disagree (the caller checks them).
pub fn disjoint_mean(xs: &[&[f32]], weights: &[f32], majority: Majority, out: &mut [f32]) {
    assert_eq!(xs.len(), weights.len(), "one weight per input");
    assert!(xs.iter().all(|x| x.len() == out.len()), "inputs as long as the output");
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || (vec![0.0f32; CHUNK], vec![0.0f32; CHUNK]),
        |(score, count), (k, o)| {
            let lo = k * CHUNK;
            let parts: Vec<&[f32]> = xs.iter().map(|x| &x[lo..lo + o.len()]).collect();
            chunk(&parts, weights, majority, o, &mut score[..o.len()], &mut count[..o.len()]);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule element by element, as PEFT states it.
    fn naive(xs: &[Vec<f32>], weights: &[f32], majority: Majority) -> Vec<f32> {
        (0..xs[0].len())
            .map(|j| {
                let mut score = 0.0f32;
                for x in xs {
                    score += if majority == Majority::Total { x[j] } else { sign(x[j]) };
                }
                let (mut total, mut count) = (0.0f32, 0.0f32);
                for (x, &w) in xs.iter().zip(weights) {
                    let v = x[j];
                    if (score >= 0.0 && v > 0.0) || (score < 0.0 && v < 0.0) {
                        total += v * w;
                        count += 1.0;
                    }
                }
                total / count.max(1.0)
            })
            .collect()
    }

    #[test]
    fn matches_the_rule_at_any_length_and_thread_count() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            // small integers and zeros make exact zero scores and ties of counts common
            (((state >> 33) % 7) as f32 - 3.0) * 0.5
        };
        for n in [0, 1, 5, CHUNK - 1, CHUNK, 3 * CHUNK + 7] {
            for models in 1..4 {
                let xs: Vec<Vec<f32>> = (0..models).map(|_| (0..n).map(|_| next()).collect()).collect();
                let weights: Vec<f32> = (0..models).map(|i| [0.7f32, -0.4, 1.3][i]).collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                for majority in [Majority::Total, Majority::Frequency] {
                    let want = naive(&xs, &weights, majority);
                    for threads in [1, 3] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        let mut out = vec![f32::NAN; n];
                        pool.install(|| disjoint_mean(&refs, &weights, majority, &mut out));
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&out), bits(&want), "n {n}, {models} models, {majority:?}, {threads} threads");
                    }
                }
            }
        }
    }
}
