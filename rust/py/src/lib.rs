//! `ferromerge._core`: the Python face of ferromerge-core. This crate only converts types, releases the GIL
//! around every piece of I/O or compute, and maps errors; all logic lives in the core.

mod arrays;
mod errors;
mod hook;
mod linalg;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use ferromerge_core::exec::{self, Progress};
use ferromerge_core::io::{write_safetensors, SafetensorsFile};
use ferromerge_core::merge::{self, Input, Job, Method, MethodSpec, Params, Rescale, Source};
use ferromerge_core::plan::Plan;
use ferromerge_core::{pool, CoreError, DType};

use arrays::{with_output, Held};
use errors::{to_py, InputError, MergeError, OutputError, ParameterError};

fn open(py: Python<'_>, path: PathBuf) -> PyResult<SafetensorsFile> {
    py.detach(|| SafetensorsFile::open(&path)).map_err(to_py)
}

/// `{name: (dtype, shape)}` in data-offset order, so callers can follow the file's layout.
#[pyfunction]
fn read_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let f = open(py, path)?;
    let d = PyDict::new(py);
    for name in f.names_in_file_order() {
        let e = &f.tensors()[name];
        d.set_item(name, (e.dtype_name.as_str(), e.shape.clone()))?;
    }
    Ok(d)
}

#[pyfunction]
fn read_metadata(py: Python<'_>, path: PathBuf) -> PyResult<HashMap<String, String>> {
    Ok(open(py, path)?.metadata().clone())
}

#[pyfunction]
#[pyo3(signature = (
    method, inputs, base, weights, densities, *, out_dtype, normalize, cast_dtype=None, lambda_=1.0,
    rescale="none", seed=0, name="", model_ids=None, threads=None, chunk_elems=None, shape=None, params=None,
    gammas=None, epsilons=None
))]
#[allow(clippy::too_many_arguments)]
fn merge_arrays<'py>(
    py: Python<'py>,
    method: &str,
    inputs: Vec<Bound<'py, PyAny>>,
    base: Option<Bound<'py, PyAny>>,
    weights: Vec<f64>,
    densities: Vec<f64>,
    out_dtype: &str,
    normalize: bool,
    cast_dtype: Option<&str>,
    lambda_: f64,
    rescale: &str,
    seed: u64,
    name: &str,
    model_ids: Option<Vec<u32>>,
    threads: Option<usize>,
    chunk_elems: Option<usize>,
    shape: Option<Vec<usize>>,
    params: Option<BTreeMap<String, f64>>,
    gammas: Option<Vec<f64>>,
    epsilons: Option<Vec<f64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let held: Vec<Held> =
        inputs.iter().enumerate().map(|(i, o)| Held::extract(o, &format!("inputs[{i}]"))).collect::<PyResult<_>>()?;
    let base_held = base.as_ref().map(|b| Held::extract(b, "base")).transpose()?;
    let n = base_held.as_ref().or(held.first()).map(Held::len).unwrap_or(0);
    let model_ids = model_ids.unwrap_or_else(|| (0..held.len() as u32).collect());
    let gammas = gammas.unwrap_or_else(|| vec![0.01; held.len()]);
    let epsilons = epsilons.unwrap_or_else(|| vec![0.15; held.len()]);
    let m = held.len();
    if weights.len() != m || densities.len() != m || model_ids.len() != m || gammas.len() != m || epsilons.len() != m {
        return Err(PyValueError::new_err(format!(
            "{m} inputs but {} weights, {} densities, {} model_ids, {} gammas, {} epsilons",
            weights.len(),
            densities.len(),
            model_ids.len(),
            gammas.len(),
            epsilons.len()
        )));
    }
    let mut sources = Vec::with_capacity(held.len());
    for (i, h) in held.iter().enumerate() {
        if h.len() != n {
            return Err(PyValueError::new_err(format!("inputs[{i}] has {} elements, expected {n}", h.len())));
        }
        sources.push(Source { bytes: h.bytes(&format!("inputs[{i}]"))?, dtype: h.dtype() });
    }
    let base_src = match &base_held {
        Some(b) => Some(Source { bytes: b.bytes("base")?, dtype: b.dtype() }),
        None => None,
    };
    let method = Method::parse(method).map_err(to_py)?;
    let spec = MethodSpec {
        method,
        normalize,
        lambda: lambda_,
        rescale: Rescale::parse(rescale).map_err(to_py)?,
        seed,
        params: Params::parse(method, &params.unwrap_or_default()).map_err(to_py)?,
    };
    let inputs = sources
        .into_iter()
        .enumerate()
        .map(|(i, src)| Input {
            src,
            weight: weights[i],
            density: densities[i],
            model_id: model_ids[i],
            gamma: gammas[i],
            epsilon: epsilons[i],
        })
        .collect();
    let job = Job {
        name,
        shape: shape.unwrap_or_else(|| vec![n]),
        numel: n,
        base: base_src,
        inputs,
        cast: cast_dtype.map(DType::parse).transpose().map_err(to_py)?,
        spec,
        out_dtype: DType::parse(out_dtype).map_err(to_py)?,
    };
    merge::validate(&job).map_err(to_py)?;
    let pool = pool::pool(threads).map_err(to_py)?;
    let chunk = chunk_elems.unwrap_or(merge::DEFAULT_CHUNK_ELEMS);
    let out_dtype = job.out_dtype;
    with_output(py, out_dtype, n, |out| {
        let sink = merge::SliceSink::new(out, out_dtype);
        pool.install(|| merge::merge(&job, chunk, &sink)).map_err(to_py)
    })
}

