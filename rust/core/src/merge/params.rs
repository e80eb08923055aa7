//! Method parameters, typed per family, with their definitions (name, kind, default) beside them: every default
//! is written once, in a [`ParamDef`] below, and the method table (`method.rs`) lists which definitions each
//! method accepts. The plan's `params` object carries method-wide numbers (booleans as 0/1); each method accepts
//! only its own names (mergekit's), so a misspelt key is an error rather than silently ignored. Per-input
//! parameters (weight, density, gamma, epsilon) travel on each input.

use std::collections::BTreeMap;

use super::method::{Family, Method};
use crate::error::{CoreError, Result};

/// How a parameter's number is read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamKind {
    Number,
    /// A boolean, given as 0 or 1.
    Flag,
    /// A whole number in `[0, max]`; `max_text` is how error messages write `max`.
    Whole {
        max: f64,
        max_text: &'static str,
    },
}

/// One parameter: its name, kind and default (`None`: required).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: Option<f64>,
    /// Appended to the "missing required parameter" error (required parameters only).
    pub missing_hint: &'static str,
}

impl ParamDef {
    const fn number(name: &'static str, default: f64) -> Self {
        ParamDef { name, kind: ParamKind::Number, default: Some(default), missing_hint: "" }
    }
    const fn flag(name: &'static str, default: bool) -> Self {
        ParamDef { name, kind: ParamKind::Flag, default: Some(if default { 1.0 } else { 0.0 }), missing_hint: "" }
    }
    const fn whole(name: &'static str, default: Option<f64>, max: f64, max_text: &'static str) -> Self {
        ParamDef { name, kind: ParamKind::Whole { max, max_text }, default, missing_hint: "" }
    }
    const fn required(mut self, hint: &'static str) -> Self {
        self.default = None;
        self.missing_hint = hint;
        self
    }

    /// The default of an optional parameter.
    ///
    /// # Panics
    /// For a required parameter (a programming error: those have no default).
    #[must_use]
    pub fn default_value(&self) -> f64 {
        self.default.unwrap_or_else(|| panic!("parameter '{}' is required and has no default", self.name))
    }
}

// Per-input parameters (mergekit's per-model `weight`, `density`, `gamma`, `epsilon`).
/// The input's weight.
pub const WEIGHT: ParamDef = ParamDef::number("weight", f64::NAN).required("");
/// Fraction of the task vector kept, in (0, 1].
pub const DENSITY: ParamDef = ParamDef::number("density", 1.0);
/// breadcrumbs: fraction of the largest |delta| removed.
pub const GAMMA: ParamDef = ParamDef::number("gamma", 0.01);
/// DELLA: half-width of the keep-probability window around the density.
pub const DELLA_EPSILON: ParamDef = ParamDef::number("epsilon", 0.15);

