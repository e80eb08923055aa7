//! Python values as JSON values, so that the in-memory API's `method` and input objects are read by the plan's
//! own serde types (same fields, defaults and unknown-key errors as the plan JSON). Numbers keep their exact
//! f64/integer value: no text round trip.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use crate::errors::ParameterError;

fn to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<u64>() {
            return Ok(Value::Number(v.into()));
        }
        return Ok(Value::Number(obj.extract::<i64>()?.into()));
    }
    if obj.is_instance_of::<PyFloat>() {
        let v: f64 = obj.extract()?;
        // Non-finite numbers have no JSON form; the checks downstream name the parameter.
        return Ok(Number::from_f64(v).map_or_else(|| Value::String(v.to_string()), Value::Number));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key: String = k.extract().map_err(|_| PyTypeError::new_err(format!("{what}: keys must be strings")))?;
            let value = to_json(&v, &format!("{what}['{key}']"))?;
            m.insert(key, value);
        }
        return Ok(Value::Object(m));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        return items.iter().enumerate().map(|(i, x)| to_json(x, &format!("{what}[{i}]"))).collect();
    }
    Err(PyTypeError::new_err(format!("{what}: expected numbers, strings, booleans, lists and dicts, got {}", obj.get_type())))
}

/// `obj` read as `T` (a plan serde type); a wrong value is a `ParameterError` naming `what`.
pub fn read<T: DeserializeOwned>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<T> {
    let value = to_json(obj, what)?;
    serde_json::from_value(value).map_err(|e| ParameterError::new_err(format!("invalid {what}: {e}")))
}
