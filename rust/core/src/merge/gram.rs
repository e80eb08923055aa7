//! Methods whose result is a linear combination of the inputs with coefficients that depend only on their dot
//! products: slerp, nuslerp, multislerp, karcher and model_stock. One streaming pass accumulates the Gram
//! matrix of the vectors (whole tensor, per row, or per column) in f64 over a fixed partition; the small
//! spherical geometry then runs on the Gram matrix alone (every vector it builds lies in the span of the
//! inputs); a last pass applies the coefficients. mergekit evaluates the same formulas elementwise in f32, so
//! results agree to float rounding, not bit for bit.

use rayon::prelude::*;

use super::{
    block_sums, chunks, emit, load, load_deltas, load_raw, release_chunk, row_chunk, Job, Method, Options, Sink,
    STAT_BLOCK,
};
use crate::error::{CoreError, Result};
use crate::kernels::combine::{self, Scratch};
use crate::kernels::norms;

/// Which elements form one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Groups {
    /// The whole tensor is one vector.
    Whole,
    /// Each row (last dimension) is a vector.
    Rows(usize),
    /// Vectors run along dim 0: one per index of the other dimensions (`Cols(c)`: c of them, stride c).
    Cols(usize),
}

impl Groups {
    fn of(job: &Job) -> Groups {
        let p = job.spec.params;
        let rows = Groups::Rows(job.row_len());
        match job.spec.method {
            Method::Nuslerp if !p.flatten && p.row_wise && job.shape.len() >= 2 => {
                Groups::Cols(job.numel / job.shape[0].max(1))
            }
            Method::Nuslerp if !p.flatten => rows,
            Method::ModelStock if p.filter_wise => rows,
            _ => Groups::Whole,
        }
    }

    fn count(self, numel: usize) -> usize {
        match self {
            Groups::Whole => 1,
            Groups::Rows(r) => numel.div_ceil(r),
            Groups::Cols(c) => c,
        }
    }
}

/// The vectors whose Gram matrix is taken, as slices of the loaded chunk: slerp uses (base, other); model stock
/// the deltas; nuslerp and multislerp the deltas when there is a base, else the tensors; karcher the tensors.
fn load_vectors(job: &Job, start: usize, len: usize, s: &mut Scratch) {
    match job.spec.method {
        Method::Slerp | Method::Karcher => load_raw(job, start, len, s),
        _ => load_deltas(job, start, len, s),
    }
}

fn vectors<'s>(job: &Job, s: &'s Scratch, from: usize, to: usize) -> Vec<&'s [f32]> {
    let xs = s.x.iter().map(|x| &x[from..to]);
    if job.spec.method == Method::Slerp {
        std::iter::once(&s.base[from..to]).chain(xs).collect()
    } else {
        xs.collect()
    }
}

fn vector_count(job: &Job) -> usize {
    job.inputs.len() + usize::from(job.spec.method == Method::Slerp)
}

/// Upper-triangle index of (i, j), i <= j, in a q×q Gram matrix stored row by row.
fn tri(q: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    i * q - i * (i + 1) / 2 + j
}

fn gram_into(vs: &[&[f32]], out: &mut [f64]) {
    let q = vs.len();
    for i in 0..q {
        for j in i..q {
            out[tri(q, i, j)] += norms::dot(vs[i], vs[j]);
        }
    }
}

