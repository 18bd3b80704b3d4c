//! QDQ ONNX export (spec §4.6): the calibrated simulation as a standard ONNX model any runtime
//! executes. Weights are stored as their fake-quantized values, as AIMET stores them (or, on
//! request, as integers read through `DequantizeLinear`); every other enabled integer quantizer
//! becomes `QuantizeLinear → DequantizeLinear` right after its tensor, with the same scales the encodings file holds (per
//! channel with `axis`); fp16/bf16 quantizers become a pair of `Cast`s. Activations use unsigned
//! integer types, as AIMET exports them. Where the simulation converts a tensor for some readers
//! (`SimOptions::converts`), a second pair after the first feeds those readers. The opset is raised when the Q/DQ types need it (13 for
//! per-channel, 21 for 4- and 16-bit), converting the few ops whose signature changed on the way.
//! Graph inputs and outputs keep their names.

use std::collections::HashMap;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto};
use qgraph::{Tensor, ValueId};
use qkernels::{Encoding, Rounding};

use crate::error::{CalibError, Result};
use crate::placement::{Granularity, Precision, Quantizer, TensorRole};
use crate::sim::QuantSim;

/// How weights appear in the exported model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QdqOptions {
    /// Store weights as integers plus `DequantizeLinear` (default: fake-quantized floats).
    pub prequantize_weights: bool,
    /// Store the float biases of Conv/ConvTranspose/Gemm as int32 (scale = input scale × weight
    /// scale) plus `DequantizeLinear`, as integer runtimes execute them.
    pub int32_bias: bool,
    /// Write MatMul layers with 4-bit symmetric blockwise weights (blocks along the input axis, a
    /// power of two of at least 16) as onnxruntime's `MatMulNBits` (com.microsoft): the weight
    /// packed two values per byte, one scale per output channel and block.
    pub matmul_nbits: bool,
}

/// Scale, zero point and axis of one `QuantizeLinear`/`DequantizeLinear` pair.
struct QdqParams {
    scale: Tensor,
    zero_point: Tensor,
    axis: Option<usize>,
    /// Elements along `axis` sharing one scale (opset 21 blocked quantization).
    block_size: Option<usize>,
    dequantize_only: bool,
}

/// What to insert after one tensor.
enum Insert {
    /// `QuantizeLinear → DequantizeLinear` (or only `DequantizeLinear` for prequantized weights).
    Qdq(Box<QdqParams>),
    /// `Cast(to) → Cast(float)`.
    Cast { to: i32 },
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.i = v;
    a.type_ = AttributeType::INT.into();
    a
}

fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name;
    n.input = inputs;
    n.output = outputs;
    n.attribute = attrs;
    n
}

/// Whether a quantizer's integers are stored signed: symmetric params are, everything else is
/// unsigned (spec §1.4).
pub(crate) fn signed_view(q: &Quantizer, is_param: bool) -> bool {
    is_param && q.symmetric
}

/// The integer dtype view of an encoding (spec §1.4, §4.4): signed for symmetric params,
/// unsigned otherwise; returns (signed, zero points).
pub(crate) fn integer_view(q: &Quantizer, encs: &[Encoding], is_param: bool) -> (bool, Vec<i64>) {
    let half = 2f64.powi(q.precision.bits() as i32 - 1);
    let signed = signed_view(q, is_param);
    let zero_points =
        encs.iter().map(|e| (if signed { -e.offset - half } else { -e.offset }) as i64).collect();
    (signed, zero_points)
}

fn zero_point_tensor(bits: u32, signed: bool, zps: &[i64], shape: &[usize]) -> Result<Tensor> {
    let dtype = match (bits, signed) {
        (4, false) => qgraph::DType::U4,
        (4, true) => qgraph::DType::I4,
        (8, false) => qgraph::DType::U8,
        (8, true) => qgraph::DType::I8,
        (16, false) => qgraph::DType::U16,
        (16, true) => qgraph::DType::I16,
        (b, _) => {
            return Err(CalibError::Quantizer {
                tensor: "(QDQ export)".into(),
                detail: format!("int{b} has no ONNX QuantizeLinear type (4, 8 and 16 bits export)"),
            });
        }
    };
    Tensor::from_i64s(dtype, shape, zps).ok_or_else(|| CalibError::Quantizer {
        tensor: "(QDQ export)".into(),
        detail: "zero point out of range".into(),
    })
}

