//! Method-wide parameters beyond weight/density/normalize/lambda/rescale (the plan's `params` object). Each
//! method accepts only its own names (mergekit's), so a misspelt key is an error rather than silently ignored.

use std::collections::BTreeMap;

use super::Method;
use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// slerp, nearswap: the interpolation factor (required).
    pub t: f64,
    /// nuslerp: vectors along dim 0 (columns of a matrix) instead of the last dim.
    pub row_wise: bool,
    /// nuslerp: the whole tensor is one vector.
    pub flatten: bool,
    /// multislerp
    pub normalize_weights: bool,
    pub eps: f64,
    /// karcher
    pub max_iter: u32,
    pub tol: f64,
    /// model_stock: one interpolation factor per row.
    pub filter_wise: bool,
    /// sce: fraction of elements (by variance across models) kept.
    pub select_topk: f64,
    /// ram, ramplus_tl: |delta| above this counts as a contribution.
    pub epsilon: f64,
    /// ramplus_tl
    pub r: f64,
    pub alpha: f64,
    /// breadcrumbs: select per row (the paper) instead of over the whole tensor (mergekit).
    pub per_row: bool,
    /// tsv_m: exact SVDs instead of randomized ones; the randomized sketch's extra columns and power iterations.
    pub exact_svd: bool,
    pub oversample: usize,
    pub power_iters: usize,
    /// iso_cts: share of the spectrum given to the common subspace.
    pub common_space_fraction: f64,
    /// star: percent of each task vector's nuclear norm kept.
    pub eta: f64,
    /// consensus: models whose TALL mask must agree for an element to be kept.
    pub k: usize,
    /// consensus, tall_masks: λ of the TALL mask |τ_t| > λ·|τ_MTL − τ_t|.
    pub tall_mask_lambda: f64,
    /// tall_masks: which model (0-based, among the non-base inputs) to rebuild.
    pub task: usize,
    /// Spectral methods: this tensor gets the mean task vector instead of the SVD treatment (the config's
    /// `exclude` pattern matched its name; the reference code does this for CLIP's text_projection).
    pub mean_only: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            t: f64::NAN,
            row_wise: false,
            flatten: true,
            normalize_weights: true,
            eps: 1e-8,
            max_iter: 10,
            tol: 1e-5,
            filter_wise: false,
            select_topk: 1.0,
            epsilon: 1e-5,
            r: 0.1,
            alpha: 0.2,
            per_row: false,
            exact_svd: false,
            oversample: 10,
            power_iters: 2,
            common_space_fraction: 0.8,
            eta: 40.0,
            k: 2,
            tall_mask_lambda: 0.4,
            task: usize::MAX,
            mean_only: false,
        }
    }
}

fn known(method: Method) -> &'static [&'static str] {
    match method {
        Method::Slerp | Method::Nearswap => &["t"],
        Method::Nuslerp => &["nuslerp_row_wise", "nuslerp_flatten"],
        Method::Multislerp => &["normalize_weights", "eps"],
        Method::Karcher => &["max_iter", "tol"],
        Method::ModelStock => &["filter_wise"],
        Method::Sce => &["select_topk"],
        Method::Ram => &["epsilon"],
        Method::RamplusTl => &["epsilon", "r", "alpha"],
        Method::Breadcrumbs | Method::BreadcrumbsTies => &["per_row"],
        Method::TsvM => &["alpha", "exact_svd", "oversample", "power_iters", "mean_only"],
        Method::IsoC => &["alpha", "mean_only"],
        Method::IsoCts => &["alpha", "common_space_fraction", "mean_only"],
        Method::Star => &["eta", "mean_only"],
        Method::Consensus => &["k", "tall_mask_lambda"],
        Method::TallMasks => &["task", "tall_mask_lambda"],
        _ => &[],
    }
}

