//! The elementwise combination of one chunk: weighted sums, sign election and disjoint mean. Loops run model
//! by model over the whole chunk (not element by element across models) so each is a plain vectorisable loop,
//! compiled for several instruction sets and picked at run time (`multiversion`). Results do not depend on the
//! pick: every loop does the same IEEE operations in the same order (Rust never fuses a·b+c on its own).

use multiversion::multiversion;

/// Per-chunk working buffers, reused across chunks by one worker.
#[derive(Default)]
pub struct Scratch {
    pub base: Vec<f32>,
    /// One buffer per non-base input: the input, then its delta, then its weighted, masked delta.
    pub x: Vec<Vec<f32>>,
    pub keep: Vec<bool>,
    pub total: Vec<f32>,
    pub mixed: Vec<f32>,
    pub divisor: Vec<f32>,
    /// DELLA's keep probability of each element.
    pub probs: Vec<f32>,
    pub bytes: Vec<u8>,
}

impl Scratch {
    pub fn resize(&mut self, models: usize, len: usize) {
        self.x.resize_with(models, Vec::new);
        let bufs = [&mut self.base, &mut self.total, &mut self.mixed, &mut self.divisor, &mut self.probs];
        for v in self.x.iter_mut().chain(bufs) {
            v.resize(len, 0.0);
        }
        self.keep.resize(len, false);
    }
}

/// How kept values of a sparsified delta are rescaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    Mul(f32),
    Div(f32),
}

/// 1.0 for a kept element, 0.0 for a dropped one: masks multiply, as mergekit's `tensor * mask` does, so a
/// dropped NaN or infinity stays NaN (x·0) instead of being replaced by zero; a finite dropped value gives ±0,
/// which adds nothing to any sum.
#[inline(always)]
fn mask(k: bool) -> f32 {
    f32::from(u8::from(k))
}

/// x ← w·rescale(x·keep): the weighted, sparsified delta of one model.
#[multiversion(targets = "simd")]
pub fn weigh(x: &mut [f32], keep: Option<&[bool]>, scale: Scale, weight: f32) {
    match (keep, scale) {
        (Some(keep), Scale::Mul(s)) => {
            for (v, &k) in x.iter_mut().zip(keep) {
                *v = weight * (*v * s * mask(k));
            }
        }
        (Some(keep), Scale::Div(s)) => {
            for (v, &k) in x.iter_mut().zip(keep) {
                *v = weight * (*v / s * mask(k));
            }
        }
        (None, _) => x.iter_mut().for_each(|v| *v *= weight),
    }
}

/// x ← w·(x/p where kept, else 0): DELLA's paper rescale, each kept value divided by its own keep probability.
#[multiversion(targets = "simd")]
pub fn weigh_each(x: &mut [f32], keep: &[bool], probs: &[f32], weight: f32) {
    for ((v, &k), &p) in x.iter_mut().zip(keep).zip(probs) {
        *v = weight * (*v / p * mask(k));
    }
}

/// out ← Σ c_i·x_i, accumulated model by model in input order.
#[multiversion(targets = "simd")]
pub fn lincomb(xs: &[&[f32]], coefs: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for (x, &c) in xs.iter().zip(coefs) {
        for (o, &v) in out.iter_mut().zip(x.iter()) {
            *o += c * v;
        }
    }
}

/// Sign election by the sign of the weighted sum (>= 0 counts as +), then the sum of agreeing weighted deltas
/// and of agreeing weights (zeros never agree); a zero divisor becomes 1. As in mergekit, disagreeing deltas are
/// multiplied by 0, not skipped: a NaN or infinite delta (allowed inputs) makes the element NaN (NaN·0, ∞·0)
/// instead of leaving the base's value there.
#[multiversion(targets = "simd")]
pub fn elect_and_mix(ws: &[Vec<f32>], weights: &[f32], total: &mut [f32], mixed: &mut [f32], divisor: &mut [f32]) {
    total.fill(0.0);
    for w in ws {
        for (t, &v) in total.iter_mut().zip(w) {
            *t += v;
        }
    }
    mixed.fill(0.0);
    divisor.fill(0.0);
    for (w, &wt) in ws.iter().zip(weights) {
        for ((m, d), (&v, &t)) in mixed.iter_mut().zip(divisor.iter_mut()).zip(w.iter().zip(total.iter())) {
            let agree = mask(if t >= 0.0 { v > 0.0 } else { v < 0.0 });
            *m += v * agree;
            *d += wt * agree;
        }
    }
    for d in divisor.iter_mut() {
        if *d == 0.0 {
            *d = 1.0;
        }
    }
}

/// Σ of the weighted inputs.
#[multiversion(targets = "simd")]
pub fn sum(ws: &[Vec<f32>], mixed: &mut [f32]) {
    mixed.fill(0.0);
    for w in ws {
        for (m, &v) in mixed.iter_mut().zip(w) {
            *m += v;
        }
    }
}

/// x ← x + base.
#[multiversion(targets = "simd")]
pub fn add(x: &mut [f32], base: &[f32]) {
    for (v, &b) in x.iter_mut().zip(base) {
        *v += b;
    }
}

/// x ← x − base.
#[multiversion(targets = "simd")]
pub fn sub(x: &mut [f32], base: &[f32]) {
    for (v, &b) in x.iter_mut().zip(base) {
        *v -= b;
    }
}

/// mixed ← mixed / divisor (when given) · lambda (when not 1) + base (when given): the last steps of a merge.
#[multiversion(targets = "simd")]
pub fn finish(mixed: &mut [f32], divisor: Option<&[f32]>, lambda: f32, base: Option<&[f32]>) {
    if let Some(d) = divisor {
        mixed.iter_mut().zip(d).for_each(|(v, d)| *v /= d);
    }
    if lambda != 1.0 {
        for v in mixed.iter_mut() {
            *v *= lambda;
        }
    }
    if let Some(b) = base {
        mixed.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
}