/// Integers of a weight on its dtype view, per tensor or per channel.
fn integer_weight(
    t: &Tensor,
    q: &Quantizer,
    encs: &[Encoding],
    signed: bool,
    rounding: Rounding,
) -> Result<Vec<i64>, String> {
    let arr = t.as_f32().ok_or("weight is not f32")?;
    let data: Vec<f32> = arr.iter().copied().collect();
    let shape = arr.shape();
    let one = |chunk: &[f32], e: &Encoding| qkernels::quantize_to_int(chunk, e, signed, rounding);
    let ints: Vec<i32> = match q.granularity {
        Granularity::PerTensor => one(&data, &encs[0]),
        Granularity::PerChannel { axis } => {
            let inner: usize = shape[axis + 1..].iter().product();
            let channels = shape[axis];
            let mut out = Vec::with_capacity(data.len());
            for (block, chunk) in data.chunks(inner.max(1)).enumerate() {
                out.extend(one(chunk, &encs[block % channels]));
            }
            out
        }
        Granularity::PerBlock { .. } => {
            let (index, _) = crate::sim::encoding_index(shape, q.granularity)?;
            data.iter().zip(&index).map(|(&x, &e)| one(&[x], &encs[e])[0]).collect()
        }
    };
    Ok(ints.into_iter().map(i64::from).collect())
}

/// The MatMul that alone reads weight `w` as its second input, when `MatMulNBits` can carry it:
/// a 2-D `[K, N]` weight at 4 bits, symmetric, in blocks along K of a power of two ≥ 16.
fn nbits_matmul(g: &qgraph::Graph, w: ValueId, q: &Quantizer) -> Option<qgraph::NodeId> {
    let Granularity::PerBlock { channel_axis: 1, block_axis: 0, block_size } = q.granularity else {
        return None;
    };
    let shape = g.static_shape(w)?.to_vec();
    let fits = q.precision == Precision::Int(4)
        && q.symmetric
        && block_size >= 16
        && block_size.is_power_of_two()
        && shape.len() == 2
        && shape[0] % block_size == 0;
    let [read] = g.consumers(w) else { return None };
    let n = g.node(read.node);
    (fits && read.slot == 1 && n.op_type == "MatMul" && n.is_onnx_domain() && g.use_count(w) == 1)
        .then_some(read.node)
}

/// Rewrites `matmul` into `MatMulNBits` with weight `w` (`[K, N]`) packed: per output channel
/// and block, the block's 4-bit values (offset by 8, low nibble first) and its scale.
fn as_matmul_nbits(
    model: &mut qgraph::Model,
    matmul: qgraph::NodeId,
    w: ValueId,
    q: &Quantizer,
    encs: &[Encoding],
) -> Result<(), String> {
    let Granularity::PerBlock { block_size, .. } = q.granularity else { return Err("not blockwise".into()) };
    let g = &model.graph;
    let (k, n) = match g.static_shape(w) {
        Some(&[k, n]) => (k, n),
        other => return Err(format!("weight of shape {other:?}")),
    };
    let blocks = k / block_size;
    let mut scales = Vec::with_capacity(n * blocks);
    for c in 0..n {
        for b in 0..blocks {
            scales.push(encs.get(b * n + c).ok_or("fewer encodings than blocks")?.delta as f32);
        }
    }
    let (q2, encs2) = (q.clone(), encs.to_vec());
    let pack = move |data: &Tensor| -> Result<Tensor, String> {
        let ints = integer_weight(data, &q2, &encs2, true, Rounding::HalfAwayFromZero)?;
        let mut packed = vec![0i64; n * k / 2];
        for c in 0..n {
            for row in 0..k {
                let u = (ints[row * n + c] + 8).clamp(0, 15);
                packed[c * k / 2 + row / 2] |= if row % 2 == 0 { u } else { u << 4 };
            }
        }
        Tensor::from_i64s(qgraph::DType::U8, &[n, blocks, block_size / 2], &packed)
            .ok_or("packed weight".into())
    };
    transform_static(model, w, qgraph::DType::U8, &[n, blocks, block_size / 2], pack)?;
    let g = &model.graph;
    let name = g.value(w).name.clone();
    let scales = Tensor::from_vec(&[n * blocks], scales).ok_or("scales")?;
    let g = &mut model.graph;
    let scales = g.add_initializer(&format!("{name}_scales"), scales);
    g.set_input(matmul, 2, Some(scales));
    let node = g.node_mut(matmul);
    node.op_type = "MatMulNBits".into();
    node.domain = "com.microsoft".into();
    node.attrs = vec![
        ("K".into(), qgraph::Attribute::Int(k as i64)),
        ("N".into(), qgraph::Attribute::Int(n as i64)),
        ("bits".into(), qgraph::Attribute::Int(4)),
        ("block_size".into(), qgraph::Attribute::Int(block_size as i64)),
    ];
    if !model.opsets.iter().any(|o| o.domain == "com.microsoft") {
        model.opsets.push(qgraph::Opset { domain: "com.microsoft".into(), version: 1 });
    }
    Ok(())
}