// Method-wide parameters.
/// breadcrumbs: select per row (the paper) instead of over the whole tensor (mergekit).
pub const PER_ROW: ParamDef = ParamDef::flag("per_row", false);
/// slerp, nearswap: the interpolation factor.
pub const T: ParamDef = ParamDef::number("t", f64::NAN).required("");
/// nuslerp: vectors along dim 0 (columns of a matrix) instead of the last dim.
pub const NUSLERP_ROW_WISE: ParamDef = ParamDef::flag("nuslerp_row_wise", false);
/// nuslerp: the whole tensor is one vector.
pub const NUSLERP_FLATTEN: ParamDef = ParamDef::flag("nuslerp_flatten", true);
/// multislerp: divide the weights by their sum.
pub const NORMALIZE_WEIGHTS: ParamDef = ParamDef::flag("normalize_weights", true);
/// multislerp: numerical floor of norms.
pub const EPS: ParamDef = ParamDef::number("eps", 1e-8);
/// karcher: most iterations.
pub const MAX_ITER: ParamDef = ParamDef::whole("max_iter", Some(10.0), 1e6, "1e6");
/// karcher: convergence tolerance.
pub const TOL: ParamDef = ParamDef::number("tol", 1e-5);
/// model_stock: one interpolation factor per row.
pub const FILTER_WISE: ParamDef = ParamDef::flag("filter_wise", false);
/// sce: fraction of elements (by variance across models) kept.
pub const SELECT_TOPK: ParamDef = ParamDef::number("select_topk", 1.0);
/// ram, ramplus_tl: |delta| above this counts as a contribution.
pub const RAM_EPSILON: ParamDef = ParamDef::number("epsilon", 1e-5);
/// ramplus_tl: strength of the unique-part boost.
pub const RAM_R: ParamDef = ParamDef::number("r", 0.1);
/// ramplus_tl: cap of the shared/unique ratio.
pub const RAM_ALPHA: ParamDef = ParamDef::number("alpha", 0.2);
/// Spectral methods' final scale (the TSV-M and Iso-C/CTS papers' default).
pub const SPECTRAL_ALPHA: ParamDef = ParamDef::number("alpha", 1.0);
/// tsv_m: exact SVDs (the paper's factors; the default) or, when false, randomized top-k ones.
pub const EXACT_SVD: ParamDef = ParamDef::flag("exact_svd", true);
/// tsv_m: the randomized sketch's extra columns.
pub const OVERSAMPLE: ParamDef = ParamDef::whole("oversample", Some(10.0), 1e6, "1000000");
/// tsv_m: the randomized SVD's power iterations.
pub const POWER_ITERS: ParamDef = ParamDef::whole("power_iters", Some(2.0), 100.0, "100");
/// iso_cts: share of the spectrum given to the common subspace.
pub const COMMON_SPACE_FRACTION: ParamDef = ParamDef::number("common_space_fraction", 0.8);
/// star: percent of each task vector's nuclear norm kept.
pub const ETA: ParamDef = ParamDef::number("eta", 40.0);
/// Spectral methods: this tensor gets the mean task vector instead of the SVD treatment (the config's `exclude`
/// pattern matched its name; the reference code does this for CLIP's text_projection).
pub const MEAN_ONLY: ParamDef = ParamDef::flag("mean_only", false);
/// consensus: models whose TALL mask must agree for an element to be kept.
pub const K: ParamDef = ParamDef::whole("k", Some(2.0), 1e6, "1000000");
/// consensus, tall_masks: λ of the TALL mask |τ_t| > λ·|τ_MTL − τ_t|.
pub const TALL_MASK_LAMBDA: ParamDef = ParamDef::number("tall_mask_lambda", 0.4);
/// tall_masks: which model (0-based, among the non-base inputs) to rebuild.
pub const TASK: ParamDef =
    ParamDef::whole("task", None, 1e6, "1000000").required(" (0-based index of the model to rebuild)");

/// Given values with the definitions' defaults behind them; errors are bare messages (the caller names the method).
struct Values<'a> {
    given: &'a BTreeMap<String, f64>,
}

impl Values<'_> {
    /// The value of `def` (NaN for a missing required number).
    fn number(&self, def: &ParamDef) -> f64 {
        self.given.get(def.name).copied().or(def.default).unwrap_or(f64::NAN)
    }

    fn flag(&self, def: &ParamDef) -> std::result::Result<bool, String> {
        match self.given.get(def.name) {
            None => Ok(def.default == Some(1.0)),
            Some(&v) if v == 0.0 || v == 1.0 => Ok(v == 1.0),
            Some(v) => Err(format!("parameter '{}' must be true or false, got {v}", def.name)),
        }
    }

    /// A whole number (`usize::MAX` for a missing required one).
    fn whole(&self, def: &ParamDef) -> std::result::Result<usize, String> {
        let ParamKind::Whole { max, max_text } = def.kind else { unreachable!("{} is not a whole number", def.name) };
        let Some(v) = self.given.get(def.name).copied().or(def.default) else { return Ok(usize::MAX) };
        if v < 0.0 || v.fract() != 0.0 || v > max {
            return Err(format!("{} must be a whole number in [0, {max_text}], got {v}", def.name));
        }
        Ok(v as usize)
    }
}

type Checked<T> = std::result::Result<T, String>;

/// breadcrumbs (the only task-arithmetic method with a method-wide parameter).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskArithmeticParams {
    pub per_row: bool,
}

