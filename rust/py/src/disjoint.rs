//! `_core.disjoint_mean`: PEFT's TIES sign election and disjoint mean (`ferromerge_core::kernels::disjoint`) over
//! float32 NumPy arrays, for LoRA adapter merges (`ferromerge.adapters.combine`), on the engine's thread pool.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use ferromerge_core::kernels::disjoint::{self, Majority};
use ferromerge_core::pool;

use crate::errors::{to_py, ParameterError};

/// Σ over the agreeing inputs of w_i·x_i, divided by how many agree (the elected sign from the unweighted
/// inputs); a flat float32 array. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (inputs, weights, majority_sign, *, threads=None))]
pub fn disjoint_mean<'py>(
    py: Python<'py>,
    inputs: Vec<PyReadonlyArrayDyn<'py, f32>>,
    weights: Vec<f64>,
    majority_sign: &str,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let majority = match majority_sign {
        "total" => Majority::Total,
        "frequency" => Majority::Frequency,
        other => {
            return Err(ParameterError::new_err(format!("majority_sign must be 'total' or 'frequency', got {other:?}")))
        }
    };
    if inputs.is_empty() || inputs.len() != weights.len() {
        return Err(ParameterError::new_err(format!(
            "disjoint_mean needs one weight per input and at least one input, got {} inputs and {} weights",
            inputs.len(),
            weights.len()
        )));
    }
    let n = inputs[0].len();
    let mut xs = Vec::with_capacity(inputs.len());
    for (i, a) in inputs.iter().enumerate() {
        let data = a
            .as_slice()
            .ok()
            .filter(|_| a.is_c_contiguous())
            .ok_or_else(|| ParameterError::new_err(format!("inputs[{i}] must be a C-contiguous float32 array")))?;
        if data.len() != n {
            return Err(ParameterError::new_err(format!("inputs[{i}] has {} elements, expected {n}", data.len())));
        }
        xs.push(data);
    }
    // float32 weights, as NumPy's `p * np.float32(w)` rounds them
    #[allow(clippy::cast_possible_truncation)]
    let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let pool = pool::pool(threads).map_err(to_py)?;
    let out = PyArray1::<f32>::zeros(py, n, false);
    {
        let mut rw = out.readwrite();
        let o = rw.as_slice_mut().expect("fresh arrays are contiguous");
        py.detach(|| pool.install(|| disjoint::disjoint_mean(&xs, &weights, majority, o)));
    }
    Ok(out)
}
