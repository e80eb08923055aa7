//! Truncated SVD: exact (faer's thin SVD) or randomized (Halko, Martinsson & Tropp 2011, Algorithm 4.4: a
//! Gaussian sketch, power iterations re-orthonormalized by QR after every product, then the thin SVD of the
//! small projected factor). The sketch comes from the counter RNG keyed by (seed, tensor name, model), so a
//! result is a pure function of its inputs.

use faer::{Mat, MatRef};
use rayon::prelude::*;

use super::{mul, narrow, pin, widen, Cancel, NEVER};
use crate::error::{CoreError, Result};
use crate::rng::Stream;

/// `a ≈ u · diag(s) · vᵀ` with `u` m×r, `v` n×r, `s` non-increasing.
pub struct Svd {
    pub u: Mat<f32>,
    pub s: Vec<f32>,
    pub v: Mat<f32>,
}

impl Svd {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Keep the first `r` triplets.
    #[must_use]
    pub fn truncate(self, r: usize) -> Svd {
        let r = r.min(self.s.len());
        Svd {
            u: self.u.as_ref().subcols(0, r).to_owned(),
            s: self.s[..r].to_vec(),
            v: self.v.as_ref().subcols(0, r).to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Solver {
    Exact,
    /// `oversample` extra sketch columns and `power_iters` power iterations; the sketch is keyed by `stream`.
    Randomized {
        oversample: usize,
        power_iters: usize,
        stream: Stream,
    },
}

/// How many singular triplets to keep. Every given limit applies (the smallest wins); none given keeps
/// min(m, n).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankRule {
    /// At most this many.
    pub max: Option<usize>,
    /// At most ⌊fraction · min(m, n)⌋ (at least 1).
    pub fraction: Option<f64>,
    /// The fewest whose squared singular values reach this share of ‖A‖²_F.
    pub energy: Option<f64>,
    /// The fewest whose singular values reach this share of the nuclear norm (needs the whole spectrum).
    pub nuclear: Option<f64>,
    /// Drop singular values ≤ this.
    pub sv_epsilon: f64,
}

impl RankRule {
    pub fn validate(&self) -> Result<()> {
        let share = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x > 0.0 && x <= 1.0) => Err(CoreError::param(format!("{name} must be in (0, 1], got {x}"))),
            _ => Ok(()),
        };
        share("fraction", self.fraction)?;
        share("energy", self.energy)?;
        share("nuclear", self.nuclear)?;
        if self.max == Some(0) {
            return Err(CoreError::param("rank must be at least 1"));
        }
        if !(self.sv_epsilon >= 0.0 && self.sv_epsilon.is_finite()) {
            return Err(CoreError::param(format!("sv_epsilon must be finite and ≥ 0, got {}", self.sv_epsilon)));
        }
        Ok(())
    }

    /// The most triplets the rule can keep for an m×n matrix (what a randomized solver must compute).
    pub fn cap(&self, m: usize, n: usize) -> usize {
        let r = m.min(n);
        let mut k = self.max.unwrap_or(r).min(r);
        if let Some(f) = self.fraction {
            k = k.min(((f * r as f64).floor() as usize).max(1));
        }
        k
    }

    /// How many of the (non-increasing) singular values `s` to keep; `frob2` is ‖A‖²_F.
    pub fn count(&self, s: &[f32], frob2: f64) -> usize {
        let mut k = s.len();
        if let Some(e) = self.energy {
            k = k.min(reach(s.iter().map(|&x| f64::from(x) * f64::from(x)), e * frob2));
        }
        if let Some(f) = self.nuclear {
            let total: f64 = s.iter().map(|&x| f64::from(x)).sum();
            k = k.min(reach(s.iter().map(|&x| f64::from(x)), f * total));
        }
        let above = s.iter().take_while(|&&x| f64::from(x) > self.sv_epsilon).count();
        k.min(above)
    }
}

/// The fewest leading terms whose running sum reaches `target` (all of them if it is never reached).
fn reach(terms: impl Iterator<Item = f64>, target: f64) -> usize {
    let mut sum = 0.0;
    let mut n = 0;
    for t in terms {
        sum += t;
        n += 1;
        if sum >= target {
            return n;
        }
    }
    n
}

pub(super) fn no_convergence(_: faer::linalg::svd::SvdError) -> CoreError {
    CoreError::param("the SVD did not converge")
}

/// The thin SVD of `a` (all min(m, n) triplets), computed in f64 and rounded to f32: faer's f32 SVD has a backward
/// error of ~1e-5 relative (LAPACK's sgesdd ~3e-7), its f64 one ~1e-15, at 1–2.3× the time (measured, 200×100 to
/// 2000×1000), so the factors come out accurate to f32 rounding.
pub fn exact(a: MatRef<'_, f32>) -> Result<Svd> {
    exact_with(a, &NEVER)
}

