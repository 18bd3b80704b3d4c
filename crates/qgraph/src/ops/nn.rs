//! Neural-network op families: convolutions and pools, Gemm/MatMul, normalizations, softmax,
//! Resize, recurrent layers and Quantize/DequantizeLinear. These are the ops that own parameters,
//! per-channel axes (spec §1.3) and MAC counts. The classification losses and `ImageDecoder`
//! (a model's input stage) have their shape rules here too.

use super::{Fact, OpSpec, ParamRole, broadcast, like_input, normalize_axis, required};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::Node;
use crate::shape::{Dim, Shape};

pub(super) fn spec(op: &str) -> Option<&'static dyn OpSpec> {
    Some(match op {
        "Conv" => &ConvOp,
        "ConvTranspose" => &ConvTransposeOp,
        "MaxPool" | "AveragePool" | "LpPool" => &PoolOp,
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => &GlobalPoolOp,
        "Gemm" => &GemmOp,
        "MatMul" => &MatMulOp,
        "BatchNormalization" => &BatchNormOp,
        "LayerNormalization" => &LayerNormOp,
        "InstanceNormalization" | "GroupNormalization" => &AffineNormOp,
        "RMSNormalization" => &RmsNormOp,
        "Softmax" | "LogSoftmax" | "Hardmax" | "LRN" => &SoftmaxLike,
        "Resize" | "Upsample" => &ResizeOp,
        "RNN" | "GRU" | "LSTM" => &RecurrentOp,
        "QuantizeLinear" => &QuantizeOp,
        "DequantizeLinear" => &DequantizeOp,
        "NegativeLogLikelihoodLoss" | "SoftmaxCrossEntropyLoss" => &LossOp,
        "ImageDecoder" => &ImageDecoderOp,
        _ => return None,
    })
}

const WEIGHT_BIAS: &[(usize, ParamRole)] = &[(1, ParamRole::Weight), (2, ParamRole::Bias)];

/// Spatial output sizes of a sliding window (Conv and pools): kernel, strides, dilations, pads,
/// auto_pad and ceil_mode as ONNX defines them.
fn window_output(node: &Node, spatial: &[Dim], kernel: &[usize], ceil_mode: bool) -> Result<Vec<Dim>> {
    let n = spatial.len();
    if kernel.len() != n {
        return Err(node.shape_error(format!("kernel rank {} for {} spatial dims", kernel.len(), n)));
    }
    let strides = node.ints_attr("strides")?.map_or_else(|| vec![1; n], <[i64]>::to_vec);
    let dilations = node.ints_attr("dilations")?.map_or_else(|| vec![1; n], <[i64]>::to_vec);
    let pads = node.ints_attr("pads")?.map_or_else(|| vec![0; 2 * n], <[i64]>::to_vec);
    if strides.len() != n || dilations.len() != n || pads.len() != 2 * n {
        return Err(node.shape_error("strides, dilations or pads do not match the kernel rank"));
    }
    if strides.iter().chain(&dilations).any(|&v| v <= 0) {
        return Err(node.shape_error("strides and dilations must be positive"));
    }
    // Bounded attributes keep the i64 arithmetic below exact (no overflow on hostile models).
    let bound = i64::from(i32::MAX);
    if strides.iter().chain(&dilations).chain(&pads).any(|v| v.abs() > bound)
        || kernel.iter().any(|&k| k as u64 > bound as u64)
    {
        return Err(node.shape_error(format!("kernel, strides, dilations or pads beyond ±{bound}")));
    }
    let auto_pad = node.string_attr("auto_pad")?.unwrap_or("NOTSET");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let Some(d) = spatial[i].known() else {
            out.push(Dim::Symbol(String::new()));
            continue;
        };
        let Some(d) = i64::try_from(d).ok().filter(|&d| d <= 1 << 48) else {
            return Err(node.shape_error(format!("spatial dim {d} is beyond 2^48")));
        };
        let (k, s, dil) = (kernel[i] as i64, strides[i], dilations[i]);
        let span = (k - 1) * dil + 1;
        let size = match auto_pad {
            "SAME_UPPER" | "SAME_LOWER" => (d + s - 1) / s,
            "VALID" => (d - span) / s + 1,
            "NOTSET" | "" => {
                let padded = d + pads[i] + pads[i + n] - span;
                if ceil_mode { (padded + s - 1) / s + 1 } else { padded.div_euclid(s) + 1 }
            }
            other => return Err(node.invalid_attr("auto_pad", format!("unknown value '{other}'"))),
        };
        if size <= 0 {
            return Err(node.shape_error(format!(
                "spatial dim {d} too small for kernel {k} (dilation {dil}, stride {s})"
            )));
        }
        out.push(Dim::Known(size as usize));
    }
    Ok(out)
}

