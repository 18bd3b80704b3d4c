//! The layers the techniques rewrite: Conv, ConvTranspose, Gemm and MatMul with a private static
//! f32 weight, and where along the weight their output and input channels lie.

use ndarray::{ArrayD, Axis, IxDyn};
use qgraph::{Graph, NodeId, Tensor, ValueId};

/// A layer whose weight (and bias) a technique may rescale or correct.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) node: NodeId,
    /// The weight initializer (read by this node only).
    pub(crate) weight: ValueId,
    /// The weight axis of output channels.
    pub(crate) out_axis: usize,
    /// The weight axis of input channels.
    pub(crate) in_axis: usize,
    /// A depthwise Conv (one input channel per output channel: both on axis 0).
    pub(crate) depthwise: bool,
    /// The input slot of the bias, for ops that have one.
    pub(crate) bias_slot: Option<usize>,
    pub(crate) out_channels: usize,
    pub(crate) in_channels: usize,
    /// The axis of channels in the layer's output tensor.
    pub(crate) output_channel_axis: Option<usize>,
}

/// The f32 data of a static value.
pub(crate) fn f32_data(g: &Graph, v: ValueId) -> Option<ArrayD<f32>> {
    Some(g.static_value(v)?.as_f32()?.to_owned())
}

/// `node` as a rescalable layer, if it is one.
pub(crate) fn layer(g: &Graph, node: NodeId) -> Option<Layer> {
    let n = g.node(node);
    if !n.is_onnx_domain() {
        return None;
    }
    let w = n.input(1)?;
    let data = g.static_value(w)?.as_f32()?;
    if g.use_count(w) != 1 || g.is_output(w) {
        return None;
    }
    let shape = data.shape().to_vec();
    let rank_out = |v: Option<ValueId>| v.and_then(|v| g.value(v).shape.as_ref().map(|s| s.rank()));
    let out_rank = rank_out(n.output(0));
    let (out_axis, in_axis, depthwise, bias_slot, channel_axis) = match n.op_type.as_str() {
        "Conv" => {
            if shape.len() < 3 {
                return None;
            }
            let group = n.int_attr("group", 1).ok()?;
            let depthwise = group > 1 && shape[1] == 1 && usize::try_from(group).ok()? == shape[0];
            if group != 1 && !depthwise {
                return None;
            }
            (0, if depthwise { 0 } else { 1 }, depthwise, Some(2), Some(1))
        }
        "ConvTranspose" => {
            if shape.len() < 3 || n.int_attr("group", 1).ok()? != 1 {
                return None;
            }
            (1, 0, false, Some(2), Some(1))
        }
        "Gemm" => {
            if shape.len() != 2 || n.int_attr("transA", 0).ok()? != 0 {
                return None;
            }
            let tb = n.int_attr("transB", 0).ok()? != 0;
            (usize::from(!tb), usize::from(tb), false, Some(2), Some(1))
        }
        "MatMul" => {
            if shape.len() != 2 || out_rank.is_none_or(|r| r < 2) {
                return None;
            }
            (1, 0, false, None, out_rank.map(|r| r - 1))
        }
        _ => return None,
    };
    let (out_channels, in_channels) = (shape[out_axis], shape[in_axis]);
    if let Some(slot) = bias_slot
        && let Some(b) = n.input(slot)
    {
        let ok = g
            .static_value(b)
            .and_then(|t| t.as_f32())
            .is_some_and(|t| t.ndim() == 1 && t.len() == out_channels);
        if !ok || g.use_count(b) != 1 || g.is_output(b) {
            return None;
        }
    }
    Some(Layer {
        node,
        weight: w,
        out_axis,
        in_axis,
        depthwise,
        bias_slot,
        out_channels,
        in_channels,
        output_channel_axis: channel_axis,
    })
}