impl TaskArithmeticParams {
    fn read(v: &Values) -> Checked<Self> {
        Ok(TaskArithmeticParams { per_row: v.flag(&PER_ROW)? })
    }
}

/// slerp (`t`), nuslerp (`row_wise`, `flatten`), multislerp (`normalize_weights`, `eps`), karcher (`max_iter`,
/// `tol`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlerpParams {
    pub t: f64,
    pub row_wise: bool,
    pub flatten: bool,
    pub normalize_weights: bool,
    pub eps: f64,
    pub max_iter: u32,
    pub tol: f64,
}

impl SlerpParams {
    fn read(v: &Values) -> Checked<Self> {
        Ok(SlerpParams {
            t: v.number(&T),
            row_wise: v.flag(&NUSLERP_ROW_WISE)?,
            flatten: v.flag(&NUSLERP_FLATTEN)?,
            normalize_weights: v.flag(&NORMALIZE_WEIGHTS)?,
            eps: v.number(&EPS),
            max_iter: u32::try_from(v.whole(&MAX_ITER)?).expect("at most 1e6"),
            tol: v.number(&TOL),
        })
    }
    fn check(&self) -> Checked<()> {
        non_negative(&[(EPS.name, self.eps), (TOL.name, self.tol)])
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelStockParams {
    pub filter_wise: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SceParams {
    pub select_topk: f64,
}

impl SceParams {
    fn check(self) -> Checked<()> {
        if !(0.0..=1.0).contains(&self.select_topk) {
            return Err(format!("select_topk must be in [0, 1], got {}", self.select_topk));
        }
        Ok(())
    }
}

/// ram (`epsilon`), ramplus_tl (`epsilon`, `r`, `alpha`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RamParams {
    pub epsilon: f64,
    pub r: f64,
    pub alpha: f64,
}

impl RamParams {
    fn check(&self) -> Checked<()> {
        non_negative(&[(RAM_EPSILON.name, self.epsilon)])
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NearswapParams {
    pub t: f64,
}

/// consensus (`k`), tall_masks (`task`), both `tall_mask_lambda`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TallParams {
    pub k: usize,
    pub tall_mask_lambda: f64,
    /// `usize::MAX` when not given (consensus).
    pub task: usize,
}

impl TallParams {
    fn check(&self) -> Checked<()> {
        if self.tall_mask_lambda < 0.0 {
            return Err(format!("tall_mask_lambda must not be negative, got {}", self.tall_mask_lambda));
        }
        Ok(())
    }
}

/// tsv_m, iso_c, iso_cts, star.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpectralParams {
    pub alpha: f64,
    pub exact_svd: bool,
    pub oversample: usize,
    pub power_iters: usize,
    pub common_space_fraction: f64,
    pub eta: f64,
    pub mean_only: bool,
}

impl SpectralParams {
    fn read(v: &Values) -> Checked<Self> {
        Ok(SpectralParams {
            alpha: v.number(&SPECTRAL_ALPHA),
            exact_svd: v.flag(&EXACT_SVD)?,
            oversample: v.whole(&OVERSAMPLE)?,
            power_iters: v.whole(&POWER_ITERS)?,
            common_space_fraction: v.number(&COMMON_SPACE_FRACTION),
            eta: v.number(&ETA),
            mean_only: v.flag(&MEAN_ONLY)?,
        })
    }
    fn check(&self) -> Checked<()> {
        if !(0.0..=1.0).contains(&self.common_space_fraction) {
            return Err(format!("common_space_fraction must be in [0, 1], got {}", self.common_space_fraction));
        }
        if !(self.eta > 0.0 && self.eta <= 100.0) {
            return Err(format!("eta must be in (0, 100] (percent of the nuclear norm), got {}", self.eta));
        }
        Ok(())
    }
}

fn non_negative(values: &[(&str, f64)]) -> Checked<()> {
    for &(name, v) in values {
        if v < 0.0 {
            return Err(format!("{name} must not be negative, got {v}"));
        }
    }
    Ok(())
}

/// A method's parameters: one variant per family (see `method::Family`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Params {
    TaskArithmetic(TaskArithmeticParams),
    Slerp(SlerpParams),
    ModelStock(ModelStockParams),
    Sce(SceParams),
    Ram(RamParams),
    Nearswap(NearswapParams),
    ArceeFusion,
    Tall(TallParams),
    Spectral(SpectralParams),
}

impl Params {
    /// `method`'s parameters from the plan's `params` object, defaults filled in.
    ///
    /// # Errors
    /// A parameter error naming the method: an unknown name, a non-finite or out-of-range value, a missing
    /// required parameter.
    pub fn parse(method: Method, given: &BTreeMap<String, f64>) -> Result<Params> {
        let accepted = method.info().params;
        let err = |m: String| CoreError::param(format!("method {}: {m}", method.name()));
        for (k, &v) in given {
            if !accepted.iter().any(|d| d.name == k) {
                let names: Vec<&str> = accepted.iter().map(|d| d.name).collect();
                let takes = if names.is_empty() { "none".to_string() } else { names.join(", ") };
                return Err(err(format!("unknown parameter '{k}' (it takes: {takes})")));
            }
            if !v.is_finite() {
                return Err(err(format!("parameter '{k}' must be finite, got {v}")));
            }
        }
        let params = Self::read(method.family(), &Values { given }).map_err(err)?;
        if let Some(def) = accepted.iter().find(|d| d.default.is_none() && !given.contains_key(d.name)) {
            return Err(err(format!("missing required parameter '{}'{}", def.name, def.missing_hint)));
        }
        params.check().map_err(err)?;
        Ok(params)
    }