#[pyfunction]
#[pyo3(signature = (plan_json, out_dir, progress=None, threads=None, memory_limit=None, external=None))]
fn execute_plan(
    py: Python<'_>,
    plan_json: &str,
    out_dir: PathBuf,
    progress: Option<Py<PyAny>>,
    threads: Option<usize>,
    memory_limit: Option<u64>,
    external: Option<Py<PyAny>>,
) -> PyResult<HashMap<String, u64>> {
    let hook = external.map(|h| hook::PyHook { hook: h, raised: std::sync::Mutex::new(None) });
    let plan = Plan::from_json(plan_json).map_err(to_py)?;
    // An exception raised by the callback (or a signal) is kept here and re-raised as itself.
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut on_progress = |p: &Progress| -> Result<(), CoreError> {
            Python::attach(|py| {
                let r = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => {
                        cb.call1(py, (p.tensors_done, p.tensors_total, p.bytes_done, p.bytes_total)).map(|_| ())
                    }
                    None => Ok(()),
                });
                r.map_err(|e| {
                    raised = Some(e);
                    CoreError::Interrupted
                })
            })
        };
        let opts = exec::ExecOptions { threads, memory_limit };
        let ext = hook.as_ref().map(|h| h as &dyn exec::External);
        exec::execute_with(&plan, Path::new(&out_dir), &opts, ext, &mut on_progress)
    });
    if let Some(e) = hook.as_ref().and_then(|h| h.raised.lock().unwrap_or_else(|p| p.into_inner()).take()) {
        return Err(e);
    }
    match result {
        Ok(s) => Ok(HashMap::from([
            ("tensors".to_string(), s.tensors as u64),
            ("bytes_read".to_string(), s.bytes_read),
            ("bytes_written".to_string(), s.bytes_written),
        ])),
        Err(CoreError::Interrupted) if raised.is_some() => Err(raised.take().expect("checked")),
        Err(e) => Err(to_py(e)),
    }
}

#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
fn save_file(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyDict>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut held = Vec::new();
    for (k, v) in tensors.iter() {
        let name: String = k.extract()?;
        let (arr, dtype): (Bound<'_, PyAny>, String) = v.extract()?;
        let h = Held::extract(&arr, &name)?;
        let dtype = DType::parse(&dtype).map_err(to_py)?;
        if h.dtype().size() != dtype.size() {
            return Err(PyValueError::new_err(format!(
                "tensor '{name}': a {} array cannot hold {}",
                h.dtype().name(),
                dtype.name()
            )));
        }
        held.push((name, dtype, h.shape(), h));
    }
    let mut views = Vec::with_capacity(held.len());
    for (name, dtype, shape, h) in &held {
        views.push((name.as_str(), *dtype, shape.as_slice(), h.bytes(name)?));
    }
    let metadata = metadata.unwrap_or_default();
    py.detach(|| write_safetensors(&path, &views, &metadata)).map_err(to_py)
}

/// The memory budget a run uses when none is given.
#[pyfunction]
fn default_memory_limit() -> u64 {
    exec::default_memory_limit()
}

/// Elements per chunk the engine uses for a memory budget, worker count and inputs per tensor (base included).
#[pyfunction]
fn chunk_elems(memory_limit: u64, threads: usize, inputs: usize) -> usize {
    exec::chunk_elems(memory_limit, threads, inputs)
}

/// Bytes the merge of one tensor of `shape` by `method` holds beyond the streaming buffers (spectral methods'
/// whole-matrix working set; 0 for the rest).
#[pyfunction]
#[pyo3(signature = (method, shape, params=None))]
fn working_bytes(method: &str, shape: Vec<usize>, params: Option<BTreeMap<String, f64>>) -> PyResult<u64> {
    let method = Method::parse(method).map_err(to_py)?;
    let params = Params::parse(method, &params.unwrap_or_default()).map_err(to_py)?;
    let spec = MethodSpec { method, normalize: false, lambda: 1.0, rescale: Rescale::None, seed: 0, params };
    let numel = shape.iter().product();
    let job = Job { name: "", shape, numel, base: None, inputs: vec![], cast: None, spec, out_dtype: DType::F32 };
    Ok(merge::working_bytes(&job))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MergeError", py.get_type::<MergeError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("ParameterError", py.get_type::<ParameterError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(merge_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(execute_plan, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(default_memory_limit, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_elems, m)?)?;
    m.add_function(wrap_pyfunction!(linalg::svd, m)?)?;
    m.add_function(wrap_pyfunction!(working_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(linalg::polar, m)?)?;
    m.add("MIN_MEMORY_LIMIT", exec::MIN_MEMORY_LIMIT)?;
    Ok(())
}