impl Params {
    pub fn parse(method: Method, given: &BTreeMap<String, f64>) -> Result<Params> {
        let names = known(method);
        let err = |m: String| CoreError::param(format!("method {}: {m}", method.name()));
        for (k, &v) in given {
            if !names.contains(&k.as_str()) {
                let takes = if names.is_empty() { "none".to_string() } else { names.join(", ") };
                return Err(err(format!("unknown parameter '{k}' (it takes: {takes})")));
            }
            if !v.is_finite() {
                return Err(err(format!("parameter '{k}' must be finite, got {v}")));
            }
        }
        let flag = |k: &str, default: bool| -> Result<bool> {
            match given.get(k) {
                None => Ok(default),
                Some(&v) if v == 0.0 || v == 1.0 => Ok(v == 1.0),
                Some(v) => Err(err(format!("parameter '{k}' must be true or false, got {v}"))),
            }
        };
        let num = |k: &str, default: f64| given.get(k).copied().unwrap_or(default);
        let count = |k: &str, default: usize, max: f64| -> Result<usize> {
            let v = num(k, default as f64);
            if v < 0.0 || v.fract() != 0.0 || v > max {
                return Err(err(format!("{k} must be a whole number in [0, {max}], got {v}")));
            }
            Ok(v as usize)
        };
        let mut d = Params::default();
        if method.is_spectral() {
            // The spectral methods' final scale (TSV-M, Iso-C/CTS papers): 1.0; ramplus_tl's alpha is a clamp.
            d.alpha = 1.0;
        }
        let p = Params {
            t: num("t", d.t),
            row_wise: flag("nuslerp_row_wise", d.row_wise)?,
            flatten: flag("nuslerp_flatten", d.flatten)?,
            normalize_weights: flag("normalize_weights", d.normalize_weights)?,
            eps: num("eps", d.eps),
            max_iter: {
                let v = num("max_iter", d.max_iter as f64);
                if v < 0.0 || v.fract() != 0.0 || v > 1e6 {
                    return Err(err(format!("max_iter must be a whole number in [0, 1e6], got {v}")));
                }
                v as u32
            },
            tol: num("tol", d.tol),
            filter_wise: flag("filter_wise", d.filter_wise)?,
            select_topk: num("select_topk", d.select_topk),
            epsilon: num("epsilon", d.epsilon),
            r: num("r", d.r),
            alpha: num("alpha", d.alpha),
            per_row: flag("per_row", d.per_row)?,
            exact_svd: flag("exact_svd", d.exact_svd)?,
            oversample: count("oversample", d.oversample, 1e6)?,
            power_iters: count("power_iters", d.power_iters, 100.0)?,
            common_space_fraction: num("common_space_fraction", d.common_space_fraction),
            eta: num("eta", d.eta),
            k: count("k", d.k, 1e6)?,
            tall_mask_lambda: num("tall_mask_lambda", d.tall_mask_lambda),
            task: if given.contains_key("task") { count("task", 0, 1e6)? } else { d.task },
            mean_only: flag("mean_only", d.mean_only)?,
        };
        if method == Method::TallMasks && p.task == usize::MAX {
            return Err(err("missing required parameter 'task' (0-based index of the model to rebuild)".into()));
        }
        if !(0.0..=1.0).contains(&p.common_space_fraction) {
            return Err(err(format!("common_space_fraction must be in [0, 1], got {}", p.common_space_fraction)));
        }
        if !(p.eta > 0.0 && p.eta <= 100.0) {
            return Err(err(format!("eta must be in (0, 100] (percent of the nuclear norm), got {}", p.eta)));
        }
        if p.tall_mask_lambda < 0.0 {
            return Err(err(format!("tall_mask_lambda must not be negative, got {}", p.tall_mask_lambda)));
        }
        if matches!(method, Method::Slerp | Method::Nearswap) && p.t.is_nan() {
            return Err(err("missing required parameter 't'".into()));
        }
        if !(0.0..=1.0).contains(&p.select_topk) {
            return Err(err(format!("select_topk must be in [0, 1], got {}", p.select_topk)));
        }
        for (k, v) in [("eps", p.eps), ("tol", p.tol), ("epsilon", p.epsilon)] {
            if v < 0.0 {
                return Err(err(format!("{k} must not be negative, got {v}")));
            }
        }
        Ok(p)
    }
}