/// Replaces static `v`'s data in `model` by `f` of it (of `dtype` and `shape`): at once when the
/// data is in memory, whenever it is read when it is lazy, so a mapped weight is never held whole.
fn transform_static(
    model: &mut qgraph::Model,
    v: ValueId,
    dtype: qgraph::DType,
    shape: &[usize],
    f: impl Fn(&Tensor) -> Result<Tensor, String> + Send + Sync + 'static,
) -> Result<(), String> {
    let value = model.graph.value_mut(v);
    match (&value.data, &value.lazy) {
        (Some(data), _) => value.data = Some(f(data)?),
        (None, Some(lazy)) => value.lazy = Some(lazy.derive(dtype, shape, move |data| f(&data))),
        (None, None) => return Err("not a static tensor".into()),
    }
    value.dtype = Some(dtype);
    value.shape = Some(qgraph::Shape::known(shape));
    Ok(())
}

/// For blocked quantization of a tensor of `shape`: ONNX's parameter shape (the tensor's, with
/// `block_axis` divided by the block size) and, for each of its elements in row-major order,
/// the index of the encoding that covers it (encodings repeat along the other axes).
fn blocked_parameters(shape: &[usize], granularity: Granularity) -> Result<(Vec<usize>, Vec<usize>), String> {
    let Granularity::PerBlock { block_axis, block_size, .. } = granularity else {
        return Err("not blockwise".into());
    };
    let (index, _) = crate::sim::encoding_index(shape, granularity)?;
    let mut param_shape = shape.to_vec();
    param_shape[block_axis] = shape[block_axis] / block_size;
    let strides = |s: &[usize]| -> Vec<usize> {
        let mut st = vec![1usize; s.len()];
        for d in (0..s.len().saturating_sub(1)).rev() {
            st[d] = st[d + 1] * s[d + 1];
        }
        st
    };
    let (x_strides, p_strides) = (strides(shape), strides(&param_shape));
    let count: usize = param_shape.iter().product();
    let of_param = (0..count)
        .map(|flat| {
            let at: usize = (0..shape.len())
                .map(|d| {
                    let c = (flat / p_strides[d]) % param_shape[d];
                    (if d == block_axis { c * block_size } else { c }) * x_strides[d]
                })
                .sum();
            index[at]
        })
        .collect();
    Ok((param_shape, of_param))
}

/// The simulation as a QDQ ONNX model (lazy weights read into it).
pub fn to_qdq_model(sim: &QuantSim, options: QdqOptions) -> Result<ModelProto> {
    let (mut proto, model) = qdq_model(sim, options)?;
    qgraph::inline_lazy(&mut proto, &model)?;
    Ok(proto)
}

