//! safetensors files from Python: the core's reader (header, metadata) and atomic writer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use ferromerge_core::io::{write_safetensors, SafetensorsFile};
use ferromerge_core::DType;

use crate::arrays::InputArray;
use crate::errors::{to_py, ParameterError};

fn open(py: Python<'_>, path: PathBuf) -> PyResult<SafetensorsFile> {
    py.detach(|| SafetensorsFile::open(&path)).map_err(to_py)
}

/// `{name: (dtype, shape)}` in data-offset order, so callers can follow the file's layout.
#[pyfunction]
pub fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let f = open(py, path)?;
    let d = PyDict::new(py);
    for name in f.names_in_file_order() {
        let e = &f.tensors()[name];
        d.set_item(name, (e.dtype_name.as_str(), e.shape.clone()))?;
    }
    Ok(d)
}

#[pyfunction]
pub fn read_metadata(py: Python<'_>, path: PathBuf) -> PyResult<HashMap<String, String>> {
    Ok(open(py, path)?.metadata().clone())
}

#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
pub fn save_file(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyDict>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut held = Vec::new();
    for (k, v) in tensors.iter() {
        let name: String = k.extract()?;
        let (arr, dtype): (Bound<'_, PyAny>, String) = v.extract()?;
        let h = InputArray::extract(&arr, &name)?;
        let dtype = DType::parse(&dtype).map_err(to_py)?;
        if h.dtype().size() != dtype.size() {
            return Err(ParameterError::new_err(format!(
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
