//! Conversions between Python and the native crates: numpy arrays and tensors, dicts of inputs
//! and batches, JSON and Python data, names of precisions and metrics, and errors.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use qcalib::Precision;
use qgraph::Tensor;

/// A sensitivity metric by name.
pub(crate) fn parse_metric(metric: &str) -> PyResult<qanalyze::Metric> {
    qanalyze::Metric::parse(metric).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown metric '{metric}' (psnr, sqnr, amp_sqnr, mse, topK_psnr, top1_agreement)"
        ))
    })
}

/// Batches from an iterable of dicts `{input name: array}` (a data loader).
pub(crate) fn batches_of(batches: &Bound<'_, PyAny>) -> PyResult<Vec<qcalib::Feeds>> {
    let mut all = Vec::new();
    for item in batches.try_iter()? {
        let item = item?;
        let d = item
            .downcast::<PyDict>()
            .map_err(|_| PyValueError::new_err("each batch must be a dict {input name: numpy array}"))?;
        all.push(feeds(d)?);
    }
    Ok(all)
}

/// The `ValueError` of any error of the native crates.
pub(crate) fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

pub(crate) fn precision(what: &str, s: &str) -> PyResult<Precision> {
    Precision::parse(s).ok_or_else(|| {
        PyValueError::new_err(format!("{what}: unknown precision '{s}' (int4..int16, fp16, bf16)"))
    })
}

/// A numpy array (f32, f64, f16 as f32, i64, i32, u8, i8, bool) as a tensor.
pub(crate) fn to_tensor(name: &str, a: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    macro_rules! try_as {
        ($($t:ty),*) => {$(
            if let Ok(arr) = a.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                let shape = arr.shape().to_vec();
                let data: Vec<$t> = arr.as_array().iter().copied().collect();
                return Tensor::from_vec(&shape, data)
                    .ok_or_else(|| PyValueError::new_err(format!("'{name}': shape {shape:?} does not hold its data")));
            }
        )*};
    }
    try_as!(f32, f64, i64, i32, u8, i8, bool);
    Err(PyValueError::new_err(format!(
        "'{name}': expected a numpy array of float32, float64, int64, int32, uint8, int8 or bool"
    )))
}

/// A tensor as a numpy array (its own element type for f32/f64/i64/i32/u8/bool; f16/bf16 as f32).
pub(crate) fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    macro_rules! out {
        ($a:expr) => {{
            let data: Vec<_> = $a.iter().copied().collect();
            Ok(PyArray1::from_vec(py, data).reshape(shape)?.into_any())
        }};
    }
    match t {
        Tensor::F32(a) => out!(a),
        Tensor::F64(a) => out!(a),
        Tensor::I64(a) => out!(a),
        Tensor::I32(a) => out!(a),
        Tensor::U8(a) => out!(a),
        Tensor::Bool(a) => out!(a),
        Tensor::F16(a) => out!(a.mapv(f32::from)),
        Tensor::BF16(a) => out!(a.mapv(f32::from)),
        other => Err(PyValueError::new_err(format!(
            "output of dtype {:?} has no numpy conversion here",
            other.dtype()
        ))),
    }
}

/// Feeds from a dict `{input name: array}`.
pub(crate) fn feeds(d: &Bound<'_, PyDict>) -> PyResult<qcalib::Feeds> {
    d.iter()
        .map(|(k, v)| {
            let name: String = k.extract()?;
            let t = to_tensor(&name, &v)?;
            Ok((name, t))
        })
        .collect()
}

/// A JSON value as plain Python data (dicts, lists, numbers, strings, None).
pub(crate) fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any(),
            None => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            PyList::new(py, items.iter().map(|i| json_to_py(py, i)).collect::<PyResult<Vec<_>>>()?)?
                .into_any()
        }
        Value::Object(map) => {
            let d = PyDict::new(py);
            for (k, v) in map {
                d.set_item(k, json_to_py(py, v)?)?;
            }
            d.into_any()
        }
    })
}
