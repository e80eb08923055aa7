//! Gram matrices of a job's vectors, for the methods whose result is a linear combination of the inputs with
//! coefficients that depend only on their dot products (the spherical methods in `methods/slerp.rs` and
//! `methods/model_stock.rs`). One streaming pass accumulates G_ij = v_i · v_j of the vectors (whole tensor, per
//! row, or per column) in f64 over a fixed partition, so the result does not depend on chunks or threads; the
//! small geometry then runs on G alone (every vector it builds lies in the span of the inputs), and [`apply`]
//! streams Σ c_i v_i out.

use rayon::prelude::*;

use super::passes::{block_sums, chunks, emit, load_deltas, load_raw, row_chunk, STAT_BLOCK};
use super::{Job, Options, Sink};
use crate::error::Result;
use crate::kernels::combine::{self, Scratch};
use crate::kernels::norms;

/// Which elements form one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Groups {
    /// The whole tensor is one vector.
    Whole,
    /// Each row (last dimension) is a vector.
    Rows(usize),
    /// Vectors run along dim 0: one per index of the other dimensions (`Cols(c)`: c of them, stride c).
    Cols(usize),
}

impl Groups {
    pub(crate) fn count(self, numel: usize) -> usize {
        match self {
            Groups::Whole => 1,
            Groups::Rows(r) => numel.div_ceil(r),
            Groups::Cols(c) => c,
        }
    }

    /// The group of element `e`.
    pub(crate) fn of_element(self, e: usize) -> usize {
        match self {
            Groups::Whole => 0,
            Groups::Rows(r) => e / r,
            Groups::Cols(c) => e % c,
        }
    }
}

/// The vectors whose Gram matrix is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vectors {
    /// The base, then the inputs, as stored (slerp).
    BaseAndInputs,
    /// The inputs as stored (karcher).
    Inputs,
    /// The inputs' deltas from the base, or the inputs themselves without one (nuslerp, multislerp, model_stock).
    Deltas,
}

impl Vectors {
    pub(crate) fn load(self, job: &Job, start: usize, len: usize, s: &mut Scratch) {
        match self {
            Vectors::BaseAndInputs | Vectors::Inputs => load_raw(job, start, len, s),
            Vectors::Deltas => load_deltas(job, start, len, s),
        }
    }

    /// Elements `[from, to)` of each vector of the loaded chunk.
    fn slices(self, s: &Scratch, from: usize, to: usize) -> Vec<&[f32]> {
        let xs = s.x.iter().map(|x| &x[from..to]);
        if self == Vectors::BaseAndInputs {
            std::iter::once(&s.base[from..to]).chain(xs).collect()
        } else {
            xs.collect()
        }
    }

    pub(crate) fn count(self, job: &Job) -> usize {
        job.inputs.len() + usize::from(self == Vectors::BaseAndInputs)
    }
}

/// Upper-triangle index of (i, j), i <= j, in a q×q Gram matrix stored row by row.
fn tri(q: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    i * q - i * (i + 1) / 2 + j
}

