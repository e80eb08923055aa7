//! The engine's method table: one row per method, holding everything the engine knows about it besides its
//! kernel: name, family (the file under `methods/` that implements it), base policy, input counts, accepted
//! parameters with their defaults (defined in `params`), and the task-arithmetic family's sparsifier and
//! consensus. `_core.methods()` exports this table; Python's registry is checked against it.

use super::params::{self, ParamDef};
use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    ModelStock,
    Sce,
    Ram,
    RamplusTl,
    Nearswap,
    ArceeFusion,
    TsvM,
    IsoC,
    IsoCts,
    Star,
    Consensus,
    TallMasks,
}

/// A method family: the methods one file under `merge/methods/` implements (the file carries the family's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// linear and mergekit's generalized task arithmetic (`methods/task_arithmetic.rs`).
    TaskArithmetic,
    /// slerp, nuslerp, multislerp, karcher (`methods/slerp.rs`).
    Slerp,
    ModelStock,
    Sce,
    /// ram, ramplus_tl.
    Ram,
    Nearswap,
    ArceeFusion,
    /// The TALL-mask methods consensus and tall_masks.
    Tall,
    /// tsv_m, iso_c, iso_cts, star.
    Spectral,
}

impl Family {
    /// The family's name, which is also its file's name under `merge/methods/`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Family::TaskArithmetic => "task_arithmetic",
            Family::Slerp => "slerp",
            Family::ModelStock => "model_stock",
            Family::Sce => "sce",
            Family::Ram => "ram",
            Family::Nearswap => "nearswap",
            Family::ArceeFusion => "arcee_fusion",
            Family::Tall => "tall",
            Family::Spectral => "spectral",
        }
    }
}

/// What a method does with a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is the reference of task vectors (or the first endpoint of an interpolation).
    Required,
    /// With a base the method works on task vectors, without one on the tensors themselves.
    Optional,
    /// A base model joins as one more input (linear, karcher), so the job itself has none.
    Joins,
}

impl BasePolicy {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            BasePolicy::Required => "required",
            BasePolicy::Optional => "optional",
            BasePolicy::Joins => "joins",
        }
    }
}

/// How a task-arithmetic-family method sparsifies each delta (mergekit's `sparsification_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// TIES: the k largest |delta|.
    Magnitude,
    /// DARE: Bernoulli(density).
    Random,
    /// breadcrumbs: drop the largest gamma·n and the smallest, keeping density·n.
    Outliers,
    /// DELLA: Bernoulli with a keep probability rising with the magnitude rank in the row.
    Della,
}

impl Sparsify {
    /// The name of mergekit's sparsification method (`None`: no sparsification).
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        match self {
            Sparsify::None => None,
            Sparsify::Magnitude => Some("magnitude"),
            Sparsify::Random => Some("random"),
            Sparsify::Outliers => Some("magnitude_outliers"),
            Sparsify::Della => Some("della_magprune"),
        }
    }
}

/// One row of the method table.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub method: Method,
    pub name: &'static str,
    pub family: Family,
    pub base: BasePolicy,
    /// The least and most number of non-base inputs (every input where the base joins); `None`: no limit.
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
    /// Method-wide parameters (the plan's `params` object).
    pub params: &'static [ParamDef],
    /// Per-input parameters the kernel reads (each input of the plan carries them).
    pub input_params: &'static [ParamDef],
    pub sparsify: Sparsify,
    /// Sign election and disjoint mean (mergekit's `consensus: sum`).
    pub consensus: bool,
}

impl MethodInfo {
    const fn new(method: Method, name: &'static str, family: Family, base: BasePolicy) -> Self {
        MethodInfo {
            method,
            name,
            family,
            base,
            min_inputs: 1,
            max_inputs: None,
            params: &[],
            input_params: &[],
            sparsify: Sparsify::None,
            consensus: false,
        }
    }
    const fn inputs(mut self, min: usize, max: Option<usize>) -> Self {
        self.min_inputs = min;
        self.max_inputs = max;
        self
    }
    const fn params(mut self, params: &'static [ParamDef]) -> Self {
        self.params = params;
        self
    }
    const fn per_input(mut self, params: &'static [ParamDef]) -> Self {
        self.input_params = params;
        self
    }
    const fn sparsify(mut self, sparsify: Sparsify, consensus: bool) -> Self {
        self.sparsify = sparsify;
        self.consensus = consensus;
        self
    }
}

