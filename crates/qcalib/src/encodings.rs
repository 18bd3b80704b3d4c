//! AIMET encodings files (spec §4): writing versions 1.0.0 (AIMET's default), 0.6.1 and 2.0.0
//! from a calibrated simulation, and reading any of them back into one.
//!
//! Scales are written as the f64 the simulation uses, so a file read back reproduces the
//! simulation bit for bit, and the QDQ export stores the same values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use qgraph::{Graph, ValueId};
use qkernels::Encoding;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::{CalibError, Result};
use crate::placement::{Granularity, Precision, Quantizer, TensorRole};
use crate::sim::QuantSim;

/// Versions of the encodings format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodingVersion {
    /// Legacy dictionaries keyed by tensor name.
    V0_6_1,
    /// Lists with scale/offset per entry (AIMET's default).
    #[default]
    V1_0_0,
    /// ONNX-style `y_scale`/`y_zero_point`, with int32 bias entries.
    V2_0_0,
}

impl EncodingVersion {
    /// Parses `0.6.1`, `1.0.0` or `2.0.0`.
    pub fn parse(s: &str) -> Option<EncodingVersion> {
        match s {
            "0.6.1" => Some(EncodingVersion::V0_6_1),
            "1.0.0" => Some(EncodingVersion::V1_0_0),
            "2.0.0" => Some(EncodingVersion::V2_0_0),
            _ => None,
        }
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            EncodingVersion::V0_6_1 => "0.6.1",
            EncodingVersion::V1_0_0 => "1.0.0",
            EncodingVersion::V2_0_0 => "2.0.0",
        }
    }
}

fn producer() -> Value {
    json!({"package": "quantkit", "version": env!("CARGO_PKG_VERSION")})
}

/// `offset_affine` of spec §1.4: the TfEncoding offset shifted by `2^(b−1)` for symmetric grids.
fn affine_offset(q: &Quantizer, e: &Encoding) -> f64 {
    if q.symmetric { e.offset + 2f64.powi(e.bitwidth as i32 - 1) } else { e.offset }
}

fn enc_type(g: Granularity) -> &'static str {
    match g {
        Granularity::PerTensor => "PER_TENSOR",
        Granularity::PerChannel { .. } => "PER_CHANNEL",
        Granularity::PerBlock { .. } => "PER_BLOCK",
    }
}

/// One exported tensor: its name, whether it is a param, and its quantizer.
struct Exported<'a> {
    name: &'a str,
    is_param: bool,
    quantizer: &'a Quantizer,
    /// The tensor's shape, where known (per-block encodings are laid out by it).
    shape: Option<Vec<usize>>,
}

fn exported(sim: &QuantSim) -> Vec<Exported<'_>> {
    let g = &sim.model().graph;
    let p = sim.placement();
    p.tensors()
        .iter()
        .filter_map(|t| {
            let q = p.quantizer(t.quantizer);
            let ready = q.enabled && (!q.precision.is_int() || q.encodings.is_some());
            ready.then(|| Exported {
                name: &g.value(t.value).name,
                is_param: matches!(t.role, TensorRole::Param { .. }),
                quantizer: q,
                shape: g
                    .static_shape(t.value)
                    .map(<[usize]>::to_vec)
                    .or_else(|| g.value(t.value).shape.as_ref().and_then(|s| s.to_known())),
            })
        })
        .collect()
}

fn entry_1_0_0(e: &Exported<'_>) -> Value {
    let (name, q) = (e.name, e.quantizer);
    let Some(encs) = q.encodings.as_deref().filter(|_| q.precision.is_int()) else {
        return json!({"name": name, "dtype": "FLOAT", "bw": q.precision.bits(), "enc_type": "PER_TENSOR"});
    };
    if let Some(entry) = lpbq_entry(e, encs, EncodingVersion::V1_0_0) {
        return entry;
    }
    let order = channel_major_block_order(q.granularity, e.shape.as_deref(), encs.len());
    let ordered = |f: fn(&Encoding) -> f64| -> Vec<f64> {
        match &order {
            Some(order) => order.iter().map(|&i| f(&encs[i])).collect(),
            None => encs.iter().map(f).collect(),
        }
    };
    let mut entry = json!({
        "name": name,
        "dtype": "INT",
        "bw": q.precision.bits(),
        "is_sym": q.symmetric,
        "enc_type": enc_type(q.granularity),
        "scale": ordered(|e| e.delta),
        "offset": ordered(|e| e.offset),
    });
    if let Granularity::PerBlock { block_size, .. } = q.granularity {
        entry["block_size"] = json!(block_size);
    }
    entry
}