/// The Gram matrix (upper triangle) of every group, groups in order.
fn gram(job: &Job, opts: &Options, groups: Groups) -> Vec<f64> {
    let q = vector_count(job);
    let p = q * (q + 1) / 2;
    let n = job.numel;
    match groups {
        Groups::Whole => block_sums(n, STAT_BLOCK, p, |s, start, len| {
            load_vectors(job, start, len, s);
            release_chunk(job, opts, start, len);
            let mut g = vec![0f64; p];
            gram_into(&vectors(job, s, 0, len), &mut g);
            g
        }),
        Groups::Rows(r) => chunks(n, row_chunk(STAT_BLOCK, r))
            .map_init(Scratch::default, |s, (start, len)| {
                load_vectors(job, start, len, s);
                release_chunk(job, opts, start, len);
                let mut g = vec![0f64; p * len.div_ceil(r)];
                for (k, from) in (0..len).step_by(r).enumerate() {
                    gram_into(&vectors(job, s, from, (from + r).min(len)), &mut g[k * p..(k + 1) * p]);
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
                .map_init(Scratch::default, |s, b| {
                    let (c0, w) = (b * BAND, BAND.min(c - b * BAND));
                    let mut g = vec![0f64; p * w];
                    for row in 0..rows {
                        load_vectors(job, row * c + c0, w, s);
                        let vs = vectors(job, s, 0, w);
                        for col in 0..w {
                            for i in 0..q {
                                for j in i..q {
                                    g[col * p + tri(q, i, j)] += vs[i][col] as f64 * vs[j][col] as f64;
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
struct G<'a> {
    q: usize,
    v: &'a [f64],
}

impl G<'_> {
    fn at(&self, i: usize, j: usize) -> f64 {
        self.v[tri(self.q, i, j)]
    }
    fn norm(&self, i: usize) -> f64 {
        self.at(i, i).max(0.0).sqrt()
    }
    /// ‖Σ c_i v_i‖.
    fn norm_of(&self, c: &[f64]) -> f64 {
        let mut s = 0.0;
        for i in 0..self.q {
            for j in 0..self.q {
                s += c[i] * c[j] * self.at(i, j);
            }
        }
        s.max(0.0).sqrt()
    }
    /// (Σ c_i v_i) · v_k.
    fn dot_with(&self, c: &[f64], k: usize) -> f64 {
        (0..self.q).map(|i| c[i] * self.at(i, k)).sum()
    }
}

/// sin((1−t)θ)/sin θ and sin(tθ)/sin θ, or the linear (1 − t, t) where `linear` says so.
fn slerp_pair(t: f64, cos: f64, linear: bool) -> [f64; 2] {
    if linear {
        return [1.0 - t, t];
    }
    let theta = cos.acos();
    let s = theta.sin();
    [((1.0 - t) * theta).sin() / s, (t * theta).sin() / s]
}

/// mergekit 0.1.5 slerp: vectors (base, other) normalised (norms ≤ 1e-8 count as 1), lerp when |cos| > 0.9995.
fn slerp(t: f64, g: &G) -> Vec<f64> {
    let na = Some(g.norm(0)).filter(|&n| n > 1e-8).unwrap_or(1.0);
    let nb = Some(g.norm(1)).filter(|&n| n > 1e-8).unwrap_or(1.0);
    let cos = (g.at(0, 1) / (na * nb)).clamp(-1.0, 1.0);
    slerp_pair(t, cos, cos.abs() > 0.9995).to_vec()
}

/// nuslerp: norms clamped at 1e-7; collinear (1 − cos² ≤ 1e-16) falls back to lerp.
fn nuslerp(t: f64, g: &G) -> Vec<f64> {
    let n0 = g.norm(0).max(1e-7);
    let n1 = g.norm(1).max(1e-7);
    let cos = (g.at(0, 1) / (n0 * n1)).clamp(-1.0, 1.0);
    slerp_pair(t, cos, 1.0 - cos * cos <= 1e-16).to_vec()
}

/// multislerp: barycentric interpolation on the sphere through the tangent space at the weighted mean of the
/// unit vectors, rescaled by the weighted mean norm.
fn multislerp(w: &[f64], eps: f64, g: &G) -> std::result::Result<Vec<f64>, String> {
    let q = g.q;
    let n: Vec<f64> = (0..q).map(|i| g.norm(i)).collect();
    // u_i = v_i / (‖v_i‖ + eps): a unit vector's coefficient on v_i.
    let u: Vec<f64> = n.iter().map(|&n| 1.0 / (n + eps)).collect();
    let mean: Vec<f64> = (0..q).map(|i| w[i] * u[i]).collect();
    let mean_norm = g.norm_of(&mean);
    if mean_norm < eps {
        if q == 2 {
            return Ok(w.to_vec());
        }
        return Err("the weighted sum of the unit inputs is zero (antipodal inputs whose weights cancel); \
                    use different weights"
            .into());
    }
    let mhat: Vec<f64> = mean.iter().map(|c| c / mean_norm).collect();
    // Tangent part of each u_i at m̂, summed with the weights: Σ w_i (u_i − (u_i·m̂) m̂).
    let mut tangent = vec![0.0; q];
    for i in 0..q {
        let dot = u[i] * g.dot_with(&mhat, i);
        tangent[i] += w[i] * u[i];
        for k in 0..q {
            tangent[k] -= w[i] * dot * mhat[k];
        }
    }
    let tn = g.norm_of(&tangent) + eps;
    let avg_norm: f64 = (0..q).map(|i| n[i] * w[i]).sum();
    Ok((0..q).map(|k| (mhat[k] * tn.cos() + tangent[k] * (tn.sin() / tn)) * avg_norm).collect())
}

/// karcher: the Riemannian mean of the unit inputs (equal weights), iterated by gradient steps on the sphere,
/// times the mean norm; inputs with norm ≤ tol are left out of the direction.
fn karcher(max_iter: u32, tol: f64, g: &G) -> Vec<f64> {
    let q = g.q;
    let n: Vec<f64> = (0..q).map(|i| g.norm(i)).collect();
    let valid: Vec<usize> = (0..q).filter(|&i| n[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; q];
    }
    let alpha = 1.0 / valid.len() as f64;
    let mut mean = vec![0.0; q];
    for &i in &valid {
        mean[i] = alpha / n[i];
    }
    let mn = g.norm_of(&mean);
    if mn < tol {
        mean = vec![0.0; q];
        mean[valid[0]] = 1.0 / n[valid[0]];
    } else {
        mean.iter_mut().for_each(|c| *c /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; q];
        for &i in &valid {
            let dot = (g.dot_with(&mean, i) / n[i]).clamp(-1.0, 1.0);
            let theta = dot.acos();
            // Nearly antipodal (sin θ < 1e-4): the direction u_i − cos θ·u is numerically undefined, and θ/sin θ
            // would blow the Gram-space rounding up to the size of the step; mergekit's elementwise f32 gets an
            // exact zero for exactly antipodal inputs, which skipping reproduces.
            if theta < tol || 1.0 - dot * dot < 1e-8 {
                continue;
            }
            let f = alpha * theta / theta.sin();
            tangent[i] += f / n[i];
            for k in 0..q {
                tangent[k] -= f * dot * mean[k];
            }
        }
        let tn = g.norm_of(&tangent);
        if tn < tol {
            break;
        }
        for k in 0..q {
            mean[k] = tn.cos() * mean[k] + tn.sin() * tangent[k] / tn;
        }
        let un = g.norm_of(&mean);
        if un > tol {
            mean.iter_mut().for_each(|c| *c /= un);
        }
    }
    let scale: f64 = n.iter().map(|&n| n / q as f64).sum();
    mean.iter().map(|c| c * scale).collect()
}

/// model_stock: t = N·cos/(1 + (N − 1)·cos) from the mean pairwise cosine of the deltas (0 where the
/// denominator vanishes).
fn model_stock(g: &G) -> Vec<f64> {
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
    vec![if den.abs() < 1e-6 { 0.0 } else { q as f64 * cos / den }]
}

pub(super) fn merge(job: &Job, opts: &Options, sink: &dyn Sink) -> Result<()> {
    let method = job.spec.method;
    let p = job.spec.params;
    let m = job.inputs.len();
    if method == Method::Multislerp && m == 1 {
        // mergekit returns the one model's tensor as it is, base or not.
        return emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
            s.resize(1, len);
            load(&job.inputs[0].src, job.cast, start, &mut s.mixed[..len]);
        });
    }
    let groups = Groups::of(job);
    let q = vector_count(job);
    let stats = gram(job, opts, groups);
    let weights: Vec<f64> = job.inputs.iter().map(|i| i.weight).collect();
    let t_nuslerp = {
        let total: f64 = weights.iter().sum();
        if total.abs() < 1e-6 {
            0.5
        } else {
            weights.get(1).copied().unwrap_or(0.0) / total
        }
    };
    let w_multi: Vec<f64> = if p.normalize_weights {
        let total: f64 = weights.iter().sum();
        weights.iter().map(|w| w / total).collect()
    } else {
        weights.clone()
    };
    let width = if method == Method::ModelStock { 1 } else { q };
    let mut coefs = Vec::with_capacity(groups.count(job.numel) * width);
    for gv in stats.chunks(q * (q + 1) / 2) {
        let g = G { q, v: gv };
        let c = match method {
            Method::Slerp => slerp(p.t, &g),
            Method::Nuslerp => nuslerp(t_nuslerp, &g),
            Method::Multislerp => multislerp(&w_multi, p.eps, &g)
                .map_err(|e| CoreError::param(format!("tensor '{}': multislerp: {e}", job.name)))?,
            Method::Karcher => karcher(p.max_iter, p.tol, &g),
            Method::ModelStock => model_stock(&g),
            other => unreachable!("{other:?} is not a Gram method"),
        };
        coefs.extend(c.into_iter().map(|c| c as f32));
    }
    let group_of = |e: usize| match groups {
        Groups::Whole => 0,
        Groups::Rows(r) => e / r,
        Groups::Cols(c) => e % c,
    };
    let add_base = job.base.is_some() && matches!(method, Method::Nuslerp | Method::Multislerp);
    emit(job, opts, opts.chunk_elems, sink, |s, start, len| {
        if method == Method::ModelStock {
            // t·mean(models) + (1 − t)·base on the stored tensors, as mergekit writes it.
            load_raw(job, start, len, s);
            let inv = m as f32;
            for j in 0..len {
                let t = coefs[group_of(start + j)];
                let avg = (0..m).map(|i| s.x[i][j]).sum::<f32>() / inv;
                s.mixed[j] = t * avg + (1.0 - t) * s.base[j];
            }
            return;
        }
        load_vectors(job, start, len, s);
        let mut out = std::mem::take(&mut s.mixed);
        match groups {
            Groups::Cols(c) => {
                for (j, o) in out[..len].iter_mut().enumerate() {
                    let k = (start + j) % c * width;
                    let vs = vectors(job, s, j, j + 1);
                    *o = vs.iter().zip(&coefs[k..k + width]).fold(0.0, |acc, (v, &c)| acc + c * v[0]);
                }
            }
            _ => {
                let mut from = 0;
                while from < len {
                    // A run of elements sharing one group's coefficients.
                    let g = group_of(start + from);
                    let to = match groups {
                        Groups::Rows(r) => ((g + 1) * r - start).min(len),
                        _ => len,
                    };
                    let vs = vectors(job, s, from, to);
                    combine::lincomb(&vs, &coefs[g * width..(g + 1) * width], &mut out[from..to]);
                    from = to;
                }
            }
        }
        s.mixed = out;
        if add_base {
            combine::add(&mut s.mixed[..len], &s.base[..len]);
        }
    })
}