    /// Every parameter of `method` at its default (required ones unset: NaN, or `usize::MAX` for `task`).
    #[must_use]
    pub fn defaults(method: Method) -> Params {
        Self::read(method.family(), &Values { given: &BTreeMap::new() }).expect("the defaults are well-formed")
    }

    fn read(family: Family, v: &Values) -> Checked<Params> {
        Ok(match family {
            Family::TaskArithmetic => Params::TaskArithmetic(TaskArithmeticParams::read(v)?),
            Family::Slerp => Params::Slerp(SlerpParams::read(v)?),
            Family::ModelStock => Params::ModelStock(ModelStockParams { filter_wise: v.flag(&FILTER_WISE)? }),
            Family::Sce => Params::Sce(SceParams { select_topk: v.number(&SELECT_TOPK) }),
            Family::Ram => Params::Ram(RamParams {
                epsilon: v.number(&RAM_EPSILON),
                r: v.number(&RAM_R),
                alpha: v.number(&RAM_ALPHA),
            }),
            Family::Nearswap => Params::Nearswap(NearswapParams { t: v.number(&T) }),
            Family::ArceeFusion => Params::ArceeFusion,
            Family::Tall => Params::Tall(TallParams {
                k: v.whole(&K)?,
                tall_mask_lambda: v.number(&TALL_MASK_LAMBDA),
                task: v.whole(&TASK)?,
            }),
            Family::Spectral => Params::Spectral(SpectralParams::read(v)?),
        })
    }

    fn check(&self) -> Checked<()> {
        match self {
            Params::Slerp(p) => p.check(),
            Params::Sce(p) => p.check(),
            Params::Ram(p) => p.check(),
            Params::Tall(p) => p.check(),
            Params::Spectral(p) => p.check(),
            Params::TaskArithmetic(_) | Params::ModelStock(_) | Params::Nearswap(_) | Params::ArceeFusion => Ok(()),
        }
    }

    /// The family these parameters belong to.
    #[must_use]
    pub fn family(self) -> Family {
        match self {
            Params::TaskArithmetic(_) => Family::TaskArithmetic,
            Params::Slerp(_) => Family::Slerp,
            Params::ModelStock(_) => Family::ModelStock,
            Params::Sce(_) => Family::Sce,
            Params::Ram(_) => Family::Ram,
            Params::Nearswap(_) => Family::Nearswap,
            Params::ArceeFusion => Family::ArceeFusion,
            Params::Tall(_) => Family::Tall,
            Params::Spectral(_) => Family::Spectral,
        }
    }
}
