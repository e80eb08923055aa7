//! Every method's output bytes are a function of the inputs alone: independent of chunk size, thread count and
//! the selection's memory budget, on 2-D tensors (rows matter to the row-wise methods).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use ferromerge_core::merge::{
    merge_to_vec, BasePolicy, Input, Job, Method, MethodSpec, Options, Params, Rescale, Source,
};
use ferromerge_core::{pool, DType};
use proptest::prelude::*;

const METHODS: [&str; 25] = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "sce",
    "ram",
    "ramplus_tl",
    "nearswap",
    "arcee_fusion",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "star",
    "consensus",
    "tall_masks",
];

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Method parameters exercising the non-default paths, chosen by `flip`.
fn params_for(method: Method, flip: bool) -> BTreeMap<String, f64> {
    let b = if flip { 1.0 } else { 0.0 };
    let pairs: Vec<(&str, f64)> = match method {
        Method::Slerp | Method::Nearswap => vec![("t", 0.3)],
        Method::Nuslerp => vec![("nuslerp_flatten", 0.0), ("nuslerp_row_wise", b)],
        Method::ModelStock => vec![("filter_wise", b)],
        Method::Sce => vec![("select_topk", 0.5)],
        Method::Breadcrumbs | Method::BreadcrumbsTies => vec![("per_row", b)],
        Method::RamplusTl => vec![("epsilon", 0.02)],
        Method::Karcher => vec![("max_iter", 5.0)],
        // A small sketch so the randomized path runs (not the exact fallback) on these small matrices.
        Method::TsvM => vec![("exact_svd", b), ("oversample", 1.0), ("power_iters", 1.0)],
        Method::IsoCts => vec![("common_space_fraction", 0.5)],
        Method::Star => vec![("eta", 60.0)],
        Method::Consensus => vec![("k", 1.0 + b)],
        Method::TallMasks => vec![("task", 0.0)],
        _ => vec![],
    };
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_method_independent_of_chunks_and_threads(
        rows in 1usize..40, cols in 1usize..60, m in 1usize..4, density in 0.2f64..0.8, chunk in 1usize..500,
        seed in 0u64..1000, which in 0usize..25, flip: bool,
    ) {
        let method = Method::parse(METHODS[which]).unwrap();
        let (lo, hi) = method.input_counts();
        let m = m.clamp(lo, hi.unwrap_or(usize::MAX));
        let n = rows * cols;
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
        let base: Vec<f32> = (0..n).map(|_| next()).collect();
        let xs: Vec<Vec<u8>> =
            (0..m).map(|_| f32_bytes(&base.iter().map(|b| b + 0.1 * next()).collect::<Vec<_>>())).collect();
        let bb = f32_bytes(&base);
        let eps = (density / 2.0).min((1.0 - density) / 2.0);
        let inputs = xs
            .iter()
            .enumerate()
            .map(|(i, x)| Input {
                src: Source::mem(x, DType::F32),
                weight: 0.3 + i as f64 * 0.2,
                density,
                model_id: i as u32,
                gamma: 0.05,
                epsilon: eps,
            })
            .collect();
        let mut spec = MethodSpec::new(method, flip, 1.0, if flip { Rescale::L1 } else { Rescale::InverseDensity }, seed);
        spec.params = Params::parse(method, &params_for(method, flip)).unwrap();
        let base = (method.base_policy() != BasePolicy::Joins).then_some(Source::mem(&bb, DType::F32));
        let job = Job { name: "w", shape: vec![rows, cols], numel: n, base, inputs, cast: None, spec, out_dtype: DType::F32, nonfinite: AtomicBool::default() };
        let reference = pool::pool(Some(1)).unwrap().install(|| merge_to_vec(&job, &Options::with_chunk(1 << 16))).unwrap();
        for threads in [1, 3] {
            for candidate_bytes in [0, usize::MAX] {
                let opts = Options { chunk_elems: chunk, candidate_bytes };
                let got = pool::pool(Some(threads)).unwrap().install(|| merge_to_vec(&job, &opts)).unwrap();
                prop_assert_eq!(&got, &reference, "{} with chunk {} threads {}", METHODS[which], chunk, threads);
            }
        }
    }
}