/// Whether `w` already lies on an 8-bit integer grid — as a whole, or each slice along
/// `out_axis` on its own (slices of 8 values or more): the weights of a model converted from an integer one or trained with
/// quantization. A group is on a grid when its distinct values, less the smallest, are whole
/// multiples (within 1%) of one step spanning at most 255 of them; the step is tried as the
/// smallest gap, `max|w|/127` (symmetric) and `(max − min)/255` (asymmetric).
pub(crate) fn on_8bit_grid(w: &ArrayD<f32>, out_axis: usize) -> bool {
    fn group_on_grid(values: impl Iterator<Item = f32>) -> bool {
        let mut u: Vec<f64> = values.map(f64::from).collect();
        if u.iter().any(|x| !x.is_finite()) {
            return false;
        }
        u.sort_by(f64::total_cmp);
        u.dedup();
        let (Some(&lo), Some(&hi)) = (u.first(), u.last()) else { return true };
        if u.len() < 2 {
            return true;
        }
        let gap = u.windows(2).map(|p| p[1] - p[0]).fold(f64::INFINITY, f64::min);
        let abs_max = lo.abs().max(hi.abs());
        [gap, abs_max / 127.0, (hi - lo) / 255.0].into_iter().any(|step| {
            step > 0.0
                && (hi - lo) / step <= 255.5
                && u.iter().all(|&x| {
                    let k = (x - lo) / step;
                    (k - k.round()).abs() < 0.01
                })
        })
    }
    if w.len() < 16 {
        return false;
    }
    let per_slice = w.shape().get(out_axis).is_some_and(|&c| c > 0 && w.len() / c >= 8);
    group_on_grid(w.iter().copied())
        || per_slice && w.axis_iter(Axis(out_axis)).all(|lane| group_on_grid(lane.iter().copied()))
}

/// Largest magnitude of each slice of `w` along `axis`.
pub(crate) fn abs_max_along(w: &ArrayD<f32>, axis: usize) -> Vec<f32> {
    w.axis_iter(Axis(axis)).map(|lane| lane.iter().fold(0.0f32, |m, &x| m.max(x.abs()))).collect()
}

/// Multiplies each slice of `w` along `axis` by its factor.
pub(crate) fn scale_along(w: &mut ArrayD<f32>, axis: usize, factors: &[f32]) {
    for (mut lane, &k) in w.axis_iter_mut(Axis(axis)).zip(factors) {
        lane.mapv_inplace(|x| x * k);
    }
}

/// A 1-D f32 tensor.
pub(crate) fn vector(v: Vec<f32>) -> Tensor {
    let n = v.len();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("a 1-D shape matches its length").into_shared())
}

/// The bias of `layer` as f32s (zeros when it has none).
pub(crate) fn bias_of(g: &Graph, layer: &Layer) -> Vec<f32> {
    layer
        .bias_slot
        .and_then(|s| g.node(layer.node).input(s))
        .and_then(|b| f32_data(g, b))
        .map_or_else(|| vec![0.0; layer.out_channels], |b| b.iter().copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(shape: &[usize], f: impl Fn(usize) -> f32) -> ArrayD<f32> {
        let n = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).unwrap()
    }

    #[test]
    fn weights_on_8bit_grids_are_recognised() {
        // Float weights: no grid.
        assert!(!on_8bit_grid(&array(&[4, 3, 3, 3], |i| (i as f32 * 0.77).sin()), 0));
        // Per-channel symmetric int8 (each channel its own scale, its largest value ±127), as
        // converted TFLite models hold.
        let per_channel = array(&[4, 3, 3, 3], |i| {
            let q = if i % 27 == 0 { 127.0 } else { ((i * 37 % 255) as i32 - 127) as f32 };
            q * [0.011, 0.0023, 0.3, 0.07][i / 27]
        });
        assert!(on_8bit_grid(&per_channel, 0));
        // Per-tensor asymmetric uint8 (one scale and zero point), as quantization-aware training leaves.
        let per_tensor = array(&[8, 4, 1, 1], |i| ((i * 53 % 256) as f32 - 131.0) * 0.0042);
        assert!(on_8bit_grid(&per_tensor, 0));
        // Too few values to tell.
        assert!(!on_8bit_grid(&array(&[2, 2], |i| i as f32), 0));
    }
}