/// The Gram matrix (upper triangle) of every group, groups in order.
pub(crate) fn gram(job: &Job, groups: Groups, vectors: Vectors) -> Vec<f64> {
    let q = vectors.count(job);
    let p = q * (q + 1) / 2;
    let n = job.numel;
    match groups {
        Groups::Whole => block_sums(n, STAT_BLOCK, p, |s, start, len| {
            vectors.load(job, start, len, s);
            let mut g = vec![0f64; p];
            norms::gram_upper(&vectors.slices(s, 0, len), &mut g);
            g
        }),
        Groups::Rows(r) => chunks(n, row_chunk(STAT_BLOCK, r))
            .map_init(Scratch::pooled, |s, (start, len)| {
                vectors.load(job, start, len, s);
                let mut g = vec![0f64; p * len.div_ceil(r)];
                for (k, from) in (0..len).step_by(r).enumerate() {
                    norms::gram_upper(&vectors.slices(s, from, (from + r).min(len)), &mut g[k * p..(k + 1) * p]);
                }
                g
            })
            .collect::<Vec<Vec<f64>>>()
            .concat(),
        Groups::Cols(c) => {
            // Each worker owns a band of columns and walks down the rows in order, so every column's sums
            // are added in row order whatever the threads.
            const BAND: usize = 1024;
            let rows = n / c.max(1);
            (0..c.div_ceil(BAND))
                .into_par_iter()
                .map_init(Scratch::pooled, |s, b| {
                    let (c0, w) = (b * BAND, BAND.min(c - b * BAND));
                    let mut g = vec![0f64; p * w];
                    for row in 0..rows {
                        vectors.load(job, row * c + c0, w, s);
                        let vs = vectors.slices(s, 0, w);
                        for col in 0..w {
                            for i in 0..q {
                                for j in i..q {
                                    g[col * p + tri(q, i, j)] += f64::from(vs[i][col]) * f64::from(vs[j][col]);
                                }
                            }
                        }
                    }
                    g
                })
                .collect::<Vec<Vec<f64>>>()
                .concat()
        }
    }
}

/// The Gram matrix of one group as a lookup.
pub(crate) struct GramMatrix<'a> {
    pub(crate) q: usize,
    v: &'a [f64],
}

impl GramMatrix<'_> {
    /// The per-group matrices of `gram`'s result over `q` vectors.
    pub(crate) fn each(stats: &[f64], q: usize) -> impl Iterator<Item = GramMatrix<'_>> {
        stats.chunks(q * (q + 1) / 2).map(move |v| GramMatrix { q, v })
    }
    pub(crate) fn at(&self, i: usize, j: usize) -> f64 {
        self.v[tri(self.q, i, j)]
    }
    pub(crate) fn norm(&self, i: usize) -> f64 {
        self.at(i, i).max(0.0).sqrt()
    }
    /// ‖Σ c_i v_i‖.
    pub(crate) fn norm_of(&self, c: &[f64]) -> f64 {
        let mut s = 0.0;
        for i in 0..self.q {
            for j in 0..self.q {
                s += c[i] * c[j] * self.at(i, j);
            }
        }
        s.max(0.0).sqrt()
    }
    /// (Σ c_i v_i) · v_k.
    pub(crate) fn dot_with(&self, c: &[f64], k: usize) -> f64 {
        (0..self.q).map(|i| c[i] * self.at(i, k)).sum()
    }
}

/// The final pass Σ c_i v_i, with each group's `width` coefficients in `coefs` (groups in order), plus the base
/// when `add_base`.
#[allow(clippy::too_many_arguments)] // the pass's full description; one caller
pub(crate) fn apply(
    job: &Job,
    opts: &Options,
    sink: &dyn Sink,
    groups: Groups,
    vectors: Vectors,
    coefs: &[f32],
    width: usize,
    add_base: bool,
) -> Result<()> {
    emit(job, opts.chunk_elems, sink, |s, start, len| {
        vectors.load(job, start, len, s);
        let mut out = std::mem::take(&mut s.mixed);
        if let Groups::Cols(c) = groups {
            for (j, o) in out[..len].iter_mut().enumerate() {
                let k = (start + j) % c * width;
                let vs = vectors.slices(s, j, j + 1);
                *o = vs.iter().zip(&coefs[k..k + width]).fold(0.0, |acc, (v, &c)| acc + c * v[0]);
            }
        } else {
            let mut from = 0;
            while from < len {
                // A run of elements sharing one group's coefficients.
                let g = groups.of_element(start + from);
                let to = match groups {
                    Groups::Rows(r) => ((g + 1) * r - start).min(len),
                    _ => len,
                };
                let vs = vectors.slices(s, from, to);
                combine::lincomb(&vs, &coefs[g * width..(g + 1) * width], &mut out[from..to]);
                from = to;
            }
        }
        s.mixed = out;
        if add_base {
            combine::add(&mut s.mixed[..len], &s.base[..len]);
        }
    })
}