use params::{
    COMMON_SPACE_FRACTION, DELLA_EPSILON, DENSITY, EPS, ETA, EXACT_SVD, FILTER_WISE, GAMMA, K, MAX_ITER, MEAN_ONLY,
    NORMALIZE_WEIGHTS, NUSLERP_FLATTEN, NUSLERP_ROW_WISE, OVERSAMPLE, PER_ROW, POWER_ITERS, RAM_ALPHA, RAM_EPSILON,
    RAM_R, SELECT_TOPK, SPECTRAL_ALPHA, T, TALL_MASK_LAMBDA, TASK, TOL, WEIGHT,
};
use BasePolicy::{Joins, Optional, Required};
use Family as F;

const SPARSE: &[ParamDef] = &[WEIGHT, DENSITY];
const SPECTRAL_FACTORS: &[ParamDef] = &[SPECTRAL_ALPHA, EXACT_SVD, OVERSAMPLE, POWER_ITERS, MEAN_ONLY];

/// The method table, in `Method` order.
pub const METHODS: [MethodInfo; 25] = [
    MethodInfo::new(Method::Linear, "linear", F::TaskArithmetic, Joins).per_input(&[WEIGHT]),
    MethodInfo::new(Method::TaskArithmetic, "task_arithmetic", F::TaskArithmetic, Required).per_input(&[WEIGHT]),
    MethodInfo::new(Method::Ties, "ties", F::TaskArithmetic, Required)
        .per_input(SPARSE)
        .sparsify(Sparsify::Magnitude, true),
    MethodInfo::new(Method::DareTies, "dare_ties", F::TaskArithmetic, Required)
        .per_input(SPARSE)
        .sparsify(Sparsify::Random, true),
    MethodInfo::new(Method::DareLinear, "dare_linear", F::TaskArithmetic, Required)
        .per_input(SPARSE)
        .sparsify(Sparsify::Random, false),
    MethodInfo::new(Method::Breadcrumbs, "breadcrumbs", F::TaskArithmetic, Required)
        .params(&[PER_ROW])
        .per_input(&[WEIGHT, DENSITY, GAMMA])
        .sparsify(Sparsify::Outliers, false),
    MethodInfo::new(Method::BreadcrumbsTies, "breadcrumbs_ties", F::TaskArithmetic, Required)
        .params(&[PER_ROW])
        .per_input(&[WEIGHT, DENSITY, GAMMA])
        .sparsify(Sparsify::Outliers, true),
    MethodInfo::new(Method::Della, "della", F::TaskArithmetic, Required)
        .per_input(&[WEIGHT, DENSITY, DELLA_EPSILON])
        .sparsify(Sparsify::Della, true),
    MethodInfo::new(Method::DellaLinear, "della_linear", F::TaskArithmetic, Required)
        .per_input(&[WEIGHT, DENSITY, DELLA_EPSILON])
        .sparsify(Sparsify::Della, false),
    MethodInfo::new(Method::Slerp, "slerp", F::Slerp, Required).inputs(1, Some(1)).params(&[T]),
    MethodInfo::new(Method::Nuslerp, "nuslerp", F::Slerp, Optional)
        .inputs(2, Some(2))
        .params(&[NUSLERP_ROW_WISE, NUSLERP_FLATTEN])
        .per_input(&[WEIGHT]),
    MethodInfo::new(Method::Multislerp, "multislerp", F::Slerp, Optional)
        .params(&[NORMALIZE_WEIGHTS, EPS])
        .per_input(&[WEIGHT]),
    MethodInfo::new(Method::Karcher, "karcher", F::Slerp, Joins).params(&[MAX_ITER, TOL]),
    MethodInfo::new(Method::ModelStock, "model_stock", F::ModelStock, Required).inputs(2, None).params(&[FILTER_WISE]),
    MethodInfo::new(Method::Sce, "sce", F::Sce, Required).params(&[SELECT_TOPK]),
    MethodInfo::new(Method::Ram, "ram", F::Ram, Required).params(&[RAM_EPSILON]),
    MethodInfo::new(Method::RamplusTl, "ramplus_tl", F::Ram, Required).params(&[RAM_EPSILON, RAM_R, RAM_ALPHA]),
    MethodInfo::new(Method::Nearswap, "nearswap", F::Nearswap, Required).inputs(1, Some(1)).params(&[T]),
    MethodInfo::new(Method::ArceeFusion, "arcee_fusion", F::ArceeFusion, Required).inputs(1, Some(1)),
    MethodInfo::new(Method::TsvM, "tsv_m", F::Spectral, Required).params(SPECTRAL_FACTORS),
    MethodInfo::new(Method::IsoC, "iso_c", F::Spectral, Required).params(&[SPECTRAL_ALPHA, MEAN_ONLY]),
    MethodInfo::new(Method::IsoCts, "iso_cts", F::Spectral, Required).params(&[
        SPECTRAL_ALPHA,
        COMMON_SPACE_FRACTION,
        MEAN_ONLY,
    ]),
    MethodInfo::new(Method::Star, "star", F::Spectral, Required).params(&[ETA, MEAN_ONLY]),
    MethodInfo::new(Method::Consensus, "consensus", F::Tall, Required).params(&[K, TALL_MASK_LAMBDA]),
    MethodInfo::new(Method::TallMasks, "tall_masks", F::Tall, Required).params(&[TASK, TALL_MASK_LAMBDA]),
];