/// [`exact`], checking `cancel` before and after faer's SVD (which itself cannot be stopped).
fn exact_with(a: MatRef<'_, f32>, cancel: &Cancel) -> Result<Svd> {
    pin();
    if a.nrows() == 0 || a.ncols() == 0 {
        return Ok(Svd { u: Mat::zeros(a.nrows(), 0), s: vec![], v: Mat::zeros(a.ncols(), 0) });
    }
    let wide = widen(a);
    cancel.check()?;
    let svd = wide.thin_svd().map_err(no_convergence)?;
    cancel.check()?;
    let s = svd.S().column_vector().iter().map(|&x| x as f32).collect();
    Ok(Svd { u: narrow(svd.U()), s, v: narrow(svd.V()) })
}

/// The singular values of `a`, non-increasing (in f64, as [`exact`]).
pub fn singular_values(a: MatRef<'_, f32>) -> Result<Vec<f32>> {
    pin();
    if a.nrows() == 0 || a.ncols() == 0 {
        return Ok(vec![]);
    }
    Ok(widen(a).singular_values().map_err(no_convergence)?.into_iter().map(|x| x as f32).collect())
}

/// An orthonormal basis of the columns of `y` (thin Q of its QR), checking `cancel` between the two halves.
fn orth(y: MatRef<'_, f32>, cancel: &Cancel) -> Result<Mat<f32>> {
    cancel.check()?;
    let qr = y.qr();
    cancel.check()?;
    Ok(qr.compute_thin_Q())
}

/// The top `k` triplets of `a` from a Gaussian sketch of `k + oversample` columns and `power_iters` power
/// iterations. Falls back to the exact SVD when the sketch would span min(m, n) anyway.
pub fn randomized(a: MatRef<'_, f32>, k: usize, oversample: usize, power_iters: usize, stream: &Stream) -> Result<Svd> {
    randomized_with(a, k, oversample, power_iters, stream, &NEVER)
}

/// [`randomized`], checking `cancel` between its products and factorizations.
fn randomized_with(
    a: MatRef<'_, f32>,
    k: usize,
    oversample: usize,
    power_iters: usize,
    stream: &Stream,
    cancel: &Cancel,
) -> Result<Svd> {
    pin();
    let (m, n) = a.shape();
    let r = m.min(n);
    let q = k.saturating_add(oversample);
    if q >= r {
        return Ok(exact_with(a, cancel)?.truncate(k));
    }
    // Ω (n × q): element (i, j) is draw i·q + j of the stream, so Ω is the same however it is filled.
    let mut omega_rows = vec![0f32; n * q];
    omega_rows.par_chunks_mut(q).enumerate().for_each(|(i, row)| stream.normals((i * q) as u64, row));
    let omega = super::view(&omega_rows, n, q);
    cancel.check()?;
    let mut basis = orth(mul(a, omega).as_ref(), cancel)?;
    drop(omega_rows);
    for _ in 0..power_iters {
        cancel.check()?;
        let z = orth(mul(a.transpose(), basis.as_ref()).as_ref(), cancel)?;
        cancel.check()?;
        basis = orth(mul(a, z.as_ref()).as_ref(), cancel)?;
    }
    // B = Qᵀ A (q × n) carries the top of A's spectrum; its SVD rotates the basis into A's singular vectors.
    cancel.check()?;
    let b = mul(basis.as_ref().transpose(), a);
    let small = exact_with(b.as_ref(), cancel)?;
    cancel.check()?;
    let u = mul(basis.as_ref(), small.u.as_ref());
    Ok(Svd { u, s: small.s, v: small.v }.truncate(k))
}

/// The triplets `rule` keeps, by `solver`. A nuclear-norm share needs the whole spectrum, so it always takes
/// the exact SVD.
pub fn truncated(a: MatRef<'_, f32>, rule: &RankRule, solver: &Solver) -> Result<Svd> {
    truncated_cancellable(a, rule, solver, &NEVER)
}

/// [`truncated`], stopped with [`super::Cancelled`] at the solver's next step once `cancel` is set: between the
/// randomized solver's products and QRs, before and after the exact SVD (faer's SVD call is not interruptible).
pub fn truncated_cancellable(a: MatRef<'_, f32>, rule: &RankRule, solver: &Solver, cancel: &Cancel) -> Result<Svd> {
    rule.validate()?;
    let (m, n) = a.shape();
    let cap = rule.cap(m, n);
    let svd = match solver {
        Solver::Randomized { oversample, power_iters, stream } if rule.nuclear.is_none() => {
            randomized_with(a, cap, *oversample, *power_iters, stream, cancel)?
        }
        _ => exact_with(a, cancel)?,
    };
    cancel.check()?;
    // ‖A‖²_F: the sum of σ² when the whole spectrum is known (consistent with the σ the rule counts), else
    // summed from the elements.
    let frob2 = match rule.energy {
        None => 0.0,
        Some(_) if svd.rank() == m.min(n) => svd.s.iter().map(|&x| f64::from(x) * f64::from(x)).sum(),
        Some(_) => frobenius2(a),
    };
    let keep = rule.count(&svd.s, frob2).min(cap);
    Ok(svd.truncate(keep))
}

/// ‖A‖²_F in f64, summed over columns in order (independent of threads).
fn frobenius2(a: MatRef<'_, f32>) -> f64 {
    (0..a.nrows())
        .into_par_iter()
        .map(|i| a.row(i).iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}