/// AIMET's 1.0.0 order of per-block encodings on a 2-D weight whose channels run along axis 1
/// (MatMul and Gemm `[in, out]`): channel by channel, where the encoding shape `[blocks,
/// channels]` runs block by block. The index of each encoding in that order; `None` when the
/// order is the encoding shape's own.
fn channel_major_block_order(g: Granularity, shape: Option<&[usize]>, count: usize) -> Option<Vec<usize>> {
    let Granularity::PerBlock { channel_axis: 1, block_axis: 0, block_size } = g else { return None };
    let [rows, channels] = *shape? else { return None };
    let blocks = rows.checked_div(block_size)?;
    (blocks * channels == count)
        .then(|| (0..channels).flat_map(|c| (0..blocks).map(move |b| b * channels + c)).collect())
}

/// An LPBQ weight's entry (AIMET's layouts): per-channel float scales and per-block integer
/// scales, in 1.0.0 listed channel by channel, in 2.0.0 nested in the encoding shape; `None` for
/// other quantizers.
fn lpbq_entry(e: &Exported<'_>, encs: &[Encoding], version: EncodingVersion) -> Option<Value> {
    let q = e.quantizer;
    let (Some(decompressed), Granularity::PerBlock { channel_axis, block_axis, block_size }) =
        (q.lpbq, q.granularity)
    else {
        return None;
    };
    let enc_shape =
        crate::lpbq::block_encoding_shape(e.shape.as_deref()?, channel_axis, block_axis, block_size);
    if enc_shape.iter().product::<usize>() != encs.len() {
        return None;
    }
    let bits = q.precision.bits();
    let s = crate::lpbq::lpbq_scales(encs, &enc_shape, channel_axis, decompressed.saturating_sub(bits));
    let ints: Vec<Value> = s.per_block.iter().map(|&k| json!(k)).collect();
    Some(match version {
        EncodingVersion::V2_0_0 => {
            let mut channel_shape = enc_shape.clone();
            channel_shape[block_axis] = 1;
            let floats: Vec<Value> = s.per_channel.iter().map(|&x| json!(x)).collect();
            json!({
                "name": e.name,
                "output_dtype": format!("int{bits}"),
                "per_channel_float_scale": nested(&floats, &channel_shape),
                "per_block_int_scale": nested(&ints, &enc_shape),
                "axis": block_axis,
                "block_size": block_size,
            })
        }
        _ => {
            let order = channel_major_block_order(q.granularity, e.shape.as_deref(), encs.len());
            let ints = match order {
                Some(order) => order.iter().map(|&i| ints[i].clone()).collect(),
                None => ints,
            };
            json!({
                "name": e.name,
                "dtype": "INT",
                "enc_type": "LPBQ",
                "bw": decompressed,
                "compressed_bw": bits,
                "is_sym": true,
                "block_size": block_size,
                "scale": s.per_channel,
                "offset": vec![-(1i64 << (decompressed.clamp(1, 32) - 1)); s.per_channel.len()],
                "per_block_int_scale": ints,
            })
        }
    })
}

/// `values` (row-major) nested as a JSON array of `shape`.
fn nested(values: &[Value], shape: &[usize]) -> Value {
    match shape.split_first() {
        None => values.first().cloned().unwrap_or(Value::Null),
        Some((_, [])) => Value::Array(values.to_vec()),
        Some((&n, rest)) => {
            let per = values.len() / n.max(1);
            Value::Array(values.chunks(per.max(1)).map(|c| nested(c, rest)).collect())
        }
    }
}

fn entries_0_6_1(q: &Quantizer) -> Value {
    let Some(encs) = q.encodings.as_deref().filter(|_| q.precision.is_int()) else {
        return json!([{"bitwidth": q.precision.bits(), "dtype": "float"}]);
    };
    Value::Array(
        encs.iter()
            .map(|e| {
                json!({
                    "bitwidth": e.bitwidth,
                    "dtype": "int",
                    "is_symmetric": if q.symmetric { "True" } else { "False" },
                    "min": e.min,
                    "max": e.max,
                    "offset": e.offset,
                    "scale": e.delta,
                })
            })
            .collect(),
    )
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 { json!(x as i64) } else { json!(x) }
}

