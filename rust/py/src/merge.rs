//! Merging: a whole plan into files (`execute_plan`), one tensor in memory (`merge_arrays`), and what the
//! engine knows before merging (`methods`, the method table; `memory_plan`, the run's memory figure).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use ferromerge_core::exec::{self, Progress, ShardDone, TensorNeeds};
use ferromerge_core::merge::{self, Job, MethodSpec, ParamDef, ParamKind, Source, METHODS};
use ferromerge_core::plan::{InputValues, Plan, PlanMethod};
use ferromerge_core::{pool, CoreError};

use crate::arrays::{with_output, InputArray};
use crate::errors::{to_py, ParameterError};
use crate::external_merge::PyExternalMerge;
use crate::values;

/// Merge one tensor in memory: `method` is the plan's method object, `values` one plan-input object per input
/// (without `file`/`tensor`).
#[pyfunction]
#[pyo3(signature = (method, inputs, base, values, *, out_dtype, cast_dtype=None, name="", shape=None, threads=None, chunk_elems=None, allow_nonfinite=false))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments
pub fn merge_arrays<'py>(
    py: Python<'py>,
    method: Bound<'py, PyAny>,
    inputs: Vec<Bound<'py, PyAny>>,
    base: Option<Bound<'py, PyAny>>,
    values: Bound<'py, PyAny>,
    out_dtype: &str,
    cast_dtype: Option<&str>,
    name: &str,
    shape: Option<Vec<usize>>,
    threads: Option<usize>,
    chunk_elems: Option<usize>,
    allow_nonfinite: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let method: PlanMethod = values::read(&method, "method object")?;
    let input_values: Vec<InputValues> = values::read(&values, "input values")?;
    let arrays: Vec<InputArray> = inputs
        .iter()
        .enumerate()
        .map(|(i, o)| InputArray::extract(o, &format!("inputs[{i}]")))
        .collect::<PyResult<_>>()?;
    let base_array = base.as_ref().map(|b| InputArray::extract(b, "base")).transpose()?;
    let n = base_array.as_ref().or(arrays.first()).map_or(0, InputArray::len);
    if input_values.len() != arrays.len() {
        return Err(ParameterError::new_err(format!(
            "{} inputs but {} input value objects",
            arrays.len(),
            input_values.len()
        )));
    }
    let mut sources = Vec::with_capacity(arrays.len());
    for (i, (a, v)) in arrays.iter().zip(input_values).enumerate() {
        if a.len() != n {
            return Err(ParameterError::new_err(format!("inputs[{i}] has {} elements, expected {n}", a.len())));
        }
        sources.push((Source::mem(a.bytes(&format!("inputs[{i}]"))?, a.dtype()), v));
    }
    let base_src = match &base_array {
        Some(b) => Some(Source::mem(b.bytes("base")?, b.dtype())),
        None => None,
    };
    let shape = shape.unwrap_or_else(|| vec![n]);
    if shape.iter().product::<usize>() != n {
        return Err(ParameterError::new_err(format!("tensor '{name}': shape {shape:?} does not hold {n} elements")));
    }
    let job = Job::from_plan(name, shape, &method, out_dtype, cast_dtype, base_src, &sources).map_err(to_py)?;
    merge::validate(&job).map_err(to_py)?;
    let pool = pool::pool(threads).map_err(to_py)?;
    let chunk = chunk_elems.unwrap_or(merge::DEFAULT_CHUNK_ELEMS);
    let out_dtype = job.out_dtype;
    with_output(py, out_dtype, n, |out| {
        let sink = merge::SliceSink::new(out, out_dtype);
        let merged = pool.install(|| merge::merge(&job, chunk, &sink));
        // Before the merge's own error: a NaN is the likelier cause of a kernel's complaint.
        if job.saw_nonfinite() && !allow_nonfinite {
            return Err(nonfinite_error(&job, name));
        }
        merged.map_err(to_py)
    })
}

/// The error for a NaN or an infinity in an in-memory input: the first input holding any (`base` or
/// `inputs[i]`), with its counts.
fn nonfinite_error(job: &Job, name: &str) -> PyErr {
    let counts = match merge::nonfinite_counts(job) {
        Ok(c) => c,
        Err(e) => return to_py(e),
    };
    let has_base = job.base.is_some();
    let (k, (nan, inf)) = counts.into_iter().enumerate().find(|(_, (a, b))| a + b > 0).unwrap_or((0, (0, 0)));
    let which = match (has_base, k) {
        (true, 0) => "base".to_string(),
        (true, k) => format!("inputs[{}]", k - 1),
        (false, k) => format!("inputs[{k}]"),
    };
    to_py(CoreError::tensor(
        which,
        name,
        format!(
            "{nan} NaN and {inf} infinite values; pass --allow-nonfinite (allow_nonfinite=True) to merge them as \
             they are"
        ),
    ))
}

