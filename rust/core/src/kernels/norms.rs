//! L1 norms that do not depend on how the work was split: f64 sums over fixed blocks of `BLOCK` elements at
//! absolute positions, each summed in eight interleaved lanes combined in a fixed order, then added in block order.

use multiversion::multiversion;
pub const BLOCK: usize = 4096;

/// (Σ|x|, Σ|x| over kept elements) of one block. Eight accumulators per sum (element j goes to lane j mod 8),
/// added up in lane order at the end: a fixed order, so the result is the same on every instruction set, and
/// independent chains, so the loop is not bound by the latency of one long chain of f64 additions.
#[multiversion(targets = "simd")]
pub fn l1_pair(vals: &[f32], keep: &[bool]) -> (f64, f64) {
    const L: usize = 8;
    let mut all = [0f64; L];
    let mut kept = [0f64; L];
    let mut v8 = vals.chunks_exact(L);
    let mut k8 = keep.chunks_exact(L);
    for (v, k) in (&mut v8).zip(&mut k8) {
        let v: &[f32; L] = v.try_into().expect("L elements");
        let k: &[bool; L] = k.try_into().expect("L elements");
        for l in 0..L {
            let a = f64::from(v[l].abs());
            all[l] += a;
            // An exact select written as a bit mask (all ones or zero), which vectorises where a branch did not.
            kept[l] += f64::from_bits(a.to_bits() & u64::from(k[l]).wrapping_neg());
        }
    }
    for (l, (&v, &k)) in v8.remainder().iter().zip(k8.remainder()).enumerate() {
        let a = f64::from(v.abs());
        all[l] += a;
        kept[l] += if k { a } else { 0.0 };
    }
    (all.iter().sum(), kept.iter().sum())
}

/// Σ a·b in f64, in the same eight fixed lanes as `l1_pair` (so the same on every instruction set).
#[multiversion(targets = "simd")]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let mut a8 = a.chunks_exact(L);
    let mut b8 = b.chunks_exact(L);
    for (x, y) in (&mut a8).zip(&mut b8) {
        for l in 0..L {
            acc[l] += f64::from(x[l]) * f64::from(y[l]);
        }
    }
    for (l, (&x, &y)) in a8.remainder().iter().zip(b8.remainder()).enumerate() {
        acc[l] += f64::from(x) * f64::from(y);
    }
    acc.iter().sum()
}
