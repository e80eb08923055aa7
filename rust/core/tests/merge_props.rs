//! Properties of the per-tensor merge: TIES keeps exactly the k largest |delta| (lowest index first on ties),
//! matching a sort-based oracle; output bytes do not depend on chunk size or thread count; DARE is keyed.

use ferromerge_core::merge::{merge_to_vec, Input, Job, Method, MethodSpec, Options, Rescale, Source};
use ferromerge_core::{pool, DType};
use proptest::prelude::*;
use std::sync::atomic::AtomicBool;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn out_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn spec(method: Method, normalize: bool) -> MethodSpec {
    MethodSpec::new(method, normalize, 1.0, Rescale::None, 0)
}

fn job<'a>(base: &'a [u8], xs: &'a [Vec<u8>], w: &[f64], d: &[f64], spec: MethodSpec, n: usize) -> Job<'a> {
    Job {
        name: "t",
        shape: vec![n],
        numel: n,
        base: Some(Source::mem(base, DType::F32)),
        inputs: xs
            .iter()
            .enumerate()
            .map(|(i, x)| Input::new(Source::mem(x, DType::F32), w[i], d[i], i as u32))
            .collect(),
        cast: None,
        spec,
        out_dtype: DType::F32,
        nonfinite: AtomicBool::default(),
    }
}

/// Oracle: indices of the k largest |v|, ties broken by lowest index, via a full sort.
fn oracle_keep(v: &[f32], density: f64) -> Vec<bool> {
    let n = v.len();
    let k = ((density * n as f64) as usize).max(1).min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| v[b].abs().partial_cmp(&v[a].abs()).unwrap().then(a.cmp(&b)));
    let mut keep = vec![false; n];
    for &i in &idx[..k] {
        keep[i] = true;
    }
    keep
}

/// Values drawn from a small set so that ties at the threshold are common.
fn vals(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-8i32..=8).prop_map(|q| q as f32 * 0.25), n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn ties_single_model_keeps_oracle_set(
        v in (1usize..300).prop_flat_map(vals), density in 0.01f64..1.0, chunk in 1usize..50, collect in any::<bool>(),
    ) {
        let n = v.len();
        let base = vec![0f32; n];
        let xs = vec![f32_bytes(&v)];
        let bb = f32_bytes(&base);
        let j = job(&bb, &xs, &[1.0], &[density], spec(Method::Ties, true), n);
        // Both ways of finishing the selection: collecting the threshold's bin, or histograms plus a tie pass.
        let opts = Options { chunk_elems: chunk, candidate_bytes: if collect { usize::MAX } else { 0 } };
        let out = out_f32(&pool::pool(Some(1)).unwrap().install(|| merge_to_vec(&j, &opts)).unwrap());
        let keep = oracle_keep(&v, density);
        for i in 0..n {
            let expect = if keep[i] { v[i] } else { 0.0 };
            prop_assert_eq!(out[i], expect, "element {} of {}", i, n);
        }
    }

    #[test]
    fn output_independent_of_chunks_and_threads(
        n in 1usize..2000, m in 1usize..4, density in 0.05f64..1.0, chunk in 1usize..700, seed in 0u64..1000,
        which in 0usize..5,
    ) {
        let method = [Method::Linear, Method::TaskArithmetic, Method::Ties, Method::DareTies, Method::DareLinear][which];
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
        let base: Vec<f32> = (0..n).map(|_| next()).collect();
        let xs: Vec<Vec<u8>> = (0..m).map(|_| f32_bytes(&base.iter().map(|b| b + 0.1 * next()).collect::<Vec<_>>())).collect();
        let bb = f32_bytes(&base);
        let w: Vec<f64> = (0..m).map(|i| 0.3 + i as f64 * 0.2).collect();
        let d = vec![density; m];
        let mut sp = spec(method, true);
        sp.rescale = if matches!(method, Method::DareTies | Method::DareLinear) { Rescale::L1 } else { Rescale::None };
        sp.seed = seed;
        let mut j = job(&bb, &xs, &w, &d, sp, n);
        if method == Method::Linear { j.base = None; }
        let reference = pool::pool(Some(1)).unwrap().install(|| merge_to_vec(&j, &Options::with_chunk(1 << 16))).unwrap();
        for threads in [1, 2, 3] {
            for candidate_bytes in [0, usize::MAX] {
                let opts = Options { chunk_elems: chunk, candidate_bytes };
                let got = pool::pool(Some(threads)).unwrap().install(|| merge_to_vec(&j, &opts)).unwrap();
                prop_assert_eq!(&got, &reference);
            }
        }
    }
}

#[test]
fn ties_sign_election_and_disjoint_mean() {
    // Two models, density 1: element 0 agrees (+), element 1 disagrees (weighted sum decides), element 2 is a tie
    // of the sum (>= 0 counts as +).
    let base = [0f32; 3];
    let a = [1.0f32, 2.0, 1.0];
    let b = [3.0f32, -1.0, -1.0];
    let (bb, xs) = (f32_bytes(&base), vec![f32_bytes(&a), f32_bytes(&b)]);
    let j = job(&bb, &xs, &[1.0, 1.0], &[1.0, 1.0], spec(Method::Ties, true), 3);
    let out = out_f32(&merge_to_vec(&j, &Options::with_chunk(2)).unwrap());
    assert_eq!(out, vec![2.0, 2.0, 1.0]);
    // Weights change the election: with weight 3 on b, element 1's sum is 2 - 3 < 0, so b wins.
    let j = job(&bb, &xs, &[1.0, 3.0], &[1.0, 1.0], spec(Method::Ties, true), 3);
    let out = out_f32(&merge_to_vec(&j, &Options::with_chunk(2)).unwrap());
    assert_eq!(out, vec![(1.0 + 9.0) / 4.0, -1.0, -1.0]);
}