/// Input shape and weight dims of a convolution, checked for rank; `None` while either is unknown.
fn conv_operands<'a>(node: &Node, inputs: &'a [Option<Fact>]) -> Result<Option<(&'a Shape, Vec<usize>)>> {
    let x = required(node, inputs, 0)?;
    let w = required(node, inputs, 1)?;
    let (Some(xs), Some(wd)) = (&x.shape, w.dims()) else { return Ok(None) };
    if xs.rank() < 3 || wd.len() != xs.rank() {
        return Err(node.shape_error(format!("input {xs} and weight {wd:?} ranks do not fit a convolution")));
    }
    Ok(Some((xs, wd)))
}

/// Per-sample MACs: output elements (batch excluded) times the weight elements feeding each one.
fn per_sample(out: &Fact, per_output: u64) -> Option<u64> {
    let d = out.dims()?;
    let per_sample = d.iter().skip(1).try_fold(1u64, |acc, &x| acc.checked_mul(x as u64))?;
    per_sample.checked_mul(per_output)
}

struct ConvOp;
impl OpSpec for ConvOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        WEIGHT_BIAS
    }
    fn channel_axis(&self, _node: &Node, _slot: usize, _rank: usize, _t: bool) -> Result<Option<usize>> {
        Ok(Some(0))
    }
    fn macs(&self, _node: &Node, inputs: &[Option<Fact>], outputs: &[Fact]) -> Option<u64> {
        let w = inputs.get(1)?.as_ref()?.dims()?;
        per_sample(outputs.first()?, crate::shape::checked_numel(&w[1.min(w.len())..])? as u64)
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some((xs, wd)) = conv_operands(node, inputs)? else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        let group = node.int_attr("group", 1)?.max(1) as usize;
        if let Some(c) = xs.0[1].known()
            && c != wd[1] * group
        {
            return Err(
                node.shape_error(format!("input has {c} channels, weight expects {} × group {group}", wd[1]))
            );
        }
        let kernel = node
            .ints_attr("kernel_shape")?
            .map_or_else(|| wd[2..].to_vec(), |k| k.iter().map(|&v| v as usize).collect());
        let mut dims = vec![xs.0[0].clone(), Dim::Known(wd[0])];
        dims.extend(window_output(node, &xs.0[2..], &kernel, false)?);
        Ok(vec![Fact::typed(x.dtype, Some(Shape(dims)))])
    }
}

struct ConvTransposeOp;
impl OpSpec for ConvTransposeOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        WEIGHT_BIAS
    }
    fn channel_axis(&self, _node: &Node, slot: usize, _rank: usize, _t: bool) -> Result<Option<usize>> {
        Ok(Some(if slot == 1 { 1 } else { 0 }))
    }
    fn macs(&self, _node: &Node, inputs: &[Option<Fact>], _outputs: &[Fact]) -> Option<u64> {
        let x = inputs.first()?.as_ref()?;
        let w = inputs.get(1)?.as_ref()?.dims()?;
        per_sample(x, crate::shape::checked_numel(&w[1.min(w.len())..])? as u64)
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some((xs, wd)) = conv_operands(node, inputs)? else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        let n = xs.rank() - 2;
        let group = node.int_attr("group", 1)?.max(1) as usize;
        let kernel: Vec<i64> = node
            .ints_attr("kernel_shape")?
            .map_or_else(|| wd[2..].iter().map(|&v| v as i64).collect(), <[i64]>::to_vec);
        let strides = node.ints_attr("strides")?.map_or_else(|| vec![1; n], <[i64]>::to_vec);
        let dilations = node.ints_attr("dilations")?.map_or_else(|| vec![1; n], <[i64]>::to_vec);
        let pads = node.ints_attr("pads")?.map_or_else(|| vec![0; 2 * n], <[i64]>::to_vec);
        let out_pad = node.ints_attr("output_padding")?.map_or_else(|| vec![0; n], <[i64]>::to_vec);
        if kernel.len() != n
            || strides.len() != n
            || dilations.len() != n
            || pads.len() != 2 * n
            || out_pad.len() != n
        {
            return Err(node.shape_error(
                "kernel_shape, strides, dilations, pads or output_padding do not match the rank",
            ));
        }
        let auto_pad = node.string_attr("auto_pad")?.unwrap_or("NOTSET");
        let mut dims = vec![xs.0[0].clone(), Dim::Known(wd[1] * group)];
        if let Some(explicit) = node.ints_attr("output_shape")? {
            dims.extend(explicit.iter().map(|&v| Dim::Known(v.max(0) as usize)));
        } else {
            for i in 0..n {
                dims.push(match xs.0[2 + i].known() {
                    None => Dim::Symbol(String::new()),
                    Some(d) => {
                        let d = d as i64;
                        let size = if auto_pad.starts_with("SAME") {
                            d * strides[i]
                        } else {
                            strides[i] * (d - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
                                - pads[i]
                                - pads[i + n]
                        };
                        if size <= 0 {
                            return Err(
                                node.shape_error(format!("non-positive output size on spatial axis {i}"))
                            );
                        }
                        Dim::Known(size as usize)
                    }
                });
            }
        }
        Ok(vec![Fact::typed(x.dtype, Some(Shape(dims)))])
    }
}