/// The QDQ model as a message whose lazy weights are placeholders, with the model that supplies
/// their data when the message is written.
fn qdq_model(sim: &QuantSim, options: QdqOptions) -> Result<(ModelProto, qgraph::Model)> {
    let g = &sim.model().graph;
    let placement = sim.placement();
    let mut model = sim.model().clone();
    let mut inserts: HashMap<ValueId, Insert> = HashMap::new();
    let (mut needs_per_channel, mut needs_21) = (false, false);
    for t in placement.tensors() {
        let q = placement.quantizer(t.quantizer);
        if !q.enabled {
            continue;
        }
        let name = &g.value(t.value).name;
        let is_param = matches!(t.role, TensorRole::Param { .. });
        let encs = match q.precision {
            Precision::Float16 | Precision::BFloat16 => {
                let to = if q.precision == Precision::Float16 { 10 } else { 16 };
                if let (Some(shape), Some(qgraph::DType::F32)) =
                    (g.static_shape(t.value), g.value(t.value).dtype)
                {
                    let half = q.precision == Precision::Float16;
                    let cast = move |data: &Tensor| {
                        let mut values: Vec<f32> =
                            data.as_f32().map(|a| a.iter().copied().collect()).unwrap_or_default();
                        if half {
                            qkernels::fake_cast_f16(&mut values);
                        } else {
                            qkernels::fake_cast_bf16(&mut values);
                        }
                        Tensor::from_vec(data.shape(), values).ok_or_else(|| "cast weight".to_string())
                    };
                    transform_static(&mut model, t.value, qgraph::DType::F32, shape, cast)
                        .map_err(|detail| CalibError::Quantizer { tensor: name.clone(), detail })?;
                } else if g.is_static(t.value) {
                    // A static tensor of another type passes as it is.
                } else {
                    inserts.insert(t.value, Insert::Cast { to });
                }
                continue;
            }
            Precision::Int(_) => q.encodings.as_deref().ok_or_else(|| CalibError::Quantizer {
                tensor: name.clone(),
                detail: "enabled but not calibrated".into(),
            })?,
        };
        if options.matmul_nbits && is_param {
            if let Some(matmul) = nbits_matmul(g, t.value, q) {
                as_matmul_nbits(&mut model, matmul, t.value, q, encs)
                    .map_err(|detail| CalibError::Quantizer { tensor: name.clone(), detail })?;
                continue;
            }
        }
        let bits = q.precision.bits();
        if bits != 8 {
            needs_21 = true;
        }
        let (signed, zps) = integer_view(q, encs, is_param);
        let fail = |detail: String| CalibError::Quantizer { tensor: name.clone(), detail };
        let scales: Vec<f32> = encs.iter().map(|e| e.delta as f32).collect();
        // Parameter shape, the encoding of each parameter element, axis and block size.
        let (param_shape, of_param, axis, block_size) = match q.granularity {
            Granularity::PerTensor => (vec![], vec![0], None, None),
            Granularity::PerChannel { axis } => {
                (vec![scales.len()], (0..scales.len()).collect(), Some(axis), None)
            }
            Granularity::PerBlock { block_axis, block_size, .. } => {
                let shape = g.static_shape(t.value).map(<[usize]>::to_vec).ok_or_else(|| {
                    fail("blockwise quantization applies to weights, not to computed tensors".into())
                })?;
                needs_21 = true;
                let (param_shape, of_param) = blocked_parameters(&shape, q.granularity).map_err(fail)?;
                (param_shape, of_param, Some(block_axis), Some(block_size))
            }
        };
        needs_per_channel |= axis.is_some();
        let scale = Tensor::from_vec(&param_shape, of_param.iter().map(|&e| scales[e]).collect())
            .ok_or_else(|| fail("scale tensor".into()))?;
        let zps: Vec<i64> = of_param.iter().map(|&e| zps[e]).collect();
        let zero_point = zero_point_tensor(bits, signed, &zps, &param_shape)
            .map_err(|_| fail(format!("int{bits} zero points")))?;
        let mut dequantize_only = false;
        if let Some(shape) = g.static_shape(t.value).map(<[usize]>::to_vec) {
            let (q, encs) = (q.clone(), encs.to_vec());
            let done = if options.prequantize_weights && is_param {
                let dtype = zero_point.dtype();
                dequantize_only = true;
                transform_static(&mut model, t.value, dtype, &shape, move |data| {
                    let ints = integer_weight(data, &q, &encs, signed, Rounding::HalfAwayFromZero)?;
                    Tensor::from_i64s(dtype, data.shape(), &ints).ok_or_else(|| "integer weight".to_string())
                })
            } else if g.value(t.value).dtype == Some(qgraph::DType::F32) {
                transform_static(&mut model, t.value, qgraph::DType::F32, &shape, move |data| {
                    let mut values: Vec<f32> =
                        data.as_f32().map(|a| a.iter().copied().collect()).unwrap_or_default();
                    crate::sim::apply_quantizer(&mut values, data.shape(), &q, Rounding::HalfAwayFromZero)?;
                    Tensor::from_vec(data.shape(), values).ok_or_else(|| "quantized weight".to_string())
                })
            } else {
                Ok(())
            };
            done.map_err(|detail| CalibError::Quantizer { tensor: name.clone(), detail })?;
        }
        inserts.insert(
            t.value,
            Insert::Qdq(Box::new(QdqParams { scale, zero_point, axis, block_size, dequantize_only })),
        );
    }
    if options.int32_bias {
        for b in crate::encodings::int32_biases(sim) {
            let name = g.value(b.bias).name.clone();
            let Some(data) = g.static_value(b.bias).and_then(|t| t.as_f32()) else { continue };
            let channels = b.scales.len();
            let ints: Vec<i64> = data
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    (f64::from(x) / b.scales[if b.per_channel { i % channels } else { 0 }]).round() as i64
                })
                .map(|q| q.clamp(i64::from(i32::MIN), i64::from(i32::MAX)))
                .collect();
            let int_tensor = Tensor::from_i64s(qgraph::DType::I32, data.shape(), &ints)
                .ok_or_else(|| CalibError::Quantizer { tensor: name.clone(), detail: "int32 bias".into() })?;
            let scales: Vec<f32> = b.scales.iter().map(|&s| s as f32).collect();
            let (scale, zero_point) = if b.per_channel {
                (
                    Tensor::from_vec(&[channels], scales),
                    Tensor::from_i64s(qgraph::DType::I32, &[channels], &vec![0; channels]),
                )
            } else {
                (Some(Tensor::scalar(scales[0])), Tensor::from_i64s(qgraph::DType::I32, &[], &[0]))
            };
            let (Some(scale), Some(zero_point)) = (scale, zero_point) else { continue };
            model.graph.value_mut(b.bias).data = Some(int_tensor);
            model.graph.value_mut(b.bias).dtype = Some(qgraph::DType::I32);
            needs_per_channel |= b.per_channel;
            let axis = b.per_channel.then_some(0);
            inserts.insert(
                b.bias,
                Insert::Qdq(Box::new(QdqParams {
                    scale,
                    zero_point,
                    axis,
                    block_size: None,
                    dequantize_only: true,
                })),
            );
        }
    }
    let mut proto = qgraph::model_to_proto(&model);
    let old_opset = sim.model().default_opset();
    let mut opset = old_opset;
    if !inserts.is_empty() {
        opset = opset.max(10);
    }
    if needs_per_channel {
        opset = opset.max(13);
    }
    if needs_21 {
        opset = opset.max(21);
    }
    let converts = sim.converts()?;
    if converts.iter().any(|c| c.to.bits() != 8) {
        opset = opset.max(21);
    }
    let graph = proto.graph.as_mut().expect("model_to_proto always sets the graph");
    // Where each quantized tensor is read from after insertion, and the renamed producers of
    // quantized graph outputs.
    let outputs: std::collections::HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut read_as: HashMap<String, String> = HashMap::new();
    let mut produced_as: HashMap<String, String> = HashMap::new();
    let mut extra_inits = Vec::new();
    let mut chains: HashMap<String, Vec<NodeProto>> = HashMap::new();
    for (&v, insert) in &inserts {
        let name = g.value(v).name.clone();
        let source = if outputs.contains(&name) { format!("{name}_float") } else { name.clone() };
        let result = if outputs.contains(&name) { name.clone() } else { format!("{name}_dequantized") };
        if source != name {
            produced_as.insert(name.clone(), source.clone());
        }
        read_as.insert(name.clone(), result.clone());
        let nodes = match insert {
            Insert::Cast { to } => vec![
                node(
                    "Cast",
                    format!("{name}_cast_down"),
                    vec![source.clone()],
                    vec![format!("{name}_cast")],
                    vec![attr_int("to", i64::from(*to))],
                ),
                node(
                    "Cast",
                    format!("{name}_cast_up"),
                    vec![format!("{name}_cast")],
                    vec![result],
                    vec![attr_int("to", 1)],
                ),
            ],
            Insert::Qdq(params) => {
                let QdqParams { scale, zero_point, axis, block_size, dequantize_only } = params.as_ref();
                extra_inits.push(qgraph::tensor_to_proto(&format!("{name}_scale"), scale));
                extra_inits.push(qgraph::tensor_to_proto(&format!("{name}_zero_point"), zero_point));
                let attrs = || {
                    let mut a: Vec<AttributeProto> =
                        axis.map(|a| attr_int("axis", a as i64)).into_iter().collect();
                    a.extend(block_size.map(|b| attr_int("block_size", b as i64)));
                    a
                };
                let qparams =
                    |input: String| vec![input, format!("{name}_scale"), format!("{name}_zero_point")];
                if *dequantize_only {
                    vec![node(
                        "DequantizeLinear",
                        format!("{name}_dequantize"),
                        qparams(source.clone()),
                        vec![result],
                        attrs(),
                    )]
                } else {
                    vec![
                        node(
                            "QuantizeLinear",
                            format!("{name}_quantize"),
                            qparams(source.clone()),
                            vec![format!("{name}_quantized")],
                            attrs(),
                        ),
                        node(
                            "DequantizeLinear",
                            format!("{name}_dequantize"),
                            qparams(format!("{name}_quantized")),
                            vec![result],
                            attrs(),
                        ),
                    ]
                }
            }
        };
        chains.insert(name, nodes);
    }
    // Readers of a converted tensor read the convert's result instead (keyed by node index:
    // the proto lists the graph's nodes in arena order).
    let mut converted_for: HashMap<(usize, String), String> = HashMap::new();
    for c in &converts {
        let name = g.value(c.tensor).name.clone();
        let Some(source) = read_as.get(&name).cloned() else { continue };
        let bits = c.to.bits();
        let prefix = format!("{name}_int{bits}");
        let scale = Tensor::scalar(c.encoding.delta as f32);
        let zero_point = zero_point_tensor(bits, false, &[-c.encoding.offset as i64], &[])?;
        extra_inits.push(qgraph::tensor_to_proto(&format!("{prefix}_scale"), &scale));
        extra_inits.push(qgraph::tensor_to_proto(&format!("{prefix}_zero_point"), &zero_point));
        let qparams = |input: String| vec![input, format!("{prefix}_scale"), format!("{prefix}_zero_point")];
        let chain = chains.entry(name.clone()).or_default();
        chain.push(node(
            "QuantizeLinear",
            format!("{prefix}_quantize"),
            qparams(source),
            vec![format!("{prefix}_quantized")],
            vec![],
        ));
        chain.push(node(
            "DequantizeLinear",
            format!("{prefix}_dequantize"),
            qparams(format!("{prefix}_quantized")),
            vec![prefix.clone()],
            vec![],
        ));
        for r in &c.readers {
            converted_for.insert((r.index(), name.clone()), prefix.clone());
        }
    }
    let rewire = |index: usize, n: &mut NodeProto| {
        for i in &mut n.input {
            if let Some(c) = converted_for.get(&(index, i.clone())) {
                *i = c.clone();
            } else if let Some(r) = read_as.get(i.as_str()) {
                *i = r.clone();
            }
        }
    };
    let mut nodes = Vec::with_capacity(graph.node.len() + 2 * chains.len());
    // Chains of graph inputs and initializers first, in a deterministic order.
    let mut leading: Vec<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    leading.extend(graph.initializer.iter().map(|t| t.name.clone()));
    for name in &leading {
        if let Some(chain) = chains.remove(name) {
            nodes.extend(chain);
        }
    }
    for (index, mut n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        rewire(index, &mut n);
        let mut after = Vec::new();
        for o in &mut n.output {
            if let Some(chain) = chains.remove(o.as_str()) {
                after.extend(chain);
            }
            if let Some(p) = produced_as.get(o.as_str()) {
                *o = p.clone();
            }
        }
        nodes.push(n);
        nodes.extend(after);
    }
    graph.node = nodes;
    graph.initializer.extend(extra_inits);
    graph.value_info.retain(|vi| !read_as.contains_key(&vi.name));
    crate::subgraph_read_guard::guard_subgraph_reads(graph);
    if opset != old_opset {
        raise_opset(graph, old_opset, opset)?;
    }
    set_default_opset(&mut proto, opset);
    proto.metadata_props.push({
        let mut e = StringStringEntryProto::new();
        e.key = "producer".into();
        e.value = format!("quantkit {}", env!("CARGO_PKG_VERSION"));
        e
    });
    Ok((proto, model))
}