/// The randomized SVD at sizes where faer's factorizations split work across threads: the same bytes at any
/// thread count (faer is pinned to a fixed split) and for repeated runs.
#[test]
fn spectral_methods_independent_of_threads_on_large_matrices() {
    let (rows, cols) = (384, 320);
    let n = rows * cols;
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let base: Vec<f32> = (0..n).map(|_| next()).collect();
    let xs: Vec<Vec<u8>> =
        (0..3).map(|_| f32_bytes(&base.iter().map(|b| b + 0.1 * next()).collect::<Vec<_>>())).collect();
    let bb = f32_bytes(&base);
    for name in ["tsv_m", "iso_c", "iso_cts", "star"] {
        let method = Method::parse(name).unwrap();
        let inputs =
            xs.iter().enumerate().map(|(i, x)| Input::new(Source::mem(x, DType::F32), 1.0, 1.0, i as u32)).collect();
        let spec = MethodSpec::new(method, false, 1.0, Rescale::None, 7);
        let base = Some(Source::mem(&bb, DType::F32));
        let job = Job {
            name: "w",
            shape: vec![rows, cols],
            numel: n,
            base,
            inputs,
            cast: None,
            spec,
            out_dtype: DType::F32,
            nonfinite: AtomicBool::default(),
        };
        let run =
            |t: usize| pool::pool(Some(t)).unwrap().install(|| merge_to_vec(&job, &Options::with_chunk(4096))).unwrap();
        let one = run(1);
        assert_eq!(one, run(2), "{name}: 1 vs 2 threads");
        assert_eq!(one, run(3), "{name}: 1 vs 3 threads");
        assert_eq!(one, run(1), "{name}: repeated");
    }
}

fn merge_f32(method: &str, base: Option<&[f32]>, xs: &[&[f32]], params: &[(&str, f64)]) -> Vec<f32> {
    let method = Method::parse(method).unwrap();
    let bb = base.map(f32_bytes);
    let xb: Vec<Vec<u8>> = xs.iter().map(|x| f32_bytes(x)).collect();
    let mut spec = MethodSpec::new(method, false, 1.0, Rescale::None, 0);
    let given = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    spec.params = Params::parse(method, &given).unwrap();
    let n = xs[0].len();
    let job = Job {
        name: "w",
        shape: vec![n],
        numel: n,
        base: bb.as_deref().map(|b| Source::mem(b, DType::F32)),
        inputs: xb
            .iter()
            .enumerate()
            .map(|(i, x)| Input::new(Source::mem(x, DType::F32), 1.0, 1.0, i as u32))
            .collect(),
        cast: None,
        spec,
        out_dtype: DType::F32,
        nonfinite: AtomicBool::default(),
    };
    merge_to_vec(&job, &Options::with_chunk(3))
        .unwrap()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn slerp_endpoints_and_quarter_circle() {
    let a = [1.0f32, 0.0];
    let b = [0.0f32, 1.0];
    assert_eq!(merge_f32("slerp", Some(&a), &[&b], &[("t", 0.0)]), vec![1.0, 0.0]);
    assert_eq!(merge_f32("slerp", Some(&a), &[&b], &[("t", 1.0)]), vec![0.0, 1.0]);
    // Halfway along a quarter circle: (cos 45°, sin 45°).
    let h = merge_f32("slerp", Some(&a), &[&b], &[("t", 0.5)]);
    let r = std::f32::consts::FRAC_1_SQRT_2;
    assert!((h[0] - r).abs() < 1e-6 && (h[1] - r).abs() < 1e-6, "{h:?}");
}

#[test]
fn karcher_of_orthogonal_unit_vectors_is_their_bisector() {
    let a = [2.0f32, 0.0];
    let b = [0.0f32, 2.0];
    // The mean of two orthogonal directions is the 45° direction, scaled by the mean norm 2.
    let k = merge_f32("karcher", None, &[&a, &b], &[]);
    let r = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
    assert!((k[0] - r).abs() < 1e-5 && (k[1] - r).abs() < 1e-5, "{k:?}");
}

#[test]
fn model_stock_of_orthogonal_offsets_keeps_the_base() {
    // cos = 0 gives t = 0: the base itself.
    let base = [1.0f32, 1.0, 1.0];
    let a = [2.0f32, 1.0, 1.0];
    let b = [1.0f32, 2.0, 1.0];
    assert_eq!(merge_f32("model_stock", Some(&base), &[&a, &b], &[]), base.to_vec());
    // Identical offsets: cos = 1, t = 1: the mean of the models.
    assert_eq!(merge_f32("model_stock", Some(&base), &[&a, &a], &[]), a.to_vec());
}

#[test]
fn nearswap_takes_the_other_model_where_close() {
    let a = [0.0f32, 0.0];
    let b = [0.001f32, 5.0];
    let out = merge_f32("nearswap", Some(&a), &[&b], &[("t", 0.01)]);
    // |a−b| = 0.001 ≤ t: weight 1, b itself; |a−b| = 5: weight 0.002.
    assert_eq!(out[0], 0.001);
    assert!((out[1] - 0.002 * 5.0).abs() < 1e-6, "{out:?}");
}

#[test]
fn parameters_are_checked() {
    let err = |m: &str, p: &[(&str, f64)]| {
        let given = p.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Params::parse(Method::parse(m).unwrap(), &given).unwrap_err().to_string()
    };
    assert!(err("slerp", &[]).contains("missing required parameter 't'"));
    assert!(err("ties", &[("t", 0.5)]).contains("unknown parameter 't'"));
    assert!(err("nuslerp", &[("nuslerp_flatten", 0.5)]).contains("true or false"));
    assert!(err("sce", &[("select_topk", 1.5)]).contains("select_topk"));
    assert!(err("karcher", &[("max_iter", 2.5)]).contains("max_iter"));
}