/// A 2.0.0 entry from scales, zero points, dtype and axis.
fn entry_2_0_0(name: &str, dtype: String, scales: &[f64], zero_points: &[f64], axis: Option<usize>) -> Value {
    let mut e = json!({"name": name, "output_dtype": dtype});
    match axis {
        Some(a) => {
            e["y_scale"] = json!(scales);
            e["axis"] = json!(a);
            if zero_points.iter().any(|&z| z != 0.0) {
                e["y_zero_point"] = Value::Array(zero_points.iter().map(|&z| number(z)).collect());
            }
        }
        None => {
            e["y_scale"] = json!(scales[0]);
            if zero_points[0] != 0.0 {
                e["y_zero_point"] = number(zero_points[0]);
            }
        }
    }
    e
}

fn int_entry_2_0_0(
    name: &str,
    q: &Quantizer,
    encs: &[Encoding],
    force_unsigned: bool,
    shape: Option<&[usize]>,
) -> Value {
    let bits = q.precision.bits();
    let mut unsigned = !q.symmetric;
    let mut zero_points: Vec<f64> = encs.iter().map(|e| -affine_offset(q, e)).collect();
    if force_unsigned && !unsigned {
        unsigned = true;
        zero_points.iter_mut().for_each(|z| *z += 2f64.powi(bits as i32 - 1));
    }
    let dtype = format!("{}int{bits}", if unsigned { "u" } else { "" });
    let scales: Vec<f64> = encs.iter().map(|e| e.delta).collect();
    let axis = match q.granularity {
        Granularity::PerTensor => None,
        Granularity::PerChannel { axis } => Some(axis),
        Granularity::PerBlock { block_axis, .. } => Some(block_axis),
    };
    let mut e = entry_2_0_0(name, dtype, &scales, &zero_points, axis);
    if let Granularity::PerBlock { channel_axis, block_axis, block_size } = q.granularity {
        e["block_size"] = json!(block_size);
        let enc_shape =
            shape.map(|s| crate::lpbq::block_encoding_shape(s, channel_axis, block_axis, block_size));
        if let Some(enc_shape) = enc_shape.filter(|s| s.iter().product::<usize>() == scales.len()) {
            e["y_scale"] = nested(&scales.iter().map(|&x| json!(x)).collect::<Vec<_>>(), &enc_shape);
            if let Some(z) = e.get("y_zero_point").and_then(Value::as_array).cloned() {
                e["y_zero_point"] = nested(&z, &enc_shape);
            }
        }
    }
    e
}

/// An int32 bias encoding (spec §3.8): `scale = input scale × weight scale`, per channel when the
/// weight is.
pub(crate) struct Int32Bias {
    /// The bias tensor.
    pub bias: ValueId,
    /// One scale per channel (or one).
    pub scales: Vec<f64>,
    /// Whether the scales are per channel (axis 0).
    pub per_channel: bool,
}

/// Int32 encodings for the unquantized biases of Conv/ConvTranspose/Gemm whose input and weight
/// quantizers are calibrated integers.
pub(crate) fn int32_biases(sim: &QuantSim) -> Vec<Int32Bias> {
    let g = &sim.model().graph;
    let p = sim.placement();
    let mut out: Vec<Int32Bias> = Vec::new();
    for (_, n) in g.nodes() {
        if !["Conv", "ConvTranspose", "Gemm"].contains(&n.op_type.as_str()) {
            continue;
        }
        let Some(bias) = n.input(2).and_then(|b| g.static_root(b)).map(|(r, _)| r) else { continue };
        if out.iter().any(|b| b.bias == bias) || p.is_enabled(bias) {
            continue;
        }
        let Some((xq, _)) = n.input(0).and_then(|x| p.effective_quantizer(g, x)) else { continue };
        let Some(w) = n.input(1).and_then(|w| g.static_root(w)).map(|(r, _)| r) else { continue };
        let (xq, Some(wq)) = (p.quantizer(xq), p.quantizer_of(w).map(|q| p.quantizer(q))) else { continue };
        if !xq.enabled || !wq.enabled || !xq.precision.is_int() || !wq.precision.is_int() {
            continue;
        }
        let (Some(xe), Some(we)) = (xq.encodings.as_deref(), wq.encodings.as_deref()) else { continue };
        out.push(Int32Bias {
            bias,
            scales: we.iter().map(|e| xe[0].delta * e.delta).collect(),
            per_channel: matches!(wq.granularity, Granularity::PerChannel { .. }),
        });
    }
    out
}