struct PoolOp;
impl OpSpec for PoolOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let kernel: Vec<usize> = node
            .ints_attr("kernel_shape")?
            .ok_or_else(|| node.invalid_attr("kernel_shape", "required"))?
            .iter()
            .map(|&v| v.max(1) as usize)
            .collect();
        let Some(xs) = &x.shape else {
            return Ok(vec![Fact::typed(x.dtype, None), Fact::typed(Some(DType::I64), None)]);
        };
        if xs.rank() != kernel.len() + 2 {
            return Err(node.shape_error(format!("input {xs} does not fit kernel rank {}", kernel.len())));
        }
        let ceil_mode = node.int_attr("ceil_mode", 0)? != 0;
        let mut dims = xs.0[..2].to_vec();
        dims.extend(window_output(node, &xs.0[2..], &kernel, ceil_mode)?);
        let shape = Some(Shape(dims));
        Ok(vec![Fact::typed(x.dtype, shape.clone()), Fact::typed(Some(DType::I64), shape)])
    }
}

struct GlobalPoolOp;
impl OpSpec for GlobalPoolOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let shape = x.shape.as_ref().map(|s| {
            let mut d = s.0.clone();
            for v in d.iter_mut().skip(2) {
                *v = Dim::Known(1);
            }
            Shape(d)
        });
        Ok(vec![Fact::typed(x.dtype, shape)])
    }
}

struct GemmOp;
impl OpSpec for GemmOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        WEIGHT_BIAS
    }
    fn channel_axis(&self, node: &Node, slot: usize, rank: usize, _t: bool) -> Result<Option<usize>> {
        if slot == 1 && rank == 2 {
            return Ok(Some(if node.int_attr("transB", 0)? != 0 { 0 } else { 1 }));
        }
        Ok((rank == 1).then_some(0))
    }
    fn macs(&self, node: &Node, inputs: &[Option<Fact>], outputs: &[Fact]) -> Option<u64> {
        let a = inputs.first()?.as_ref()?.dims()?;
        let k = if node.int_attr("transA", 0).ok()? != 0 { a.first()? } else { a.get(1)? };
        per_sample(outputs.first()?, *k as u64)
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let a = required(node, inputs, 0)?;
        let b = required(node, inputs, 1)?;
        let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else { return Ok(vec![Fact::typed(a.dtype, None)]) };
        if sa.rank() != 2 || sb.rank() != 2 {
            return Err(node.shape_error(format!("Gemm needs 2-D inputs, got {sa} and {sb}")));
        }
        let ta = node.int_attr("transA", 0)? != 0;
        let tb = node.int_attr("transB", 0)? != 0;
        let (m, ka) = if ta { (&sa.0[1], &sa.0[0]) } else { (&sa.0[0], &sa.0[1]) };
        let (kb, n) = if tb { (&sb.0[1], &sb.0[0]) } else { (&sb.0[0], &sb.0[1]) };
        if let (Some(x), Some(y)) = (ka.known(), kb.known())
            && x != y
        {
            return Err(
                node.shape_error(format!("inner dims differ: {sa} × {sb} (transA={ta}, transB={tb})"))
            );
        }
        Ok(vec![Fact::typed(a.dtype, Some(Shape(vec![m.clone(), n.clone()])))])
    }
}

