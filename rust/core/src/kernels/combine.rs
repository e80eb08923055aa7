//! The elementwise combination of one chunk: weighted sums, sign election and disjoint mean. Loops run model
//! by model over the whole chunk (not element by element across models) so each is a plain vectorisable loop,
//! compiled for several instruction sets and picked at run time (`multiversion`). Results do not depend on the
//! pick: every loop does the same IEEE operations in the same order (Rust never fuses a·b+c on its own).

use multiversion::multiversion;

use crate::kernels::isa::{self, Isa};

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

    /// A worker's buffers taken from its thread's spares (or new), given back when dropped. Passes take them once
    /// per parallel split; fresh ones would be allocated, zeroed and page-faulted in for every tensor (the
    /// allocator may hand the freed megabytes back to the kernel between tensors: on the 300M family's linear
    /// merge that once cost 190,000 page faults, a fifth of the run's CPU time).
    pub fn pooled() -> PooledScratch {
        PooledScratch(SPARE.try_with(|v| v.borrow_mut().pop()).ok().flatten().unwrap_or_default())
    }
}

thread_local! {
    /// Each thread's spare [`Scratch`]es (a few: a worker may hold more than one when it steals work while
    /// waiting).
    static SPARE: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A [`Scratch`] that goes back to its thread's spares when dropped (see [`Scratch::pooled`]).
pub struct PooledScratch(Scratch);

impl std::ops::Deref for PooledScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.0
    }
}

impl std::ops::DerefMut for PooledScratch {
    fn deref_mut(&mut self) -> &mut Scratch {
        &mut self.0
    }
}

