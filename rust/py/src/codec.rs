//! The engine's number codec (`ferromerge_core::dtype`) for Python: f32 values to a dtype's storage and back.
//! bfloat16 is stored as uint16 bit patterns (NumPy has no bfloat16), float16 as float16, float32 as itself;
//! rounding is the engine's (round to nearest even), so Python and the merges encode alike.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use ferromerge_core::{dtype, DType};

use crate::arrays::{with_output, InputArray};
use crate::errors::{to_py, ParameterError};

/// float32 `values` encoded to `dtype`'s storage array, same shape.
#[pyfunction]
pub fn encode<'py>(py: Python<'py>, values: PyReadonlyArrayDyn<'py, f32>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let dtype = DType::parse(dtype).map_err(to_py)?;
    let shape = values.shape().to_vec();
    let src = values
        .as_slice()
        .ok()
        .filter(|_| values.is_c_contiguous())
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("values: array must be C-contiguous"))?;
    let out = with_output(py, dtype, src.len(), |bytes| {
        dtype::encode(dtype, src, bytes);
        Ok(())
    })?;
    out.call_method1("reshape", (shape,))
}

/// `array` (`dtype`'s storage: uint16/int16 bits for bfloat16, float16, float32) decoded to float32, same shape.
#[pyfunction]
pub fn decode<'py>(py: Python<'py>, array: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let dtype = DType::parse(dtype).map_err(to_py)?;
    let held = InputArray::extract(array, "array")?;
    if held.dtype() != dtype {
        return Err(ParameterError::new_err(format!(
            "a {} array does not hold {} values",
            held.dtype().name(),
            dtype.name()
        )));
    }
    let shape = held.shape();
    let bytes = held.bytes("array")?;
    let mut out = vec![0f32; held.len()];
    py.detach(|| dtype::decode(dtype, bytes, &mut out));
    Ok(PyArray1::from_vec(py, out).reshape(shape)?.into_any())
}
