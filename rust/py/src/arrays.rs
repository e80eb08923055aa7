//! NumPy arrays in and out, without copies: inputs are borrowed read-only and seen as little-endian bytes;
//! outputs are allocated by NumPy and filled by the core. bfloat16 travels as uint16/int16 bit patterns.

use half::f16;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use ferromerge_core::DType;

/// A borrowed input array, kept alive (and borrowed read-only) while the core reads it.
pub enum InputArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    U16(PyReadonlyArrayDyn<'py, u16>),
    I16(PyReadonlyArrayDyn<'py, i16>),
}

fn as_bytes<T>(s: &[T]) -> &[u8] {
    // SAFETY: plain-old-data numeric slices reinterpreted as their bytes (little-endian hosts only, which every
    // platform we build for is); the length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

impl<'py> InputArray<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<f32>>() {
            return Ok(InputArray::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<f16>>() {
            return Ok(InputArray::F16(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<u16>>() {
            return Ok(InputArray::U16(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<i16>>() {
            return Ok(InputArray::I16(a));
        }
        Err(PyTypeError::new_err(format!(
            "{what}: expected a NumPy array of float32, float16, or uint16/int16 holding bfloat16 bits"
        )))
    }

    pub fn dtype(&self) -> DType {
        match self {
            InputArray::F32(_) => DType::F32,
            InputArray::F16(_) => DType::F16,
            InputArray::U16(_) | InputArray::I16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            InputArray::F32(a) => a.len(),
            InputArray::F16(a) => a.len(),
            InputArray::U16(a) => a.len(),
            InputArray::I16(a) => a.len(),
        }
    }

    pub fn bytes(&self, what: &str) -> PyResult<&[u8]> {
        let err = |_| PyValueError::new_err(format!("{what}: array must be C-contiguous"));
        // `as_slice` also accepts Fortran order, whose bytes are not the row-major tensor.
        let c_order = match self {
            InputArray::F32(a) => a.is_c_contiguous(),
            InputArray::F16(a) => a.is_c_contiguous(),
            InputArray::U16(a) => a.is_c_contiguous(),
            InputArray::I16(a) => a.is_c_contiguous(),
        };
        if !c_order {
            return Err(PyValueError::new_err(format!("{what}: array must be C-contiguous")));
        }
        Ok(match self {
            InputArray::F32(a) => as_bytes(a.as_slice().map_err(err)?),
            InputArray::F16(a) => as_bytes(a.as_slice().map_err(err)?),
            InputArray::U16(a) => as_bytes(a.as_slice().map_err(err)?),
            InputArray::I16(a) => as_bytes(a.as_slice().map_err(err)?),
        })
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            InputArray::F32(a) => a.shape().to_vec(),
            InputArray::F16(a) => a.shape().to_vec(),
            InputArray::U16(a) => a.shape().to_vec(),
            InputArray::I16(a) => a.shape().to_vec(),
        }
    }
}

/// Allocate a flat output array of `dtype` and hand its bytes to `fill` (which runs with the GIL released).
pub fn with_output(
    py: Python<'_>,
    dtype: DType,
    n: usize,
    fill: impl FnOnce(&mut [u8]) -> PyResult<()> + Send,
) -> PyResult<Bound<'_, PyAny>> {
    fn run<T: numpy::Element>(
        py: Python<'_>,
        n: usize,
        fill: impl FnOnce(&mut [u8]) -> PyResult<()> + Send,
    ) -> PyResult<Bound<'_, PyAny>> {
        let arr = PyArray1::<T>::zeros(py, n, false);
        {
            let mut rw = arr.readwrite();
            let s = rw.as_slice_mut().expect("fresh arrays are contiguous");
            // SAFETY: as in `as_bytes`, for the exclusive borrow of a fresh numeric array.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) };
            py.detach(|| fill(bytes))?;
        }
        Ok(arr.into_any())
    }
    match dtype {
        DType::F32 => run::<f32>(py, n, fill),
        DType::F16 => run::<f16>(py, n, fill),
        DType::BF16 => run::<u16>(py, n, fill),
    }
}