impl Drop for PooledScratch {
    fn drop(&mut self) {
        let s = std::mem::take(&mut self.0);
        // During thread teardown the spares are gone: the buffers are then simply freed.
        let _ = SPARE.try_with(|v| {
            let mut v = v.borrow_mut();
            if v.len() < 4 {
                v.push(s);
            }
        });
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

/// [`weigh`] with the keep mask `|x| bit pattern >= lo` decided in the same loop (a magnitude trim's mask, see
/// `TrimRule::weigh`): the same operations per element as the mask then `weigh`.
#[multiversion(targets = "simd")]
pub fn weigh_at_least(x: &mut [f32], lo: u32, scale: Scale, weight: f32) {
    let keeps = |v: f32| (v.to_bits() & 0x7fff_ffff) >= lo;
    match scale {
        Scale::Mul(s) => x.iter_mut().for_each(|v| *v = weight * (*v * s * mask(keeps(*v)))),
        Scale::Div(s) => x.iter_mut().for_each(|v| *v = weight * (*v / s * mask(keeps(*v)))),
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

/// [`elect_and_mix`] then [`finish`] (dividing by the agreeing weights when `normalize`, scaling by `lambda`,
/// adding `base`) in one pass, writing the merged values to `out`: the same operations in the same order per
/// element, so the same bytes, without the intermediate buffers (for 1 to 4 inputs, the loop over inputs
/// unrolled; more inputs take the two-step path, which is also the reference the tests compare against).
#[allow(clippy::too_many_arguments)]
pub fn elect_finish(
    ws: &[Vec<f32>],
    weights: &[f32],
    normalize: bool,
    lambda: f32,
    base: &[f32],
    out: &mut [f32],
    total: &mut [f32],
    divisor: &mut [f32],
) {
    elect_finish_on(isa::active(), ws, weights, normalize, lambda, base, out, total, divisor);
}

/// [`elect_finish`] on path `isa` (narrowed to what this CPU has).
#[allow(clippy::too_many_arguments)]
pub fn elect_finish_on(
    isa: Isa,
    ws: &[Vec<f32>],
    weights: &[f32],
    normalize: bool,
    lambda: f32,
    base: &[f32],
    out: &mut [f32],
    total: &mut [f32],
    divisor: &mut [f32],
) {
    let n = out.len();
    match ws.len() {
        1 => elect_finish_fixed::<1>(isa, ws, weights, normalize, lambda, base, out),
        2 => elect_finish_fixed::<2>(isa, ws, weights, normalize, lambda, base, out),
        3 => elect_finish_fixed::<3>(isa, ws, weights, normalize, lambda, base, out),
        4 => elect_finish_fixed::<4>(isa, ws, weights, normalize, lambda, base, out),
        _ => {
            elect_and_mix(ws, weights, &mut total[..n], out, &mut divisor[..n]);
            finish(out, normalize.then_some(&divisor[..n]), lambda, Some(base));
        }
    }
}

fn elect_finish_fixed<const M: usize>(
    isa: Isa,
    ws: &[Vec<f32>],
    weights: &[f32],
    normalize: bool,
    lambda: f32,
    base: &[f32],
    out: &mut [f32],
) {
    let n = out.len();
    let xs: [&[f32]; M] = std::array::from_fn(|i| &ws[i][..n]);
    let wt: [f32; M] = std::array::from_fn(|i| weights[i]);
    let base = &base[..n];
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<const M: usize>(xs: [&[f32]; M], wt: [f32; M], nz: bool, l: f32, b: &[f32], o: &mut [f32]) {
            elect_finish_impl(xs, wt, nz, l, b, o);
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn avx512<const M: usize>(xs: [&[f32]; M], wt: [f32; M], nz: bool, l: f32, b: &[f32], o: &mut [f32]) {
            elect_finish_impl(xs, wt, nz, l, b, o);
        }
        match isa.min(isa::detected()) {
            // SAFETY: narrowed to `detected()`, so this CPU has every feature the path was compiled for.
            Isa::Avx512 => return unsafe { avx512(xs, wt, normalize, lambda, base, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(xs, wt, normalize, lambda, base, out) },
            Isa::Baseline => {}
        }
    }
    elect_finish_impl(xs, wt, normalize, lambda, base, out);
}

/// One element at a time, exactly [`elect_and_mix`]'s and [`finish`]'s operations in their order (sums start
/// from +0.0 as theirs do: 0.0 + (−0.0) is +0.0, so the sums are not simply the first term).
#[inline(always)]
fn elect_finish_impl<const M: usize>(
    xs: [&[f32]; M],
    weights: [f32; M],
    normalize: bool,
    lambda: f32,
    base: &[f32],
    out: &mut [f32],
) {
    for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        let mut t = 0.0f32;
        for x in &xs {
            t += x[j];
        }
        let (mut m, mut d) = (0.0f32, 0.0f32);
        for (x, &w) in xs.iter().zip(&weights) {
            let v = x[j];
            let agree = mask(if t >= 0.0 { v > 0.0 } else { v < 0.0 });
            m += v * agree;
            d += w * agree;
        }
        if d == 0.0 {
            d = 1.0;
        }
        if normalize {
            m /= d;
        }
        if lambda != 1.0 {
            m *= lambda;
        }
        *o = m + b;
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

/// out ← x·w: mergekit's passthrough (`tensor * scale`), which has no sum, so a −0.0 stays −0.0 where a sum started
/// from +0.0 would give +0.0.
#[multiversion(targets = "simd")]
pub fn scaled(x: &[f32], w: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * w;
    }
}

/// [`weigh`] (no mask) of every input, [`sum`], then [`finish`] with a constant divisor: one pass per input over
/// `out` and the finish's, without the weighing's pass over each input, the fill and a divisor buffer: the same IEEE operations
/// per element in the same order (the sum starts from +0.0 as `sum`'s fill does: 0.0 + (−0.0) is +0.0), so the
/// same bytes. For merges without sparsified inputs (linear, task arithmetic).
#[multiversion(targets = "simd")]
pub fn weighted_sum_finish(
    xs: &[Vec<f32>],
    weights: &[f32],
    divisor: Option<f32>,
    lambda: f32,
    base: Option<&[f32]>,
    out: &mut [f32],
) {
    // Block by block, so the passes over `out` run in L1 and each input is read once (a chunk's buffers are
    // larger than L2); every element sees the same operations in the same order either way.
    const BLOCK: usize = 1024;
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let (from, n) = (b * BLOCK, out.len());
        match xs.split_first() {
            None => out.fill(0.0),
            Some((x0, rest)) => {
                let w0 = weights[0];
                for (o, &v) in out.iter_mut().zip(&x0[from..from + n]) {
                    *o = 0.0 + v * w0;
                }
                for (x, &w) in rest.iter().zip(&weights[1..]) {
                    for (o, &v) in out.iter_mut().zip(&x[from..from + n]) {
                        *o += v * w;
                    }
                }
            }
        }
        if let Some(d) = divisor {
            for v in out.iter_mut() {
                *v /= d;
            }
        }
        if lambda != 1.0 {
            for v in out.iter_mut() {
                *v *= lambda;
            }
        }
        if let Some(b) = base {
            out.iter_mut().zip(&b[from..from + n]).for_each(|(v, b)| *v += b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::xorshift;

    #[test]
    fn scaled_keeps_the_sign_of_zero() {
        let x = [-0.0f32, 0.0, -1.5, 2.0];
        let mut out = [9f32; 4];
        scaled(&x, 2.0, &mut out);
        assert_eq!(out.map(f32::to_bits), [-0.0f32, 0.0, -3.0, 4.0].map(f32::to_bits));
    }

    /// The fused dense path gives the step-by-step path's bytes (weigh, sum, a divisor buffer, finish), for 0 to 5
    /// inputs, with zeros of both signs, NaN and infinities, every combination of divisor, lambda and base.
    #[test]
    fn weighted_sum_finish_matches_the_steps() {
        let pool = [0.0f32, -0.0, 1.0, -1.0, 0.5, -2.0, 3.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, 7.25];
        let mut r = xorshift(7);
        for case in 0..600 {
            let m = case % 6;
            let n = 1 + (r() % 67) as usize;
            let xs: Vec<Vec<f32>> =
                (0..m).map(|_| (0..n).map(|_| pool[(r() % pool.len() as u64) as usize]).collect()).collect();
            let weights: Vec<f32> = (0..m).map(|_| [1.0f32, 0.5, -0.25, 3.0][(r() % 4) as usize]).collect();
            let base: Vec<f32> = (0..n).map(|_| pool[(r() % pool.len() as u64) as usize]).collect();
            let divisor = [None, Some(1.75f32), Some(-0.5)][(r() % 3) as usize];
            let lambda = [1.0f32, 0.3][(r() % 2) as usize];
            let with_base = r() % 2 == 0;
            let mut ws = xs.clone();
            for (x, &w) in ws.iter_mut().zip(&weights) {
                weigh(x, None, Scale::Mul(1.0), w);
            }
            let mut want = vec![0f32; n];
            sum(&ws, &mut want);
            let dbuf = vec![divisor.unwrap_or(1.0); n];
            finish(&mut want, divisor.map(|_| &dbuf[..]), lambda, with_base.then_some(&base[..]));
            let mut got = vec![9f32; n];
            weighted_sum_finish(&xs, &weights, divisor, lambda, with_base.then_some(&base[..]), &mut got);
            for (g, w) in got.iter().zip(&want) {
                // a NaN's sign bit is not specified by IEEE (see elect_finish's test): NaN for NaN, bits otherwise
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "case {case}: {g} vs {w}");
            }
        }
    }

    /// The fused election + finish gives the two-step path's bytes on every instruction-set path, for 1 to 6
    /// inputs, with zeros of both signs, NaN and infinities among the deltas, normalize on and off, lambda 1 or not
    /// (a NaN result is a NaN on every path; its sign bit is not specified, see below).
    #[test]
    fn elect_finish_matches_two_steps_on_every_path() {
        let pool = [0.0f32, -0.0, 1.0, -1.0, 0.5, -2.0, 3.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30];
        let mut r = xorshift(99);
        for case in 0..400 {
            let m = 1 + (case % 6);
            let n = (r() % 70) as usize;
            let ws: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| pool[(r() % 11) as usize]).collect()).collect();
            let weights: Vec<f32> = (0..m).map(|_| [0.0f32, 0.5, 1.0, -1.0][(r() % 4) as usize]).collect();
            let base: Vec<f32> = (0..n).map(|_| pool[(r() % 7) as usize]).collect();
            let (normalize, lambda) = (r() % 2 == 0, [1.0f32, 0.7][(r() % 2) as usize]);
            let (mut total, mut want, mut divisor) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            elect_and_mix(&ws, &weights, &mut total, &mut want, &mut divisor);
            finish(&mut want, normalize.then_some(&divisor), lambda, Some(&base));
            // Rust leaves the sign and payload of a NaN that arithmetic produces unspecified (the compiler may
            // commute an add or multiply, and x86 returns the first NaN operand), so paths agree on NaN-ness there
            // and on every other bit pattern exactly.
            let bits =
                |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
            for isa in Isa::ALL {
                let mut got = vec![1f32; n];
                let (mut t, mut d) = (vec![0f32; n], vec![0f32; n]);
                elect_finish_on(isa, &ws, &weights, normalize, lambda, &base, &mut got, &mut t, &mut d);
                assert_eq!(bits(&got), bits(&want), "{isa:?} m {m} case {case}");
            }
        }
    }
}