/// Ops through which export copies a neighbour's per-tensor encoding (spec §8.6).
fn propagates(op: &str) -> bool {
    crate::placement::GRID_PRESERVING_OPS.contains(&op)
        || ["Concat", "Scatter", "ScatterElements", "ScatterND", "Clip", "Max", "Min", "Pad", "Where"]
            .contains(&op)
}

/// Spec §8.6: outputs of data-movement ops without an encoding take their input's per-tensor
/// encoding (when all float inputs agree), then inputs without one take their output's (when the
/// input has a single consumer).
fn derived_entries(g: &Graph, entries: &mut BTreeMap<String, Value>) {
    let per_tensor = |e: &Value| e.get("axis").is_none() && e["output_dtype"] != "int32";
    for (_, n) in g.nodes() {
        if !propagates(&n.op_type) {
            continue;
        }
        let Some(out) = n.output(0) else { continue };
        let out_name = &g.value(out).name;
        if entries.contains_key(out_name) {
            continue;
        }
        let floats: Vec<ValueId> = n
            .inputs()
            .iter()
            .flatten()
            .copied()
            .filter(|&v| g.value(v).dtype.is_none_or(|d| d.is_float()))
            .collect();
        let Some(&first) = floats.first() else { continue };
        let Some(e) = entries.get(&g.value(first).name).filter(|e| per_tensor(e)) else { continue };
        let strip = |e: &Value| {
            let mut e = e.clone();
            e.as_object_mut().map(|o| o.remove("name"));
            e
        };
        let all_same =
            floats.iter().all(|v| entries.get(&g.value(*v).name).is_some_and(|o| strip(o) == strip(e)));
        if all_same || n.op_type == "Pad" {
            let mut copy = e.clone();
            copy["name"] = json!(out_name);
            entries.insert(out_name.clone(), copy);
        }
    }
    let nodes: Vec<_> = g.nodes().collect();
    for (_, n) in nodes.into_iter().rev() {
        if !propagates(&n.op_type) {
            continue;
        }
        let Some(out) = n.output(0) else { continue };
        let Some(e) = entries.get(&g.value(out).name).filter(|e| per_tensor(e)).cloned() else { continue };
        for &input in n.inputs().iter().flatten() {
            let v = g.value(input);
            if entries.contains_key(&v.name)
                || g.use_count(input) != 1
                || g.is_static(input)
                || !v.dtype.is_none_or(|d| d.is_float())
            {
                continue;
            }
            let mut copy = e.clone();
            copy["name"] = json!(v.name);
            entries.insert(v.name.clone(), copy);
        }
    }
}

/// The encodings of a calibrated simulation as a JSON document of the given version.
pub fn encodings_json(sim: &QuantSim, version: EncodingVersion) -> Value {
    let list = exported(sim);
    match version {
        EncodingVersion::V1_0_0 => {
            let (params, acts): (Vec<_>, Vec<_>) = list.iter().partition(|e| e.is_param);
            json!({
                "version": "1.0.0",
                "producer": producer(),
                "quantizer_args": quantizer_args(sim),
                "activation_encodings": acts.iter().map(|e| entry_1_0_0(e)).collect::<Vec<_>>(),
                "param_encodings": params.iter().map(|e| entry_1_0_0(e)).collect::<Vec<_>>(),
            })
        }
        EncodingVersion::V0_6_1 => {
            let mut acts = Map::new();
            let mut params = Map::new();
            for e in &list {
                let target = if e.is_param { &mut params } else { &mut acts };
                target.insert(e.name.to_string(), entries_0_6_1(e.quantizer));
            }
            json!({
                "version": "0.6.1",
                "producer": producer(),
                "quantizer_args": quantizer_args(sim),
                "activation_encodings": acts,
                "param_encodings": params,
            })
        }
        EncodingVersion::V2_0_0 => {
            let g = &sim.model().graph;
            let mut entries = BTreeMap::new();
            for e in &list {
                let Some(encs) = e.quantizer.encodings.as_deref().filter(|_| e.quantizer.precision.is_int())
                else {
                    continue;
                };
                let entry = lpbq_entry(e, encs, EncodingVersion::V2_0_0).unwrap_or_else(|| {
                    int_entry_2_0_0(e.name, e.quantizer, encs, !e.is_param, e.shape.as_deref())
                });
                entries.insert(e.name.to_string(), entry);
            }
            for b in int32_biases(sim) {
                let name = &g.value(b.bias).name;
                let zeros = vec![0.0; b.scales.len()];
                let entry = entry_2_0_0(name, "int32".into(), &b.scales, &zeros, b.per_channel.then_some(0));
                entries.insert(name.clone(), entry);
            }
            derived_entries(g, &mut entries);
            let mut ordered: Vec<Value> = Vec::with_capacity(entries.len());
            let mut seen = std::collections::HashSet::new();
            for e in &list {
                if let Some(x) = entries.get(e.name) {
                    seen.insert(e.name.to_string());
                    ordered.push(x.clone());
                }
            }
            ordered.extend(entries.into_iter().filter(|(k, _)| !seen.contains(k)).map(|(_, v)| v));
            json!({"version": "2.0.0", "producer": producer(), "encodings": ordered})
        }
    }
}