struct MatMulOp;
impl OpSpec for MatMulOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        &[(1, ParamRole::Weight)]
    }
    fn channel_axis(
        &self,
        _node: &Node,
        _slot: usize,
        rank: usize,
        through_transpose: bool,
    ) -> Result<Option<usize>> {
        Ok(match (rank, through_transpose) {
            (0, _) => None,
            (1, _) => Some(0),
            (r, false) => Some(r - 1),
            (r, true) => Some(r - 2),
        })
    }
    fn macs(&self, _node: &Node, inputs: &[Option<Fact>], outputs: &[Fact]) -> Option<u64> {
        let a = inputs.first()?.as_ref()?.dims()?;
        let k = *a.last()? as u64;
        let out = outputs.first()?.dims()?;
        if out.len() <= 1 {
            return (crate::shape::checked_numel(&out)? as u64).checked_mul(k);
        }
        per_sample(outputs.first()?, k)
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let a = required(node, inputs, 0)?;
        let b = required(node, inputs, 1)?;
        let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else { return Ok(vec![Fact::typed(a.dtype, None)]) };
        if sa.rank() == 0 || sb.rank() == 0 {
            return Err(node.shape_error("MatMul inputs must have rank ≥ 1"));
        }
        let mut la = sa.0.clone();
        let mut lb = sb.0.clone();
        let (pa, pb) = (la.len() == 1, lb.len() == 1);
        if pa {
            la.insert(0, Dim::Known(1));
        }
        if pb {
            lb.push(Dim::Known(1));
        }
        let (ka, kb) = (&la[la.len() - 1], &lb[lb.len() - 2]);
        if let (Some(x), Some(y)) = (ka.known(), kb.known())
            && x != y
        {
            return Err(node.shape_error(format!("inner dims differ: {sa} × {sb}")));
        }
        let batch =
            broadcast(node, &Shape(la[..la.len() - 2].to_vec()), &Shape(lb[..lb.len() - 2].to_vec()))?;
        let mut dims = batch.0;
        if !pa {
            dims.push(la[la.len() - 2].clone());
        }
        if !pb {
            dims.push(lb[lb.len() - 1].clone());
        }
        Ok(vec![Fact::typed(a.dtype, Some(Shape(dims)))])
    }
}

struct BatchNormOp;
impl OpSpec for BatchNormOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        &[
            (1, ParamRole::Weight),
            (2, ParamRole::Bias),
            (3, ParamRole::RunningMean),
            (4, ParamRole::RunningVar),
        ]
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let mut out = vec![Fact::typed(x.dtype, x.shape.clone())];
        for slot in 3..2 + node.outputs().len().min(3) {
            let s = inputs.get(slot).and_then(Option::as_ref);
            out.push(Fact::typed(x.dtype, s.and_then(|f| f.shape.clone())));
        }
        Ok(out)
    }
}

struct LayerNormOp;
impl OpSpec for LayerNormOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        WEIGHT_BIAS
    }
    fn channel_axis(&self, _node: &Node, _slot: usize, rank: usize, _t: bool) -> Result<Option<usize>> {
        Ok((rank >= 1).then_some(0))
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let stats = x.shape.as_ref().map(|s| {
            let axis = node
                .int_attr("axis", -1)
                .ok()
                .and_then(|a| normalize_axis(node, a, s.rank()).ok())
                .unwrap_or(0);
            Shape(
                s.0.iter()
                    .enumerate()
                    .map(|(i, d)| if i < axis { d.clone() } else { Dim::Known(1) })
                    .collect(),
            )
        });
        let mut out = vec![Fact::typed(x.dtype, x.shape.clone())];
        out.extend((1..node.outputs().len()).map(|_| Fact::typed(Some(DType::F32), stats.clone())));
        Ok(out)
    }
}

struct AffineNormOp;
impl OpSpec for AffineNormOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        WEIGHT_BIAS
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        like_input(node, inputs)
    }
}

struct RmsNormOp;
impl OpSpec for RmsNormOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        &[(1, ParamRole::Weight)]
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        like_input(node, inputs)
    }
}

struct SoftmaxLike;
impl OpSpec for SoftmaxLike {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        like_input(node, inputs)
    }
}

/// `NegativeLogLikelihoodLoss` / `SoftmaxCrossEntropyLoss`: a scalar, or the target's shape with
/// `reduction` "none"; the optional log-probabilities are shaped as the input.
struct LossOp;
impl OpSpec for LossOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let target = required(node, inputs, 1)?;
        let loss_shape = match node.string_attr("reduction")?.unwrap_or("mean") {
            "none" => target.shape.clone(),
            _ => Some(Shape::known(&[])),
        };
        let mut out = vec![Fact::typed(x.dtype, loss_shape)];
        if node.outputs().len() > 1 {
            out.push(Fact::typed(x.dtype, x.shape.clone()));
        }
        Ok(out)
    }
}