fn set_default_opset(proto: &mut ModelProto, opset: i64) {
    match proto.opset_import.iter_mut().find(|o| o.domain.is_empty() || o.domain == "ai.onnx") {
        Some(o) => o.version = opset,
        None => {
            let mut o = OperatorSetIdProto::new();
            o.version = opset;
            proto.opset_import.push(o);
        }
    }
    // IR versions that first allowed these opsets.
    let ir = match opset {
        21.. => 10,
        19..=20 => 9,
        _ => 7,
    };
    proto.ir_version = proto.ir_version.max(ir);
}

/// Moves an INTS attribute into a new int64 initializer input (ops whose attribute became an
/// input in a newer opset).
fn attribute_to_input(graph: &mut onnx_protobuf::GraphProto, n: &mut NodeProto, attr: &str, slot: usize) {
    let Some(pos) = n.attribute.iter().position(|a| a.name == attr) else { return };
    let a = n.attribute.remove(pos);
    let name = format!("{}_{attr}", if n.name.is_empty() { &n.output[0] } else { &n.name });
    if let Some(t) = Tensor::from_vec(&[a.ints.len()], a.ints.clone()) {
        graph.initializer.push(qgraph::tensor_to_proto(&name, &t));
    }
    while n.input.len() < slot {
        n.input.push(String::new());
    }
    n.input.insert(slot, name);
}