#[test]
fn dare_rescales_and_is_keyed() {
    let n = 20_000;
    let base = vec![0f32; n];
    let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
    let (bb, xs) = (f32_bytes(&base), vec![f32_bytes(&x)]);
    let mut sp = spec(Method::DareLinear, false);
    sp.rescale = Rescale::InverseDensity;
    let j = job(&bb, &xs, &[1.0], &[0.25], sp, n);
    let out = out_f32(&merge_to_vec(&j, &Options::with_chunk(333)).unwrap());
    let kept = out.iter().filter(|&&v| v != 0.0).count();
    assert!((kept as f64 / n as f64 - 0.25).abs() < 0.02, "{kept}");
    for (o, v) in out.iter().zip(&x) {
        assert!(*o == 0.0 || *o == v / 0.25);
    }
    sp.rescale = Rescale::L1;
    let j = job(&bb, &xs, &[1.0], &[0.25], sp, n);
    let l1 = out_f32(&merge_to_vec(&j, &Options::with_chunk(333)).unwrap());
    let (a, b): (f64, f64) = (x.iter().map(|v| f64::from(*v)).sum(), l1.iter().map(|v| f64::from(*v)).sum());
    assert!((a - b).abs() / a < 1e-5);
    sp.seed = 1;
    let j = job(&bb, &xs, &[1.0], &[0.25], sp, n);
    assert_ne!(out_f32(&merge_to_vec(&j, &Options::with_chunk(333)).unwrap()), l1);
}

/// Tensors above the collect-everything size take the sampled bracket; the result must equal the oracle whether
/// the bracket holds (quantised values: many ties at the threshold) or the sample misleads and the exact
/// histogram path takes over (a block of huge values that the sample over-represents).
#[test]
fn ties_large_tensors_exact_whatever_the_sample() {
    let n = 3_000_000usize;
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let quantised: Vec<f32> = (0..n).map(|_| ((next() * 64.0) as i32 - 32) as f32 * 0.01).collect();
    let mut misleading: Vec<f32> = (0..n).map(|_| next() - 0.5).collect();
    misleading[..4096].iter_mut().for_each(|v| *v = 100.0); // sample block 0 is all huge
    let continuous: Vec<f32> = (0..n).map(|_| next() - 0.5).collect();
    for (what, v, density) in
        [("quantised", &quantised, 0.37), ("continuous", &continuous, 0.42), ("misleading", &misleading, 0.003)]
    {
        let base = vec![0f32; n];
        let (bb, xs) = (f32_bytes(&base), vec![f32_bytes(v)]);
        let j = job(&bb, &xs, &[1.0], &[density], spec(Method::Ties, false), n);
        let keep = oracle_keep(v, density);
        for threads in [1, 2] {
            let out = out_f32(
                &pool::pool(Some(threads)).unwrap().install(|| merge_to_vec(&j, &Options::with_chunk(65536))).unwrap(),
            );
            let bad = (0..n).filter(|&i| out[i] != if keep[i] { v[i] } else { 0.0 }).count();
            assert_eq!(bad, 0, "{what}, {threads} threads");
        }
    }
}

/// The TIES family's output bytes are the same on every instruction-set path the CPU has (forced through
/// `kernels::isa::set_override`; paths the CPU lacks narrow to the widest it has), for bf16 and f32 inputs with
/// frequent ties at the trim threshold.
#[test]
fn ties_family_same_bytes_on_every_instruction_set() {
    use ferromerge_core::kernels::isa::{self, Isa};
    let n = 5003;
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) % 41) as f32 / 16.0 - 1.25
    };
    let base: Vec<f32> = (0..n).map(|_| next() * 0.1).collect();
    let fts: Vec<Vec<f32>> = (0..3).map(|_| base.iter().map(|b| b + next() * 0.01).collect()).collect();
    let methods = [
        (Method::Ties, Rescale::None),
        (Method::DareTies, Rescale::L1),
        (Method::BreadcrumbsTies, Rescale::None),
        (Method::Della, Rescale::None),
    ];
    for dtype in [DType::F32, DType::BF16] {
        let enc = |v: &[f32]| -> Vec<u8> {
            let mut out = vec![0u8; v.len() * dtype.size()];
            ferromerge_core::dtype::encode(dtype, v, &mut out);
            out
        };
        let bb = enc(&base);
        let xs: Vec<Vec<u8>> = fts.iter().map(|f| enc(f)).collect();
        for (method, rescale) in methods {
            for m in [1usize, 3] {
                let mut sp = spec(method, true);
                sp.rescale = rescale;
                let mut j = job(&bb, &xs[..m], &[1.0, 0.5, 0.7][..m], &[0.5, 0.3, 0.7][..m], sp, n);
                j.base = Some(Source::mem(&bb, dtype));
                for (inp, x) in j.inputs.iter_mut().zip(&xs) {
                    inp.src = Source::mem(x, dtype);
                }
                j.out_dtype = dtype;
                let mut outs = Vec::new();
                for want in Isa::ALL {
                    let got = isa::set_override(Some(want));
                    let opts = Options { chunk_elems: 1000, candidate_bytes: usize::MAX };
                    outs.push((got, pool::pool(Some(2)).unwrap().install(|| merge_to_vec(&j, &opts)).unwrap()));
                }
                isa::set_override(None);
                for (isa, out) in &outs[1..] {
                    assert_eq!(out, &outs[0].1, "{method:?} {dtype:?} m {m} on {isa:?}");
                }
            }
        }
    }
}