/// `ImageDecoder`: `[height, width, 3]` (1 channel for "Grayscale") uint8, the size known only
/// once the stream is decoded.
struct ImageDecoderOp;
impl OpSpec for ImageDecoderOp {
    fn infer(&self, node: &Node, _inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let channels = if node.string_attr("pixel_format")? == Some("Grayscale") { 1 } else { 3 };
        let shape = Shape(vec![Dim::Symbol(String::new()), Dim::Symbol(String::new()), Dim::Known(channels)]);
        Ok(vec![Fact::typed(Some(DType::U8), Some(shape))])
    }
}

struct ResizeOp;
impl OpSpec for ResizeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(xs) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let value_of = |slot: usize| {
            inputs.get(slot).and_then(Option::as_ref).and_then(|f| f.value.as_ref()).filter(|t| !t.is_empty())
        };
        let (sizes_slot, scales_slot) = if node.op_type == "Upsample" { (usize::MAX, 1) } else { (3, 2) };
        let dims: Vec<Dim> = if let Some(sizes) = value_of(sizes_slot).and_then(|t| t.to_i64_vec()) {
            if sizes.len() != xs.rank() {
                return Err(node.shape_error(format!("{} sizes for rank {}", sizes.len(), xs.rank())));
            }
            sizes.iter().map(|&s| Dim::Known(s.max(0) as usize)).collect()
        } else if let Some(scales) = value_of(scales_slot).map(|t| t.to_f64_vec()).or_else(|| {
            node.attr("scales").and_then(|a| match a {
                crate::attr::Attribute::Floats(f) => Some(f.iter().map(|&v| f64::from(v)).collect()),
                _ => None,
            })
        }) {
            if scales.len() != xs.rank() {
                return Err(node.shape_error(format!("{} scales for rank {}", scales.len(), xs.rank())));
            }
            xs.0.iter()
                .zip(&scales)
                .map(|(d, &s)| {
                    d.known()
                        .map_or(Dim::Symbol(String::new()), |n| Dim::Known((n as f64 * s).floor() as usize))
                })
                .collect()
        } else {
            vec![Dim::Symbol(String::new()); xs.rank()]
        };
        Ok(vec![Fact::typed(x.dtype, Some(Shape(dims)))])
    }
}

struct RecurrentOp;
impl OpSpec for RecurrentOp {
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        &[(1, ParamRole::Weight), (2, ParamRole::RecurrentWeight), (3, ParamRole::Bias)]
    }
    fn channel_axis(&self, _node: &Node, _slot: usize, _rank: usize, _t: bool) -> Result<Option<usize>> {
        Ok(None)
    }
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let hidden = Dim::Known(node.int_attr("hidden_size", 0)?.max(0) as usize);
        let dirs = Dim::Known(if node.string_attr("direction")? == Some("bidirectional") { 2 } else { 1 });
        let layout = node.int_attr("layout", 0)?;
        let Some(xs) = x.shape.as_ref().filter(|s| s.rank() == 3) else {
            return Ok(vec![Fact::typed(x.dtype, None); node.outputs().len()]);
        };
        let (seq, batch) = if layout == 0 { (&xs.0[0], &xs.0[1]) } else { (&xs.0[1], &xs.0[0]) };
        let (y, state) = if layout == 0 {
            (
                vec![seq.clone(), dirs.clone(), batch.clone(), hidden.clone()],
                vec![dirs, batch.clone(), hidden],
            )
        } else {
            (
                vec![batch.clone(), seq.clone(), dirs.clone(), hidden.clone()],
                vec![batch.clone(), dirs, hidden],
            )
        };
        let mut out = vec![Fact::typed(x.dtype, Some(Shape(y)))];
        out.extend((1..node.outputs().len()).map(|_| Fact::typed(x.dtype, Some(Shape(state.clone())))));
        Ok(out)
    }
}

struct QuantizeOp;
impl OpSpec for QuantizeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let zp = inputs.get(2).and_then(Option::as_ref).and_then(|f| f.dtype);
        let attr = node.int_attr("output_dtype", 0)?;
        let dtype = if attr != 0 { DType::from_onnx(attr as i32) } else { zp.or(Some(DType::U8)) };
        Ok(vec![Fact::typed(dtype, x.shape.clone())])
    }
}

struct DequantizeOp;
impl OpSpec for DequantizeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let scale = inputs.get(1).and_then(Option::as_ref).and_then(|f| f.dtype);
        Ok(vec![Fact::typed(scale.or(Some(DType::F32)), x.shape.clone())])
    }
}