/// Converts the ops whose signature changed between `from` and `to` (axes/split attributes that
/// became inputs); refuses ops whose semantics changed.
fn raise_opset(graph: &mut onnx_protobuf::GraphProto, from: i64, to: i64) -> Result<()> {
    let crosses = |v: i64| from < v && to >= v;
    let mut nodes = std::mem::take(&mut graph.node);
    for n in &mut nodes {
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            continue;
        }
        let op = n.op_type.as_str();
        let changed = match op {
            "ReduceSum" => crosses(13).then_some(("axes", 1)),
            "Squeeze" | "Unsqueeze" => crosses(13).then_some(("axes", 1)),
            "Split" => crosses(13).then_some(("split", 1)),
            "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
            | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => crosses(18).then_some(("axes", 1)),
            "RoiAlign" if crosses(16) => {
                return Err(CalibError::Quantizer {
                    tensor: n.name.clone(),
                    detail: format!(
                        "RoiAlign changed meaning in opset 16; cannot raise the model from {from} to {to}"
                    ),
                });
            }
            "GroupNormalization" if crosses(21) => {
                return Err(CalibError::Quantizer {
                    tensor: n.name.clone(),
                    detail: format!(
                        "GroupNormalization changed meaning in opset 21; cannot raise the model from {from} to {to}"
                    ),
                });
            }
            _ => None,
        };
        if let Some((attr, slot)) = changed {
            attribute_to_input(graph, n, attr, slot);
        }
    }
    graph.node = nodes;
    Ok(())
}

/// Writes the QDQ model atomically, with external data beside it when the model is too large for
/// one file or its weights are read on demand (see [`qgraph::save_proto`]).
pub fn write_qdq_model(sim: &QuantSim, options: QdqOptions, path: &std::path::Path) -> Result<()> {
    let (proto, model) = qdq_model(sim, options)?;
    qgraph::save_proto(proto, &model, path).map_err(CalibError::from)
}
