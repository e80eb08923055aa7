//! Python values read by the plan's own serde types, so that the in-memory API's `method` and input objects have
//! the same fields, defaults and unknown-key errors as the plan JSON. The Python object is deserialized directly
//! (no JSON text in between): numbers keep their exact value, and non-finite floats reach the engine's own checks
//! (which name the parameter) instead of failing as JSON.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::value::{Error as DeError, MapDeserializer, SeqDeserializer};
use serde::de::{DeserializeOwned, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

use crate::errors::ParameterError;

/// A Python value of the kinds a plan object holds.
enum PyValue {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    Map(Vec<(String, PyValue)>),
}

impl PyValue {
    fn from_py(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        if obj.is_none() {
            return Ok(PyValue::None);
        }
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(PyValue::Bool(b.is_true()));
        }
        if obj.is_instance_of::<PyInt>() {
            return Ok(PyValue::Int(obj.extract()?));
        }
        if obj.is_instance_of::<PyFloat>() {
            return Ok(PyValue::Float(obj.extract()?));
        }
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(PyValue::Str(s.to_str()?.to_owned()));
        }
        if let Ok(d) = obj.cast::<PyDict>() {
            let mut entries = Vec::with_capacity(d.len());
            for (k, v) in d.iter() {
                let key: String =
                    k.extract().map_err(|_| PyTypeError::new_err(format!("{what}: keys must be strings")))?;
                let value = PyValue::from_py(&v, &format!("{what}['{key}']"))?;
                entries.push((key, value));
            }
            return Ok(PyValue::Map(entries));
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
            let values = items.iter().enumerate().map(|(i, x)| PyValue::from_py(x, &format!("{what}[{i}]")));
            return values.collect::<PyResult<_>>().map(PyValue::List);
        }
        Err(PyTypeError::new_err(format!(
            "{what}: expected numbers, strings, booleans, lists and dicts, got {}",
            obj.get_type()
        )))
    }
}

impl IntoDeserializer<'_, DeError> for PyValue {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> serde::Deserializer<'de> for PyValue {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self {
            PyValue::None => visitor.visit_unit(),
            PyValue::Bool(b) => visitor.visit_bool(b),
            // Through the narrowest visit the primitive visitors accept (serde's f64/u32 do not take i128).
            PyValue::Int(i) => match (i64::try_from(i), u64::try_from(i)) {
                (Ok(v), _) => visitor.visit_i64(v),
                (_, Ok(v)) => visitor.visit_u64(v),
                _ => visitor.visit_i128(i),
            },
            PyValue::Float(f) => visitor.visit_f64(f),
            PyValue::Str(s) => visitor.visit_string(s),
            PyValue::List(items) => visitor.visit_seq(SeqDeserializer::new(items.into_iter())),
            PyValue::Map(entries) => visitor.visit_map(MapDeserializer::new(entries.into_iter())),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self {
            PyValue::None => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct
        newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// `obj` read as `T` (a plan serde type); a wrong value is a `ParameterError` naming `what`.
pub fn read<T: DeserializeOwned>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<T> {
    let value = PyValue::from_py(obj, what)?;
    T::deserialize(value).map_err(|e| ParameterError::new_err(format!("invalid {what}: {e}")))
}