fn quantizer_args(sim: &QuantSim) -> Value {
    let o = sim.options();
    let c = sim.config();
    json!({
        "activation_bitwidth": o.precision.activation.bits(),
        "param_bitwidth": o.precision.param.bits(),
        "dtype": if o.precision.param.is_int() { "int" } else { "float" },
        "is_symmetric": c.defaults.params_symmetric.unwrap_or(c.any_per_channel()),
        "per_channel_quantization": c.any_per_channel(),
        "quant_scheme": o.scheme.aimet_name(),
    })
}

/// Serialises JSON the way AIMET writes it: keys sorted, four-space indent.
pub fn to_pretty_json(v: &Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).expect("serialising a JSON value cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Writes the encodings file atomically.
pub fn write_encodings(sim: &QuantSim, version: EncodingVersion, path: &Path) -> Result<()> {
    let text = to_pretty_json(&encodings_json(sim, version));
    qgraph::write_atomically(path, text.as_bytes()).map_err(CalibError::from)
}

/// One tensor's encodings as read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedEncoding {
    /// Precision (`Int(bw)` or a float cast).
    pub precision: Precision,
    /// Symmetric grid.
    pub symmetric: bool,
    /// Encodings (empty for float casts).
    pub encodings: Vec<Encoding>,
    /// Per-block encodings listed channel by channel (AIMET's 1.0.0 order for a 2-D weight whose
    /// channels run along axis 1); loading puts them back in the encoding shape's order.
    pub channel_major_blocks: bool,
}

fn encodings_error(path: &str, detail: impl Into<String>) -> CalibError {
    CalibError::Encodings { path: path.into(), detail: detail.into() }
}

fn floats(v: &Value, what: &str, origin: &str) -> Result<Vec<f64>> {
    match v {
        // Nested lists (2.0.0's per-block scales) are read in row-major order.
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for x in a {
                match x {
                    Value::Array(_) => out.extend(floats(x, what, origin)?),
                    x => out
                        .push(x.as_f64().ok_or_else(|| {
                            encodings_error(origin, format!("{what}: {x} is not a number"))
                        })?),
                }
            }
            Ok(out)
        }
        Value::Number(n) => Ok(vec![n.as_f64().unwrap_or(f64::NAN)]),
        Value::Null => Ok(Vec::new()),
        other => Err(encodings_error(origin, format!("{what}: expected numbers, found {other}"))),
    }
}

/// The shape of a nested JSON array (its first elements followed down).
fn nested_shape(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut at = v;
    while let Value::Array(a) = at {
        shape.push(a.len());
        let Some(first) = a.first() else { break };
        at = first;
    }
    shape
}

/// 2.0.0 LPBQ: each block's scale (row-major in the shape of `ints`), its integer times the
/// float scale of its channel (`channel_scales`, the same shape with the block `axis` of size 1).
fn lpbq_block_scales(
    ints: &Value,
    channel_scales: &Value,
    axis: &Value,
    name: &str,
    origin: &str,
) -> Result<Vec<f64>> {
    let bad = |detail: String| encodings_error(origin, format!("'{name}': {detail}"));
    let shape = nested_shape(ints);
    let flat_ints = floats(ints, name, origin)?;
    let flat_scales = floats(channel_scales, name, origin)?;
    let axis = axis
        .as_u64()
        .map(|a| a as usize)
        .filter(|&a| a < shape.len())
        .ok_or_else(|| bad("no block axis".into()))?;
    if shape.iter().product::<usize>() != flat_ints.len() {
        return Err(bad("per_block_int_scale is not a regular array".into()));
    }
    let mut channel_shape = shape.clone();
    channel_shape[axis] = 1;
    if channel_shape.iter().product::<usize>() != flat_scales.len() {
        return Err(bad(format!("{} channel scales for block scales of shape {shape:?}", flat_scales.len())));
    }
    let mut out = Vec::with_capacity(flat_ints.len());
    for (i, &k) in flat_ints.iter().enumerate() {
        // Row-major coordinates of `i`, with the block axis dropped.
        let (mut rest, mut c, mut stride) = (i, 0usize, 1usize);
        for d in (0..shape.len()).rev() {
            let coord = rest % shape[d].max(1);
            rest /= shape[d].max(1);
            if d != axis {
                c += coord * stride;
                stride *= channel_shape[d];
            }
        }
        out.push(k * flat_scales[c]);
    }
    Ok(out)
}

