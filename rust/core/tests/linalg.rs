//! The SVD kernels against their definitions: exact factors reconstruct the matrix to f32 rounding, the randomized
//! solver recovers a rank-k matrix, the polar factor is orthonormal, and the rank rules count as documented.

use ferromerge_core::linalg::{self, RankRule, Solver};
use ferromerge_core::rng::Stream;

fn random(m: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..m * n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// ‖A − U diag(s) Vᵀ‖_F / ‖A‖_F in f64.
fn rel_error(a: &[f32], m: usize, n: usize, svd: &linalg::Svd) -> f64 {
    let (mut e, mut t) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..svd.rank())
                .map(|k| f64::from(svd.u[(i, k)]) * f64::from(svd.s[k]) * f64::from(svd.v[(j, k)]))
                .sum();
            e += (r - f64::from(a[i * n + j])).powi(2);
            t += f64::from(a[i * n + j]).powi(2);
        }
    }
    (e / t).sqrt()
}

/// A rank-`k` m×n matrix: a product of two random factors.
fn low_rank(m: usize, n: usize, k: usize, seed: u64) -> Vec<f32> {
    let (l, r) = (random(m, k, seed), random(k, n, seed + 1));
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| l[i * k + p] * r[p * n + j]).sum();
        }
    }
    out
}

#[test]
fn exact_svd_reconstructs_to_f32_rounding() {
    for (m, n) in [(1, 1), (1, 7), (7, 1), (50, 30), (30, 50), (200, 100)] {
        let a = random(m, n, (m * 31 + n) as u64);
        let svd = linalg::exact(linalg::view(&a, m, n)).unwrap();
        assert_eq!(svd.rank(), m.min(n));
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "{m}x{n}: singular values not sorted");
        let e = rel_error(&a, m, n, &svd);
        assert!(e < 1e-6, "{m}x{n}: relative error {e}");
    }
}

#[test]
fn randomized_svd_recovers_a_low_rank_matrix() {
    let (m, n, k) = (300, 200, 12);
    let a = low_rank(m, n, k, 3);
    let stream = Stream::new(1, "w", 0);
    let svd = linalg::randomized(linalg::view(&a, m, n), k, 5, 1, &stream).unwrap();
    assert_eq!(svd.rank(), k);
    let e = rel_error(&a, m, n, &svd);
    assert!(e < 1e-5, "relative error {e}");
    let exact = linalg::exact(linalg::view(&a, m, n)).unwrap();
    for (x, y) in svd.s.iter().zip(&exact.s) {
        assert!((x - y).abs() <= 1e-5 * exact.s[0], "{x} vs {y}");
    }
}

#[test]
fn polar_factor_is_orthonormal_and_nearest() {
    for (m, n) in [(40, 25), (25, 40), (9, 9)] {
        let a = random(m, n, 11);
        let p = linalg::polar(linalg::view(&a, m, n)).unwrap();
        let (rows, cols) = (p.nrows(), p.ncols());
        assert_eq!((rows, cols), (m, n));
        // PᵀP = I for tall, PPᵀ = I for wide
        let k = m.min(n);
        for i in 0..k {
            for j in 0..k {
                let d: f64 = if m >= n {
                    (0..m).map(|r| f64::from(p[(r, i)]) * f64::from(p[(r, j)])).sum()
                } else {
                    (0..n).map(|c| f64::from(p[(i, c)]) * f64::from(p[(j, c)])).sum()
                };
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-6, "{m}x{n}: ({i},{j}) = {d}");
            }
        }
    }
}

#[test]
fn rank_rules_count_as_documented() {
    let s = [4.0f32, 3.0, 2.0, 1.0];
    let frob2 = 16.0 + 9.0 + 4.0 + 1.0;
    let rule = |f: fn(&mut RankRule)| {
        let mut r = RankRule::default();
        f(&mut r);
        r
    };
    assert_eq!(rule(|r| r.energy = Some(16.0 / 30.0)).count(&s, frob2), 1);
    assert_eq!(rule(|r| r.energy = Some(0.84)).count(&s, frob2), 3);
    assert_eq!(rule(|r| r.nuclear = Some(0.7)).count(&s, frob2), 2);
    assert_eq!(rule(|r| r.nuclear = Some(0.71)).count(&s, frob2), 3);
    assert_eq!(rule(|r| r.sv_epsilon = 2.0).count(&s, frob2), 2);
    assert_eq!(rule(|r| r.fraction = Some(0.5)).cap(10, 4), 2);
    assert_eq!(rule(|r| r.fraction = Some(0.01)).cap(10, 4), 1);
    assert_eq!(rule(|r| r.max = Some(3)).cap(10, 4), 3);
    assert!(rule(|r| r.energy = Some(1.5)).validate().is_err());
    assert!(rule(|r| r.max = Some(0)).validate().is_err());
    assert!(rule(|r| r.sv_epsilon = -1.0).validate().is_err());
    // a nuclear-norm share takes the exact solver even when a randomized one is asked for
    let a = random(30, 20, 5);
    let stream = Stream::new(0, "x", 0);
    let solver = Solver::Randomized { oversample: 2, power_iters: 0, stream };
    let got = linalg::truncated(linalg::view(&a, 30, 20), &rule(|r| r.nuclear = Some(0.5)), &solver).unwrap();
    let exact = linalg::exact(linalg::view(&a, 30, 20)).unwrap();
    assert_eq!(got.s, exact.s[..got.rank()].to_vec());
}
