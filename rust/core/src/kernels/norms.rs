//! L1 norms that do not depend on how the work was split: f64 sums over fixed blocks of `BLOCK` elements at
//! absolute positions, each summed in index order, then added in block order.

use multiversion::multiversion;
pub const BLOCK: usize = 4096;

/// (Σ|x|, Σ|x| over kept elements) of one block.
#[multiversion(targets = "simd")]
pub fn l1_pair(vals: &[f32], keep: &[bool]) -> (f64, f64) {
    let mut all = 0f64;
    let mut kept = 0f64;
    for (&v, &k) in vals.iter().zip(keep) {
        let a = v.abs() as f64;
        all += a;
        kept += if k { a } else { 0.0 };
    }
    (all, kept)
}