fn grid(delta: f64, offset: f64, bw: u32, symmetric: bool, name: &str, origin: &str) -> Result<Encoding> {
    if !(delta.is_finite() && delta > 0.0) {
        return Err(encodings_error(origin, format!("'{name}': scale {delta} is not a positive number")));
    }
    let n = 2f64.powi(bw as i32) - 1.0;
    if !(offset.is_finite() && offset.fract() == 0.0 && offset.abs() <= n + 1.0) {
        return Err(encodings_error(
            origin,
            format!("'{name}': offset {offset} is not an integer of a {bw}-bit grid"),
        ));
    }
    // A symmetric grid whose offset is one above −2^(b−1) is strict: one step fewer.
    let strict = symmetric && offset == -(2f64.powi(bw as i32 - 1)) + 1.0;
    Ok(Encoding::from_scale_offset(delta, offset, bw, if strict { n - 1.0 } else { n }))
}

/// A bitwidth of an encodings file: 2 to 16 bits, or 32 (int32 bias entries).
fn bitwidth(bw: Option<u64>, name: &str, origin: &str) -> Result<u32> {
    match bw {
        Some(b @ (2..=16 | 32)) => Ok(b as u32),
        Some(b) => Err(encodings_error(origin, format!("'{name}': bitwidth {b} (2 to 16, or 32)"))),
        None => Err(encodings_error(origin, format!("'{name}': no bw"))),
    }
}

