//! A simulation's precision plan as onnxruntime's `TensorQuantOverrides` (the `extra_options`
//! entry of `quantize_static`), and such a plan read back.
//!
//! Written: every enabled integer quantizer as `{tensor: [{quant_type, scale, zero_point}]}` —
//! activations unsigned as AIMET exports them (`QUInt8`, `QUInt16`), weights signed when
//! symmetric; per-channel weights as one entry per channel, the first carrying `axis` — plus,
//! for a tensor the simulation converts, `convert: {quant_type, scale, zero_point, recv_nodes}`.
//! Quantization types are written by name (`"QUInt16"`); onnxruntime's Python API takes
//! `QuantType[name]`. Float (fp16/bf16) quantizers have no onnxruntime type and are left out.
//!
//! Read: `quant_type` sets the precision of the tensor's quantizer and enables it; a `convert`
//! entry asks for converts to be simulated. Scales and zero points are not read: calibration
//! computes the encodings.

use serde_json::{Map, Value, json};

use crate::error::{CalibError, Result};
use crate::placement::{Granularity, Precision, TensorRole};
use crate::sim::QuantSim;

/// onnxruntime's name of an integer type.
fn quant_type(bits: u32, signed: bool) -> Option<&'static str> {
    Some(match (bits, signed) {
        (4, true) => "QInt4",
        (4, false) => "QUInt4",
        (8, true) => "QInt8",
        (8, false) => "QUInt8",
        (16, true) => "QInt16",
        (16, false) => "QUInt16",
        _ => return None,
    })
}

fn parse_quant_type(name: &str) -> Option<(u32, bool)> {
    Some(match name {
        "QInt4" => (4, true),
        "QUInt4" => (4, false),
        "QInt8" => (8, true),
        "QUInt8" => (8, false),
        "QInt16" => (16, true),
        "QUInt16" => (16, false),
        _ => return None,
    })
}

fn plan_error(tensor: &str, detail: impl Into<String>) -> CalibError {
    CalibError::Quantizer { tensor: tensor.to_string(), detail: detail.into() }
}

/// The simulation's plan as onnxruntime's `TensorQuantOverrides` (see the module doc).
pub fn tensor_quant_overrides(sim: &QuantSim) -> Result<Value> {
    let g = &sim.model().graph;
    let placement = sim.placement();
    let converts = sim.converts()?;
    let mut out = Map::new();
    for t in placement.tensors() {
        let q = placement.quantizer(t.quantizer);
        let Precision::Int(bits) = q.precision else { continue };
        if !q.enabled {
            continue;
        }
        let name = g.value(t.value).name.clone();
        let encs = q.encodings.as_deref().ok_or_else(|| plan_error(&name, "enabled but not calibrated"))?;
        let is_param = matches!(t.role, TensorRole::Param { .. });
        // The same integer view the QDQ export writes.
        let (signed, zero_points) = crate::qdq::integer_view(q, encs, is_param);
        let Some(qtype) = quant_type(bits, signed) else {
            return Err(plan_error(&name, format!("int{bits} has no onnxruntime quantization type")));
        };
        let entries: Vec<Value> = match q.granularity {
            Granularity::PerTensor => {
                let mut e =
                    json!({"quant_type": qtype, "scale": encs[0].delta, "zero_point": zero_points[0]});
                if let Some(c) = converts.iter().find(|c| c.tensor == t.value) {
                    let to = quant_type(c.to.bits(), false).ok_or_else(|| {
                        plan_error(&name, format!("convert to {} has no onnxruntime type", c.to))
                    })?;
                    let readers: Vec<&str> = c.readers.iter().map(|&r| g.node(r).name.as_str()).collect();
                    e["convert"] = json!({
                        "quant_type": to,
                        "scale": c.encoding.delta,
                        "zero_point": (-c.encoding.offset) as i64,
                        "recv_nodes": readers,
                    });
                }
                vec![e]
            }
            Granularity::PerChannel { axis } => encs
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut entry =
                        json!({"quant_type": qtype, "scale": e.delta, "zero_point": zero_points[i]});
                    if i == 0 {
                        entry["axis"] = json!(axis);
                    }
                    entry
                })
                .collect(),
            Granularity::PerBlock { .. } => {
                return Err(plan_error(&name, "blockwise quantizers have no TensorQuantOverrides form"));
            }
        };
        out.insert(name, Value::Array(entries));
    }
    Ok(Value::Object(out))
}

/// What [`apply_tensor_quant_overrides`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppliedPlan {
    /// Tensors whose quantizer got a precision from the plan.
    pub tensors: usize,
    /// Whether the plan has converts (the caller simulates them): `convert` entries of
    /// onnxruntime's overrides, or integer activations at more than one precision in a Quark
    /// config (Quark inserts the converts at those boundaries).
    pub converts: bool,
    /// Tensors the plan sets that carry no quantizer here (ops the quantsim config leaves
    /// unquantized); Quark's layer configs reach them, onnxruntime's overrides never do.
    pub ignored: usize,
}

/// Sets the precisions of `overrides` (onnxruntime's `TensorQuantOverrides`, types by name) on
/// the simulation's quantizers. Tensors the model lacks or that carry no quantizer are refused,
/// named; precisions take effect at the next calibration.
pub fn apply_tensor_quant_overrides(sim: &mut QuantSim, overrides: &Value) -> Result<AppliedPlan> {
    let map = overrides.as_object().ok_or_else(|| plan_error("(plan)", "expected an object of tensors"))?;
    let mut applied = AppliedPlan::default();
    let mut changes = Vec::with_capacity(map.len());
    for (name, entries) in map {
        let first = entries
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_object)
            .ok_or_else(|| plan_error(name, "expected a list of override objects"))?;
        let v = sim
            .model()
            .graph
            .value_id(name)
            .ok_or_else(|| plan_error(name, "no such tensor in the model"))?;
        let q = sim
            .placement()
            .quantizer_of(v)
            .ok_or_else(|| plan_error(name, "the tensor carries no quantizer"))?;
        if let Some(t) = first.get("quant_type") {
            let (bits, _) = t
                .as_str()
                .and_then(parse_quant_type)
                .ok_or_else(|| plan_error(name, format!("quant_type {t}: expected QInt4..QUInt16")))?;
            changes.push((q, Precision::Int(bits)));
        }
        applied.converts |= first.contains_key("convert");
    }
    for (q, p) in changes {
        let quantizer = sim.placement_mut().quantizer_mut(q);
        quantizer.enabled = true;
        quantizer.set_precision(p);
        applied.tensors += 1;
    }
    sim.apply_exception_rules()?;
    Ok(applied)
}