impl Method {
    /// The method called `name`.
    ///
    /// # Errors
    /// A parameter error listing the known names.
    pub fn parse(name: &str) -> Result<Self> {
        METHODS.iter().find(|row| row.name == name).map(|row| row.method).ok_or_else(|| {
            let names: Vec<&str> = METHODS.iter().map(|row| row.name).collect();
            CoreError::param(format!("unknown merge method '{name}' (the engine knows {})", names.join(", ")))
        })
    }

    /// This method's row of [`METHODS`].
    #[must_use]
    pub fn info(self) -> &'static MethodInfo {
        &METHODS[self as usize]
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        self.info().name
    }

    #[must_use]
    pub fn family(self) -> Family {
        self.info().family
    }

    #[must_use]
    pub fn sparsify(self) -> Sparsify {
        self.info().sparsify
    }

    /// Sign election and disjoint mean (mergekit's `consensus: sum`).
    #[must_use]
    pub fn consensus(self) -> bool {
        self.info().consensus
    }

    /// Methods that work in the singular-vector space of each whole 2-D task vector (`methods/spectral.rs`).
    #[must_use]
    pub fn is_spectral(self) -> bool {
        self.family() == Family::Spectral
    }

    #[must_use]
    pub fn base_policy(self) -> BasePolicy {
        self.info().base
    }

    /// The least and most number of non-base inputs.
    #[must_use]
    pub fn input_counts(self) -> (usize, Option<usize>) {
        (self.info().min_inputs, self.info().max_inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_enum_order_with_unique_names() {
        for (i, row) in METHODS.iter().enumerate() {
            assert_eq!(row.method as usize, i, "{} is out of order", row.name);
            assert_eq!(Method::parse(row.name).unwrap(), row.method);
        }
    }

    #[test]
    fn sparsifying_methods_take_densities() {
        for row in &METHODS {
            let takes_density = row.input_params.iter().any(|p| p.name == DENSITY.name);
            assert_eq!(takes_density, row.sparsify != Sparsify::None, "{}", row.name);
            assert!(row.sparsify == Sparsify::None || row.family == Family::TaskArithmetic, "{}", row.name);
        }
    }
}
