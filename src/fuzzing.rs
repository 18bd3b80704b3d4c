//! Exercising arbitrary model bytes the way a user's run would, for the fuzzers (`cargo xtask
//! fuzz` and the `cargo fuzz` target in `fuzz/`): load, infer shapes, summarise, plan a session,
//! run it on inputs made up from the declared shapes, and parse an encodings document with
//! hostile values. Every failure must be an error; a panic is a bug.

use qgraph::{DType, Model, Tensor};

/// Largest input fed to a model, in elements.
const MAX_FEED: usize = 1 << 20;

/// Runs `bytes` through loader, shape inference, planning and a run; `variant` picks the hostile
/// values of the encodings document. Returns the stage it ended at.
pub fn exercise(bytes: &[u8], variant: u64) -> &'static str {
    let Ok(mut model) = qgraph::load_bytes(bytes, None) else { return "load error" };
    if model.infer_shapes(&qgraph::DimBindings::all(1)).is_err() {
        return "shape error";
    }
    let _ = model.summary().to_string();
    let feeds: Option<Vec<(String, Tensor)>> =
        model.graph.inputs().iter().map(|&v| made_up_feed(&model, v)).collect();
    let _ = qcalib::parse_encodings(&hostile_encodings(&model, variant), "fuzz");
    let Ok(session) = qexec::Session::new(model, qexec::SessionOptions::threads(1)) else {
        return "plan error";
    };
    let Some(feeds) = feeds else { return "no feed" };
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    match session.run(&feeds) {
        Ok(_) => "ran",
        Err(_) => "run error",
    }
}

/// A small deterministic input for graph input `v` (symbolic dims as 1), if its dtype is one the
/// made-up data covers and it has at most [`MAX_FEED`] elements.
fn made_up_feed(model: &Model, v: qgraph::ValueId) -> Option<(String, Tensor)> {
    let value = model.graph.value(v);
    let dims: Vec<usize> = value.shape.as_ref()?.0.iter().map(|d| d.known().unwrap_or(1)).collect();
    let n = qgraph::checked_numel(&dims).filter(|&n| n <= MAX_FEED)?;
    let t = match value.dtype? {
        DType::F32 => Tensor::from_vec(&dims, (0..n).map(|i| (i % 7) as f32 - 3.0).collect()),
        DType::I64 => Tensor::from_vec(&dims, (0..n).map(|i| (i % 3) as i64).collect()),
        DType::Bool => Tensor::from_vec(&dims, (0..n).map(|i| i % 2 == 0).collect()),
        _ => None,
    }?;
    Some((value.name.clone(), t))
}

/// An AIMET 1.0.0 encodings document for the model's first tensors with hostile bitwidths,
/// scales and offsets (0, negative, huge, a string, null), chosen by the bits of `variant`.
fn hostile_encodings(model: &Model, variant: u64) -> serde_json::Value {
    let odd = |k: u64| -> serde_json::Value {
        match k % 5 {
            0 => serde_json::json!(0.0),
            1 => serde_json::json!(-1.0),
            2 => serde_json::json!(1e300),
            3 => serde_json::json!("x"),
            _ => serde_json::json!(null),
        }
    };
    let entries: Vec<serde_json::Value> = model
        .graph
        .value_ids()
        .take(4)
        .enumerate()
        .map(|(i, v)| {
            let bits = variant >> (i * 8);
            let bw = [1, 64, 0, 8][(bits % 4) as usize];
            serde_json::json!({
                "name": model.graph.value(v).name, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": false,
                "bw": bw, "scale": [odd(bits >> 2)], "offset": [odd(bits >> 5)],
            })
        })
        .collect();
    serde_json::json!({"version": "1.0.0", "activation_encodings": entries, "param_encodings": []})
}