/// Parses an encodings document of any version into per-tensor entries.
pub fn parse_encodings(doc: &Value, origin: &str) -> Result<HashMap<String, LoadedEncoding>> {
    let version = doc.get("version").and_then(Value::as_str).unwrap_or("0.6.1");
    let mut out = HashMap::new();
    match version {
        "1.0.0" => {
            for section in ["activation_encodings", "param_encodings"] {
                let Some(list) = doc.get(section).and_then(Value::as_array) else {
                    return Err(encodings_error(origin, format!("missing list '{section}'")));
                };
                for e in list {
                    let name =
                        e["name"].as_str().ok_or_else(|| encodings_error(origin, "an entry has no name"))?;
                    let bw = bitwidth(e["bw"].as_u64(), name, origin)?;
                    if e["dtype"] == "FLOAT" {
                        let precision = if bw == 16 { Precision::Float16 } else { Precision::BFloat16 };
                        out.insert(
                            name.into(),
                            LoadedEncoding {
                                precision,
                                symmetric: false,
                                encodings: vec![],
                                channel_major_blocks: false,
                            },
                        );
                        continue;
                    }
                    let symmetric = e["is_sym"].as_bool().unwrap_or(false);
                    if e["enc_type"] == "LPBQ" {
                        // Channel by channel: each block's scale is its integer times its
                        // channel's float scale, on a symmetric grid of the compressed width.
                        let bw = bitwidth(e["compressed_bw"].as_u64(), name, origin)?;
                        let channel_scales = floats(&e["scale"], name, origin)?;
                        let ints = floats(&e["per_block_int_scale"], name, origin)?;
                        let per = ints.len().checked_div(channel_scales.len()).unwrap_or(0);
                        if per == 0 || per * channel_scales.len() != ints.len() {
                            return Err(encodings_error(
                                origin,
                                format!(
                                    "'{name}': {} block scales for {} channels",
                                    ints.len(),
                                    channel_scales.len()
                                ),
                            ));
                        }
                        let offset = -2f64.powi(bw as i32 - 1);
                        let encodings = ints
                            .iter()
                            .enumerate()
                            .map(|(i, &k)| grid(k * channel_scales[i / per], offset, bw, true, name, origin))
                            .collect::<Result<Vec<_>>>()?;
                        out.insert(
                            name.into(),
                            LoadedEncoding {
                                precision: Precision::Int(bw),
                                symmetric: true,
                                encodings,
                                channel_major_blocks: true,
                            },
                        );
                        continue;
                    }
                    let scales = floats(&e["scale"], name, origin)?;
                    let offsets = floats(&e["offset"], name, origin)?;
                    if scales.is_empty() || scales.len() != offsets.len() {
                        return Err(encodings_error(
                            origin,
                            format!("'{name}': scale and offset lists differ"),
                        ));
                    }
                    let encodings = scales
                        .iter()
                        .zip(&offsets)
                        .map(|(&s, &o)| grid(s, o, bw, symmetric, name, origin))
                        .collect::<Result<Vec<_>>>()?;
                    let channel_major_blocks = e["enc_type"] == "PER_BLOCK";
                    out.insert(
                        name.into(),
                        LoadedEncoding {
                            precision: Precision::Int(bw),
                            symmetric,
                            encodings,
                            channel_major_blocks,
                        },
                    );
                }
            }
        }
        "0.6.1" => {
            for section in ["activation_encodings", "param_encodings"] {
                let Some(map) = doc.get(section).and_then(Value::as_object) else {
                    return Err(encodings_error(origin, format!("missing dictionary '{section}'")));
                };
                for (name, list) in map {
                    let list = list
                        .as_array()
                        .ok_or_else(|| encodings_error(origin, format!("'{name}': not a list")))?;
                    let Some(first) = list.first() else { continue };
                    let bw = bitwidth(Some(first["bitwidth"].as_u64().unwrap_or(8)), name, origin)?;
                    if first["dtype"] == "float" {
                        let precision = if bw == 16 { Precision::Float16 } else { Precision::BFloat16 };
                        out.insert(
                            name.clone(),
                            LoadedEncoding {
                                precision,
                                symmetric: false,
                                encodings: vec![],
                                channel_major_blocks: false,
                            },
                        );
                        continue;
                    }
                    let symmetric = first["is_symmetric"] == "True";
                    let mut encodings = Vec::new();
                    for e in list {
                        let (Some(s), Some(o)) = (e["scale"].as_f64(), e["offset"].as_f64()) else {
                            return Err(encodings_error(
                                origin,
                                format!("'{name}': entry without scale/offset"),
                            ));
                        };
                        encodings.push(grid(s, o, bw, symmetric, name, origin)?);
                    }
                    out.insert(
                        name.clone(),
                        LoadedEncoding {
                            precision: Precision::Int(bw),
                            symmetric,
                            encodings,
                            channel_major_blocks: false,
                        },
                    );
                }
            }
        }
        "2.0.0" => {
            let Some(list) = doc.get("encodings").and_then(Value::as_array) else {
                return Err(encodings_error(origin, "missing list 'encodings'"));
            };
            for e in list {
                let name =
                    e["name"].as_str().ok_or_else(|| encodings_error(origin, "an entry has no name"))?;
                let dtype = e["output_dtype"].as_str().unwrap_or("");
                let (unsigned, bits) = match dtype.strip_prefix('u') {
                    Some(rest) => (true, rest.strip_prefix("int")),
                    None => (false, dtype.strip_prefix("int")),
                };
                let bw = bitwidth(bits.and_then(|b| b.parse().ok()), name, origin)?;
                let scales = match e.get("per_block_int_scale") {
                    Some(ints) => {
                        lpbq_block_scales(ints, &e["per_channel_float_scale"], &e["axis"], name, origin)?
                    }
                    None => floats(&e["y_scale"], name, origin)?,
                };
                let mut zps = floats(&e["y_zero_point"], name, origin)?;
                if zps.is_empty() {
                    zps = vec![0.0; scales.len()];
                }
                if zps.len() == 1 && scales.len() > 1 {
                    zps = vec![zps[0]; scales.len()];
                }
                let half = 2f64.powi(bw as i32 - 1);
                // Unsigned with the zero point at mid-grid, or signed: a symmetric grid.
                let symmetric = if unsigned { zps.iter().all(|&z| z == half) } else { true };
                let encodings = scales
                    .iter()
                    .zip(&zps)
                    .map(|(&s, &z)| {
                        let offset = if unsigned { -z } else { -z - half };
                        grid(s, offset, bw, symmetric, name, origin)
                    })
                    .collect::<Result<Vec<_>>>()?;
                out.insert(
                    name.into(),
                    LoadedEncoding {
                        precision: Precision::Int(bw),
                        symmetric,
                        encodings,
                        channel_major_blocks: false,
                    },
                );
            }
        }
        other => return Err(encodings_error(origin, format!("unsupported version '{other}'"))),
    }
    Ok(out)
}