/// Write every output shard of a plan into `out_dir`.
#[pyfunction]
#[pyo3(signature = (plan_json, out_dir, progress=None, threads=None, memory_limit=None, external=None, on_shard_done=None))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments
pub fn execute_plan(
    py: Python<'_>,
    plan_json: &str,
    out_dir: PathBuf,
    progress: Option<Py<PyAny>>,
    threads: Option<usize>,
    memory_limit: Option<u64>,
    external: Option<Py<PyAny>>,
    on_shard_done: Option<Py<PyAny>>,
) -> PyResult<HashMap<String, u64>> {
    let external_merge = external.map(|callable| PyExternalMerge { callable });
    let plan = Plan::from_json(plan_json).map_err(to_py)?;
    let stats = py
        .detach(|| {
            let mut on_progress = |p: &Progress| -> Result<(), CoreError> {
                // Ctrl-C and the callback's own exceptions travel through the core as themselves.
                Python::attach(|py| {
                    py.check_signals()?;
                    if let Some(cb) = &progress {
                        cb.call1(py, (p.tensors_done, p.tensors_total, p.bytes_done, p.bytes_total))?;
                    }
                    Ok(())
                })
                .map_err(crate::errors::external)
            };
            let mut on_shard = |d: &ShardDone| -> Result<(), CoreError> {
                let Some(cb) = &on_shard_done else { return Ok(()) };
                Python::attach(|py| cb.call1(py, (d.file, d.size, d.crc32)).map(drop)).map_err(crate::errors::external)
            };
            let opts = exec::ExecOptions { threads, memory_limit };
            let ext = external_merge.as_ref().map(|m| m as &dyn exec::ExternalMerge);
            let mut callbacks = exec::Callbacks { progress: &mut on_progress, shard_done: &mut on_shard };
            exec::execute_with(&plan, Path::new(&out_dir), &opts, ext, &mut callbacks)
        })
        .map_err(to_py)?;
    Ok(HashMap::from([
        ("tensors".to_string(), stats.tensors as u64),
        ("bytes_read".to_string(), stats.bytes_read),
        ("bytes_written".to_string(), stats.bytes_written),
    ]))
}

/// A parameter's default as Python sees it: a bool for flags, an int for whole numbers, None when required.
fn default_value<'py>(py: Python<'py>, def: &ParamDef) -> PyResult<Bound<'py, PyAny>> {
    let Some(v) = def.default else { return Ok(py.None().into_bound(py)) };
    Ok(match def.kind {
        ParamKind::Flag => (v == 1.0).into_pyobject(py)?.to_owned().into_any(),
        ParamKind::Whole { .. } => (v as u64).into_pyobject(py)?.into_any(),
        ParamKind::Number => v.into_pyobject(py)?.into_any(),
    })
}

fn defaults<'py>(py: Python<'py>, defs: &[ParamDef]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for def in defs {
        d.set_item(def.name, default_value(py, def)?)?;
    }
    Ok(d)
}

/// The engine's method table (`merge/method.rs`), one dict per method in table order.
#[pyfunction]
pub fn methods(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for row in &METHODS {
        let d = PyDict::new(py);
        d.set_item("name", row.name)?;
        d.set_item("family", row.family.name())?;
        d.set_item("base", row.base.name())?;
        d.set_item("min_inputs", row.min_inputs)?;
        d.set_item("max_inputs", row.max_inputs)?;
        d.set_item("params", defaults(py, row.params)?)?;
        d.set_item("input_params", defaults(py, row.input_params)?)?;
        d.set_item("sparsify", row.sparsify.name())?;
        d.set_item("consensus", row.consensus)?;
        d.set_item("spectral", row.method.is_spectral())?;
        out.append(d)?;
    }
    Ok(out)
}

/// The memory plan of a run (`exec/budget.rs`): `tensors` holds one dict per output tensor with its
/// `input_bytes` (base included), `inputs` (non-base), and its plan `method` object and `shape`.
#[pyfunction]
#[pyo3(signature = (memory_limit, threads, tensors, chunk_elems=None))]
pub fn memory_plan<'py>(
    py: Python<'py>,
    memory_limit: u64,
    threads: usize,
    tensors: Vec<Bound<'py, PyDict>>,
    chunk_elems: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut needs = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let item = |k: &str| -> PyResult<Bound<'py, PyAny>> {
            t.get_item(k)?.ok_or_else(|| ParameterError::new_err(format!("tensors[{i}]: missing '{k}'")))
        };
        let method: PlanMethod = values::read(&item("method")?, &format!("tensors[{i}] method object"))?;
        let shape: Vec<usize> = item("shape")?.extract()?;
        let spec = MethodSpec::from_plan(&method).map_err(to_py)?;
        let inputs: usize = item("inputs")?.extract()?;
        let input_bytes: u64 = item("input_bytes")?.extract()?;
        needs.push(TensorNeeds { input_bytes, inputs, working_bytes: merge::working_bytes(&spec, &shape, inputs) });
    }
    let plan = exec::memory_plan(memory_limit, threads, &needs, chunk_elems);
    let d = PyDict::new(py);
    d.set_item("budget", plan.budget)?;
    d.set_item("chunk_elems", plan.chunk_elems)?;
    d.set_item("read_ahead", plan.read_ahead)?;
    d.set_item("scratch", plan.scratch)?;
    d.set_item("working", plan.working)?;
    d.set_item("staging", plan.staging)?;
    d.set_item("largest", plan.largest)?;
    d.set_item("largest_input_bytes", plan.largest_input_bytes)?;
    d.set_item("peak", plan.peak)?;
    Ok(d)
}
