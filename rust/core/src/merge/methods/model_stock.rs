//! model_stock (Jang et al., 2024, as mergekit 0.1.5): with the task vectors τ_i of N models and their mean
//! pairwise cosine cos (from the Gram matrix, `merge/gram.rs`; per row with `filter_wise`),
//! t = N·cos/(1 + (N − 1)·cos) (0 where the denominator vanishes) and θ = t·mean(θ_i) + (1 − t)·θ₀.

use multiversion::multiversion;

use crate::error::Result;
use crate::merge::gram::{gram, GramMatrix, Groups, Vectors};
use crate::merge::params::ModelStockParams;
use crate::merge::passes::{emit, load_raw};
use crate::merge::{Job, Options, Sink};

/// t of one group.
fn interpolation_factor(g: &GramMatrix) -> f64 {
    let q = g.q;
    let (mut sum, mut pairs) = (0.0, 0.0);
    for i in 0..q {
        for j in i + 1..q {
            sum += (g.at(i, j) / (g.norm(i) * g.norm(j)).max(1e-6)).clamp(-1.0, 1.0);
            pairs += 1.0;
        }
    }
    let cos = sum / pairs;
    let den = 1.0 + (q as f64 - 1.0) * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        q as f64 * cos / den
    }
}

pub(crate) fn merge(job: &Job, params: ModelStockParams, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let m = job.inputs.len();
    let groups = if params.filter_wise { Groups::Rows(job.row_len()) } else { Groups::Whole };
    let stats = gram(job, groups, Vectors::Deltas);
    let factors: Vec<f32> = GramMatrix::each(&stats, m).map(|g| interpolation_factor(&g) as f32).collect();
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        // t·mean(models) + (1 − t)·base on the stored tensors, as mergekit writes it; a stretch of one group (the
        // chunk, or each row's part of it) at a time, so the loop over elements has one t and vectorises.
        load_raw(job, start, len, s);
        let mut j = 0;
        while j < len {
            let g = groups.of_element(start + j);
            let end = match groups {
                Groups::Whole => len,
                Groups::Rows(r) => ((g + 1) * r - start).min(len),
                Groups::Cols(_) => j + 1,
            };
            mix(&s.x[..m], &s.base[..len], &mut s.mixed[..len], j..end, factors[g], m as f32);
            j = end;
        }
    })
}

/// `out[r] = t·mean(xs[..][r]) + (1 − t)·base[r]` over the range `r`: the models' sum in their order, starting
/// from the first (what `Iterator::sum`'s −0.0 start gives), divided by `n`.
#[multiversion(targets = "simd")]
fn mix(xs: &[Vec<f32>], base: &[f32], out: &mut [f32], r: std::ops::Range<usize>, t: f32, n: f32) {
    let out = &mut out[r.clone()];
    out.copy_from_slice(&xs[0][r.clone()]);
    for x in &xs[1..] {
        for (o, &v) in out.iter_mut().zip(&x[r.clone()]) {
            *o += v;
        }
    }
    for (o, &b) in out.iter_mut().zip(&base[r]) {
        *o = t * (*o / n) + (1.0 - t) * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upper triangle of a Gram matrix, row by row (as `gram` stores it).
    fn factor(upper: &[f64], q: usize) -> f64 {
        interpolation_factor(&GramMatrix::each(upper, q).next().unwrap())
    }

    #[test]
    fn identical_task_vectors_take_the_mean_and_orthogonal_ones_the_base() {
        // cos = 1: t = N/(1 + N − 1) = 1.
        assert!((factor(&[4.0, 4.0, 4.0], 2) - 1.0).abs() < 1e-12);
        // cos = 0: t = 0.
        assert_eq!(factor(&[1.0, 0.0, 1.0], 2), 0.0);
    }

    #[test]
    fn a_vanishing_denominator_gives_zero() {
        // Two opposite task vectors: cos = −1, 1 + (N − 1)·cos = 0.
        assert_eq!(factor(&[1.0, -1.0, 1.0], 2), 0.0);
    }

    #[test]
    fn zero_task_vectors_count_as_orthogonal() {
        // Norms floored at 1e-6: a zero vector has cos 0 with everything.
        assert_eq!(factor(&[0.0, 0.0, 1.0], 2), 0.0);
    }
}