/// Reads an encodings file.
pub fn read_encodings(path: &Path) -> Result<HashMap<String, LoadedEncoding>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CalibError::Io { path: path.to_path_buf(), source })?;
    let origin = path.display().to_string();
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| encodings_error(&origin, format!("not valid JSON: {e}")))?;
    parse_encodings(&doc, &origin)
}

/// How [`load_encodings`] treats the simulation's quantizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Freeze loaded encodings so calibration keeps them.
    pub freeze: bool,
    /// Leave quantizers without an entry as they are (default: disable them).
    pub keep_missing: bool,
}

/// Hands over the encodings a post-training technique learned for the tensors named in
/// `frozen`: each quantizer at the precision they were learned for is frozen to them (calibration
/// then keeps them), and any quantizer is frozen to them again whenever a precision change brings
/// it back to that precision (see [`crate::Quantizer::learn`]). Returns how many quantizers were
/// given learned encodings.
pub fn freeze_encodings(sim: &mut QuantSim, frozen: &HashMap<String, LoadedEncoding>) -> usize {
    let ids: Vec<(crate::QuantizerId, &LoadedEncoding)> = sim
        .placement()
        .tensors()
        .iter()
        .filter_map(|t| Some((t.quantizer, frozen.get(&sim.model().graph.value(t.value).name)?)))
        .collect();
    let placement = sim.placement_mut();
    for &(q, l) in &ids {
        placement.quantizer_mut(q).learn(crate::LearnedEncodings {
            precision: l.precision,
            symmetric: l.symmetric,
            encodings: l.encodings.clone(),
        });
    }
    ids.len()
}

/// Loads encodings into a simulation: precision, symmetry and encodings per tensor; int32 bias
/// entries of quantizers that are disabled stay unused. Returns the number of tensors loaded.
pub fn load_encodings(
    sim: &mut QuantSim,
    loaded: &HashMap<String, LoadedEncoding>,
    options: LoadOptions,
) -> Result<usize> {
    let g = &sim.model().graph;
    let names: Vec<(ValueId, String, Option<Vec<usize>>)> = sim
        .placement()
        .tensors()
        .iter()
        .map(|t| (t.value, g.value(t.value).name.clone(), g.static_shape(t.value).map(<[usize]>::to_vec)))
        .collect();
    let mut count = 0;
    let placement = sim.placement_mut();
    for (v, name, shape) in names {
        let Some(q) = placement.quantizer_of(v) else { continue };
        let quantizer = placement.quantizer_mut(q);
        match loaded.get(&name) {
            Some(l) if l.precision == Precision::Int(32) && !quantizer.enabled => {}
            Some(l) => {
                let expected = match quantizer.granularity {
                    Granularity::PerTensor => 1,
                    _ => l.encodings.len(),
                };
                if l.precision.is_int() && l.encodings.len() != expected {
                    return Err(CalibError::Encodings {
                        path: name,
                        detail: format!("{} encodings for a per-tensor quantizer", l.encodings.len()),
                    });
                }
                quantizer.enabled = true;
                quantizer.precision = l.precision;
                quantizer.symmetric = l.symmetric;
                if let Some(e) = l.encodings.first() {
                    quantizer.strict = l.symmetric && e.steps < 2f64.powi(e.bitwidth as i32) - 1.0;
                    if quantizer.granularity == Granularity::PerTensor && l.encodings.len() > 1 {
                        quantizer.granularity = Granularity::PerChannel { axis: 0 };
                    }
                }
                let mut encodings = l.encodings.clone();
                let order = l
                    .channel_major_blocks
                    .then(|| {
                        channel_major_block_order(quantizer.granularity, shape.as_deref(), encodings.len())
                    })
                    .flatten();
                if let Some(order) = order {
                    for (e, &i) in l.encodings.iter().zip(&order) {
                        encodings[i] = *e;
                    }
                }
                quantizer.encodings = (!encodings.is_empty()).then_some(encodings);
                quantizer.frozen = options.freeze;
                count += 1;
            }
            None if !options.keep_missing => quantizer.enabled = false,
            None => {}
        }
    }
    sim.refresh()?;
    Ok(count)
}
