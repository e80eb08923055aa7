//! The plan: plain data saying, for every output tensor, which input tensors feed it, with which method and
//! parameters, in which output file. Built by the Python layer (config, filters, model resolution) and
//! executed here; its JSON form is documented in docs/architecture.md.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::merge::params::{DELLA_EPSILON, DENSITY, GAMMA};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub chunk_elems: Option<usize>,
    /// Merge NaN and infinite input values as they are (through the method's arithmetic) instead of stopping.
    #[serde(default)]
    pub allow_nonfinite: bool,
    pub shards: Vec<PlanShard>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanShard {
    pub file: String,
    pub tensors: Vec<PlanTensor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub out_dtype: String,
    #[serde(default)]
    pub cast_dtype: Option<String>,
    pub method: PlanMethod,
    #[serde(default)]
    pub base: Option<TensorRef>,
    pub inputs: Vec<PlanInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanMethod {
    pub name: String,
    #[serde(default)]
    pub normalize: bool,
    #[serde(default = "one")]
    pub lambda: f64,
    #[serde(default = "none")]
    pub rescale: String,
    #[serde(default)]
    pub seed: u64,
    /// Method-wide parameters beyond the above (booleans as 0/1); see `merge::params`.
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TensorRef {
    pub file: PathBuf,
    pub tensor: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInput {
    pub file: PathBuf,
    pub tensor: String,
    pub weight: f64,
    #[serde(default = "density")]
    pub density: f64,
    #[serde(default)]
    pub model_id: u32,
    #[serde(default = "gamma")]
    pub gamma: f64,
    #[serde(default = "epsilon")]
    pub epsilon: f64,
}

impl PlanInput {
    /// This input's values without its file (what a merge reads besides the bytes).
    #[must_use]
    pub fn values(&self) -> InputValues {
        InputValues {
            weight: self.weight,
            density: self.density,
            model_id: self.model_id,
            gamma: self.gamma,
            epsilon: self.epsilon,
        }
    }
}

/// One input's values, as the plan's inputs carry them (the in-memory merge's input objects have this form).
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct InputValues {
    pub weight: f64,
    #[serde(default = "density")]
    pub density: f64,
    #[serde(default)]
    pub model_id: u32,
    #[serde(default = "gamma")]
    pub gamma: f64,
    #[serde(default = "epsilon")]
    pub epsilon: f64,
}

fn one() -> f64 {
    1.0
}
// The per-input defaults live with the method parameters (`merge::params`).
fn density() -> f64 {
    DENSITY.default_value()
}
fn gamma() -> f64 {
    GAMMA.default_value()
}
fn epsilon() -> f64 {
    DELLA_EPSILON.default_value()
}
fn none() -> String {
    "none".into()
}

impl PlanMethod {
    /// The method object from its JSON form (the in-memory merge's `method` argument).
    ///
    /// # Errors
    /// A parameter error for malformed JSON or unknown keys.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| CoreError::param(format!("invalid method object: {e}")))
    }
}

impl Plan {
    /// # Errors
    /// A parameter error for malformed JSON, unknown keys, or an output file name that is not a plain name.
    pub fn from_json(s: &str) -> Result<Self> {
        let plan: Plan = serde_json::from_str(s).map_err(|e| CoreError::param(format!("invalid plan: {e}")))?;
        for shard in &plan.shards {
            let f = &shard.file;
            if f.is_empty() || f.contains('/') || f.contains('\\') || f == "." || f == ".." {
                return Err(CoreError::param(format!("invalid output file name '{f}' in plan")));
            }
        }
        Ok(plan)
    }

    pub fn tensors(&self) -> impl Iterator<Item = &PlanTensor> {
        self.shards.iter().flat_map(|s| s.tensors.iter())
    }
}

impl PlanTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Every input tensor reference, base first.
    pub fn refs(&self) -> impl Iterator<Item = (&PathBuf, &str)> {
        self.base
            .iter()
            .map(|b| (&b.file, b.tensor.as_str()))
            .chain(self.inputs.iter().map(|i| (&i.file, i.tensor.as_str())))
    }
}
