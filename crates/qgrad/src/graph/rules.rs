//! One vector-Jacobian rule per op: from the gradients by a node's outputs, the gradients by
//! those of its inputs that need one. Weighted layers go through [`Linear`] (Conv) or plain
//! products (Gemm, MatMul); elementwise ops broadcast as ONNX does and reduce back; movement ops
//! route the gradient to where each element came from.

use ndarray::{Array2, ArrayD, ArrayViewD, Axis, Ix2, IxDyn, Slice, Zip};
use qgraph::{Model, Node, Tensor};

use super::{ForwardValues, pool, reduce_to, unsupported};
use crate::activation::hard_swish_derivative;
use crate::error::{GradError, Result, shape_error};
use crate::linear::{ConvGeometry, Linear};

/// A node's forward values and output gradients.
pub(super) struct NodeGrad<'a> {
    pub model: &'a Model,
    pub node: &'a Node,
    values: &'a dyn ForwardValues,
    dys: Vec<Option<ArrayD<f32>>>,
    need: Vec<bool>,
}

type Grads = Vec<Option<ArrayD<f32>>>;

impl<'a> NodeGrad<'a> {
    pub fn new(
        model: &'a Model,
        node: &'a Node,
        values: &'a dyn ForwardValues,
        dys: Vec<Option<ArrayD<f32>>>,
        need: Vec<bool>,
    ) -> Result<NodeGrad<'a>> {
        Ok(NodeGrad { model, node, values, dys, need })
    }

    fn op(&self) -> &str {
        &self.node.name
    }

    fn missing(&self, what: &str) -> GradError {
        shape_error(self.op(), format!("the forward run did not keep {what}"))
    }

    /// Input `slot` as the node read it.
    fn input(&self, slot: usize) -> Result<&'a Tensor> {
        let v = self.node.input(slot).ok_or_else(|| self.missing(&format!("input {slot}")))?;
        self.values
            .read(v)
            .or_else(|| self.model.graph.static_value(v))
            .ok_or_else(|| self.missing(&format!("'{}'", self.model.graph.value(v).name)))
    }

    fn has_input(&self, slot: usize) -> bool {
        self.node.input(slot).is_some()
    }

    /// Input `slot` as f32.
    pub fn x(&self, slot: usize) -> Result<ArrayViewD<'a, f32>> {
        let t = self.input(slot)?;
        t.as_f32().map(|a| a.view()).ok_or_else(|| GradError::Unsupported {
            op: format!("{} ({})", self.node.name, self.node.op_type),
            detail: format!("input {slot} is {:?}; gradients flow through f32 only", t.dtype()),
        })
    }

    /// Output `slot` as the node computed it.
    fn y(&self, slot: usize) -> Result<ArrayViewD<'a, f32>> {
        let v = self.node.output(slot).ok_or_else(|| self.missing(&format!("output {slot}")))?;
        let t = self
            .values
            .produced(v)
            .ok_or_else(|| self.missing(&format!("'{}'", self.model.graph.value(v).name)))?;
        t.as_f32().map(|a| a.view()).ok_or_else(|| self.missing("an f32 output"))
    }

    /// The gradient by output `slot` (zeros when nothing downstream needs that output).
    pub fn dy(&self, slot: usize) -> Result<ArrayD<f32>> {
        match self.dys.get(slot).and_then(Option::as_ref) {
            Some(d) => Ok(d.clone()),
            None => Ok(ArrayD::zeros(self.y(slot)?.raw_dim())),
        }
    }

    fn needs(&self, slot: usize) -> bool {
        self.need.get(slot).copied().unwrap_or(false)
    }

    /// A static or computed integer input, if present.
    fn ints(&self, slot: usize) -> Result<Option<Vec<i64>>> {
        if !self.has_input(slot) {
            return Ok(None);
        }
        let t = self.input(slot)?;
        t.to_i64_vec().map(Some).ok_or_else(|| shape_error(self.op(), format!("input {slot} is not integer")))
    }

    fn scalar(&self, slot: usize) -> Result<Option<f32>> {
        if !self.has_input(slot) {
            return Ok(None);
        }
        Ok(self.x(slot)?.iter().next().copied())
    }

    fn unsupported(&self, detail: impl Into<String>) -> GradError {
        unsupported(&self.node.name, &self.node.op_type, detail)
    }

    /// A normalized axis of a tensor of `rank`.
    fn axis(&self, axis: i64, rank: usize) -> Result<usize> {
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if (0..rank as i64).contains(&a) {
            Ok(a as usize)
        } else {
            Err(shape_error(self.op(), format!("axis {axis} of a rank-{rank} tensor")))
        }
    }
}

/// The gradients by `ctx.node`'s inputs (`None` where not needed).
pub(super) fn vjp(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let n = ctx.node.inputs().len();
    let only = |dx: ArrayD<f32>| -> Grads {
        let mut v = vec![None; n];
        if let Some(first) = v.first_mut() {
            *first = Some(dx);
        }
        v
    };
    if !ctx.node.is_onnx_domain() {
        return Err(ctx.unsupported(format!("domain '{}'", ctx.node.domain)));
    }
    match ctx.node.op_type.as_str() {
        "Identity" | "Dropout" => Ok(only(ctx.dy(0)?)),
        "Cast" | "CastLike" => {
            if ctx.y(0).is_err() {
                return Err(ctx.unsupported("a cast to a type other than f32"));
            }
            ctx.x(0)?;
            Ok(only(ctx.dy(0)?))
        }
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
            let x = ctx.x(0)?;
            let dy = ctx.dy(0)?.as_standard_layout().to_owned();
            let dx = dy
                .into_shape_with_order(IxDyn(x.shape()))
                .map_err(|e| shape_error(ctx.op(), e.to_string()))?;
            Ok(only(dx))
        }
        "Expand" => Ok(only(reduce_to(ctx.dy(0)?, ctx.x(0)?.shape(), ctx.op())?)),
        "Transpose" => {
            let rank = ctx.x(0)?.ndim();
            let perm: Vec<usize> = match ctx.node.ints_attr("perm")? {
                Some(p) => p.iter().map(|&a| ctx.axis(a, rank)).collect::<Result<_>>()?,
                None => (0..rank).rev().collect(),
            };
            let mut inverse = vec![0; rank];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            let dx = ctx.dy(0)?.permuted_axes(IxDyn(&inverse)).as_standard_layout().to_owned();
            Ok(only(dx))
        }
        "Concat" => concat(ctx),
        "Split" => split(ctx),
        "Slice" => slice(ctx).map(only),
        "Gather" => gather(ctx),
        "Pad" => pad(ctx),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => binary(ctx),
        "Sum" => {
            let dy = ctx.dy(0)?;
            (0..n)
                .map(|i| {
                    if ctx.needs(i) {
                        reduce_to(dy.clone(), ctx.x(i)?.shape(), ctx.op()).map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect()
        }
        "Neg" => unary(ctx, |_, _| -1.0).map(only),
        "Relu" => unary(ctx, |x, _| if x > 0.0 { 1.0 } else { 0.0 }).map(only),
        "LeakyRelu" => {
            let alpha = ctx.node.float_attr("alpha", 0.01)?;
            unary(ctx, move |x, _| if x > 0.0 { 1.0 } else { alpha }).map(only)
        }
        "Elu" => {
            let alpha = ctx.node.float_attr("alpha", 1.0)?;
            unary(ctx, move |x, y| if x > 0.0 { 1.0 } else { y + alpha }).map(only)
        }
        "Clip" => clip(ctx),
        "Sigmoid" => unary(ctx, |_, y| y * (1.0 - y)).map(only),
        "Tanh" => unary(ctx, |_, y| 1.0 - y * y).map(only),
        "HardSigmoid" => {
            let alpha = ctx.node.float_attr("alpha", 0.2)?;
            let beta = ctx.node.float_attr("beta", 0.5)?;
            unary(ctx, move |x, _| {
                let t = alpha * x + beta;
                if t > 0.0 && t < 1.0 { alpha } else { 0.0 }
            })
            .map(only)
        }
        "HardSwish" => unary(ctx, |x, _| hard_swish_derivative(x)).map(only),
        "Softplus" => unary(ctx, |x, _| 1.0 / (1.0 + (-x).exp())).map(only),
        "Erf" => unary(ctx, |x, _| std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp()).map(only),
        "Gelu" => {
            let tanh = ctx.node.string_attr("approximate")?.unwrap_or("none") == "tanh";
            unary(ctx, move |x, _| gelu_derivative(x, tanh)).map(only)
        }
        "Exp" => unary(ctx, |_, y| y).map(only),
        "Log" => unary(ctx, |x, _| 1.0 / x).map(only),
        "Sqrt" => unary(ctx, |_, y| 0.5 / y).map(only),
        "Reciprocal" => unary(ctx, |_, y| -y * y).map(only),
        "Abs" => unary(ctx, |x, _| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        })
        .map(only),
        "PRelu" => prelu(ctx),
        "Softmax" | "LogSoftmax" => softmax(ctx).map(only),
        "Conv" => conv(ctx),
        "ConvTranspose" => conv_transpose(ctx),
        "Gemm" => gemm(ctx),
        "MatMul" => matmul(ctx),
        "BatchNormalization" => batch_norm(ctx),
        "LayerNormalization" => layer_norm(ctx),
        "MaxPool" => pool::pool(ctx, true).map(only),
        "AveragePool" => pool::pool(ctx, false).map(only),
        "GlobalAveragePool" => pool::global_pool(ctx, false).map(only),
        "GlobalMaxPool" => pool::global_pool(ctx, true).map(only),
        "ReduceMean" | "ReduceSum" => reduce(ctx).map(only),
        other => Err(ctx.unsupported(format!("{other} has no rule yet"))),
    }
}

/// `dx = dy · f'(x, y)` elementwise (`y` the output as computed).
fn unary(ctx: &NodeGrad<'_>, derivative: impl Fn(f32, f32) -> f32) -> Result<ArrayD<f32>> {
    let x = ctx.x(0)?;
    let y = ctx.y(0)?;
    let mut dy = ctx.dy(0)?;
    if x.shape() != dy.shape() || y.shape() != dy.shape() {
        return Err(shape_error(ctx.op(), format!("input {:?}, output {:?}", x.shape(), y.shape())));
    }
    Zip::from(&mut dy).and(&x).and(&y).for_each(|g, &x, &y| *g *= derivative(x, y));
    Ok(dy)
}

fn gelu_derivative(x: f32, tanh: bool) -> f32 {
    if tanh {
        let c = (2.0 / std::f32::consts::PI).sqrt();
        let u = c * (x + 0.044715 * x * x * x);
        let t = u.tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    } else {
        let cdf = 0.5 * (1.0 + qkernels::fastmath::erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
        cdf + x * pdf
    }
}

/// Clip: the gradient passes inside the bounds; a bound given as an input gets what its side
/// clamps.
fn clip(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let (lo, hi) = if ctx.model.default_opset() >= 11 {
        (ctx.scalar(1)?.unwrap_or(f32::NEG_INFINITY), ctx.scalar(2)?.unwrap_or(f32::INFINITY))
    } else {
        (ctx.node.float_attr("min", f32::NEG_INFINITY)?, ctx.node.float_attr("max", f32::INFINITY)?)
    };
    let mut out = vec![None; ctx.node.inputs().len()];
    let x = ctx.x(0)?;
    let dy = ctx.dy(0)?;
    for (slot, below) in [(1, true), (2, false)] {
        if ctx.needs(slot) {
            let sum: f32 = x
                .iter()
                .zip(&dy)
                .filter(|(x, _)| if below { **x < lo } else { **x > hi })
                .map(|(_, g)| g)
                .sum();
            let shape = ctx.x(slot)?.raw_dim();
            out[slot] = Some(ArrayD::from_elem(shape, sum));
        }
    }
    out[0] = Some(unary(ctx, move |x, _| if x >= lo && x <= hi { 1.0 } else { 0.0 })?);
    Ok(out)
}

fn prelu(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let slope = ctx.x(1)?;
    let dy = ctx.dy(0)?;
    let op = ctx.op();
    // An opset ≤ 6 slope of shape [C] is per channel (axis 1).
    let slope_b = if slope.ndim() == 1 && x.ndim() > 2 && slope.len() == x.shape()[1] && slope.len() > 1 {
        let mut shape = vec![1; x.ndim() - 1];
        shape[0] = slope.len();
        slope.to_owned().into_shape_with_order(IxDyn(&shape)).map_err(|e| shape_error(op, e.to_string()))?
    } else {
        slope.to_owned()
    };
    let s = slope_b.broadcast(x.raw_dim()).ok_or_else(|| shape_error(op, "slope does not broadcast"))?;
    let mut dx = dy.clone();
    Zip::from(&mut dx).and(&x).and(&s).for_each(|g, &x, &s| {
        if x <= 0.0 {
            *g *= s
        }
    });
    let mut ds = dy;
    Zip::from(&mut ds).and(&x).for_each(|g, &x| *g = if x < 0.0 { *g * x } else { 0.0 });
    let ds = reduce_to(ds, slope_b.shape(), op)?
        .into_shape_with_order(IxDyn(slope.shape()))
        .map_err(|e| shape_error(op, e.to_string()))?;
    Ok(vec![Some(dx), ctx.needs(1).then_some(ds)])
}

fn binary(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let a = ctx.x(0)?;
    let b = ctx.x(1)?;
    let dy = ctx.dy(0)?;
    let op = ctx.op();
    let bcast = |t: &ArrayViewD<'_, f32>| -> Result<ArrayD<f32>> {
        t.broadcast(dy.raw_dim())
            .map(|v| v.to_owned())
            .ok_or_else(|| shape_error(op, format!("{:?} does not broadcast to {:?}", t.shape(), dy.shape())))
    };
    let (da, db) = match ctx.node.op_type.as_str() {
        "Add" => (dy.clone(), dy),
        "Sub" => (dy.clone(), -dy),
        "Mul" => (&dy * &bcast(&b)?, &dy * &bcast(&a)?),
        "Div" => {
            let bb = bcast(&b)?;
            let da = &dy / &bb;
            let mut db = bcast(&a)?;
            Zip::from(&mut db).and(&bb).and(&dy).for_each(|v, &b, &g| *v = -g * *v / (b * b));
            (da, db)
        }
        _ => {
            // Pow.
            let (aa, bb) = (bcast(&a)?, bcast(&b)?);
            let mut da = dy.clone();
            Zip::from(&mut da).and(&aa).and(&bb).for_each(|g, &a, &b| *g *= b * a.powf(b - 1.0));
            let mut db = dy;
            Zip::from(&mut db)
                .and(&aa)
                .and(&bb)
                .for_each(|g, &a, &b| *g = if a > 0.0 { *g * a.powf(b) * a.ln() } else { 0.0 });
            (da, db)
        }
    };
    Ok(vec![
        if ctx.needs(0) { Some(reduce_to(da, a.shape(), op)?) } else { None },
        if ctx.needs(1) { Some(reduce_to(db, b.shape(), op)?) } else { None },
    ])
}

fn softmax(ctx: &NodeGrad<'_>) -> Result<ArrayD<f32>> {
    let y = ctx.y(0)?;
    let dy = ctx.dy(0)?;
    let rank = y.ndim();
    let opset = ctx.model.default_opset();
    let default_axis = if opset >= 13 { -1 } else { 1 };
    let axis = ctx.axis(ctx.node.int_attr("axis", default_axis)?, rank.max(1))?;
    let shape = y.shape().to_vec();
    // Before opset 13 the op works on the input flattened to 2-D at `axis`.
    let (y2, dy2, ax) = if opset < 13 {
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis..].iter().product();
        let to2 = |a: ArrayD<f32>| a.into_shape_with_order(IxDyn(&[outer, inner]));
        let y2 = to2(y.as_standard_layout().to_owned()).map_err(|e| shape_error(ctx.op(), e.to_string()))?;
        let d2 = to2(dy.as_standard_layout().to_owned()).map_err(|e| shape_error(ctx.op(), e.to_string()))?;
        (y2, d2, 1)
    } else {
        (y.to_owned(), dy, axis)
    };
    let dx = if ctx.node.op_type == "Softmax" {
        let s = (&dy2 * &y2).sum_axis(Axis(ax)).insert_axis(Axis(ax));
        &y2 * &(&dy2 - &s)
    } else {
        let s = dy2.sum_axis(Axis(ax)).insert_axis(Axis(ax));
        &dy2 - &(&y2.mapv(f32::exp) * &s)
    };
    dx.into_shape_with_order(IxDyn(&shape)).map_err(|e| shape_error(ctx.op(), e.to_string()))
}

fn conv(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let w = ctx.x(1)?;
    let dy = ctx.dy(0)?;
    let layer = Linear::from_node(ctx.node, x.shape(), w.shape())?.with_threads(rayon::current_num_threads());
    let cols = layer.columns(x)?;
    let dy_cm = layer.to_channel_major(dy.view())?;
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let dx = if ctx.needs(0) { Some(layer.input_grad(ws, &dy_cm, &cols)?) } else { None };
    let dw = if ctx.needs(1) {
        let mut dw = vec![0.0f32; ws.len()];
        layer.weight_grad(&dy_cm, &cols, &mut dw)?;
        Some(ArrayD::from_shape_vec(IxDyn(w.shape()), dw).expect("sizes agree"))
    } else {
        None
    };
    let db = if ctx.needs(2) {
        let b = layer.bias_grad(&dy_cm, cols.width());
        Some(ArrayD::from_shape_vec(IxDyn(&[b.len()]), b).expect("sizes agree"))
    } else {
        None
    };
    Ok(vec![dx, dw, db])
}

/// ConvTranspose through the convolution it is the adjoint of (see
/// [`ConvGeometry::adjoint_of_transpose`]).
fn conv_transpose(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let w = ctx.x(1)?;
    let dy = ctx.dy(0)?;
    let geometry = ConvGeometry::adjoint_of_transpose(ctx.node, x.shape(), w.shape(), dy.shape())?;
    let layer = Linear::conv(ctx.op(), geometry).with_threads(rayon::current_num_threads());
    let cols = layer.columns(dy.view())?;
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let dx = if ctx.needs(0) {
        let mut out = vec![0.0f32; x.len()];
        layer.forward(ws, None, &cols, &mut out)?;
        Some(layer.from_channel_major(&out, &cols))
    } else {
        None
    };
    let dw = if ctx.needs(1) {
        let x_cm = layer.to_channel_major(x.view())?;
        let mut dw = vec![0.0f32; ws.len()];
        layer.weight_grad(&x_cm, &cols, &mut dw)?;
        Some(ArrayD::from_shape_vec(IxDyn(w.shape()), dw).expect("sizes agree"))
    } else {
        None
    };
    let db = if ctx.needs(2) {
        let channels = dy.shape()[1];
        let spatial: usize = dy.shape()[2..].iter().product();
        let mut b = vec![0.0f32; channels];
        for (i, v) in dy.as_standard_layout().iter().enumerate() {
            b[(i / spatial.max(1)) % channels.max(1)] += v;
        }
        Some(ArrayD::from_shape_vec(IxDyn(&[channels]), b).expect("sizes agree"))
    } else {
        None
    };
    Ok(vec![dx, dw, db])
}

fn two_d<'b>(a: &'b ArrayViewD<'b, f32>, op: &str) -> Result<ndarray::ArrayView2<'b, f32>> {
    a.view().into_dimensionality::<Ix2>().map_err(|_| shape_error(op, format!("{:?} is not 2-D", a.shape())))
}

fn gemm(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let op = ctx.op();
    let node = ctx.node;
    let (ta, tb) = (node.int_attr("transA", 0)? != 0, node.int_attr("transB", 0)? != 0);
    let alpha = node.float_attr("alpha", 1.0)?;
    let beta = node.float_attr("beta", 1.0)?;
    let (a, b) = (ctx.x(0)?, ctx.x(1)?);
    let (a, b) = (two_d(&a, op)?, two_d(&b, op)?);
    let dy = ctx.dy(0)?;
    let dy = dy.view().into_dimensionality::<Ix2>().map_err(|_| shape_error(op, "output is not 2-D"))?;
    let a_op = if ta { a.t() } else { a.view() };
    let b_op = if tb { b.t() } else { b.view() };
    let da = ctx.needs(0).then(|| {
        let d: Array2<f32> = dy.dot(&b_op.t()) * alpha;
        if ta { d.reversed_axes().as_standard_layout().to_owned() } else { d }
    });
    let db = ctx.needs(1).then(|| {
        let d: Array2<f32> = a_op.t().dot(&dy) * alpha;
        if tb { d.reversed_axes().as_standard_layout().to_owned() } else { d }
    });
    let dc = if ctx.needs(2) {
        Some(reduce_to(dy.to_owned().into_dyn() * beta, ctx.x(2)?.shape(), op)?)
    } else {
        None
    };
    Ok(vec![da.map(|d| d.into_dyn()), db.map(|d| d.into_dyn()), dc])
}

fn matmul(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let op = ctx.op();
    let (a, b) = (ctx.x(0)?, ctx.x(1)?);
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err(shape_error(op, "a scalar operand"));
    }
    // Promote 1-D operands as ONNX (numpy) does.
    let a2 = if a.ndim() == 1 { a.clone().insert_axis(Axis(0)) } else { a.clone() };
    let b2 = if b.ndim() == 1 { b.clone().insert_axis(Axis(1)) } else { b.clone() };
    let (ra, rb) = (a2.ndim(), b2.ndim());
    let (m, k, n) = (a2.shape()[ra - 2], a2.shape()[ra - 1], b2.shape()[rb - 1]);
    if b2.shape()[rb - 2] != k {
        return Err(shape_error(op, format!("{:?} by {:?}", a.shape(), b.shape())));
    }
    let batch_rank = (ra - 2).max(rb - 2);
    let mut batch = vec![1usize; batch_rank];
    for (i, d) in batch.iter_mut().enumerate() {
        let da = (i + ra - 2).checked_sub(batch_rank).map_or(1, |j| a2.shape()[j]);
        let db = (i + rb - 2).checked_sub(batch_rank).map_or(1, |j| b2.shape()[j]);
        *d = if da == 1 { db } else { da };
        if da != db && da != 1 && db != 1 {
            return Err(shape_error(
                op,
                format!("{:?} by {:?}: batch dims do not broadcast", a.shape(), b.shape()),
            ));
        }
    }
    let full = |t: &ArrayViewD<'_, f32>, rows: usize, cols: usize| -> Result<ArrayD<f32>> {
        let mut shape = batch.clone();
        shape.extend([rows, cols]);
        t.broadcast(IxDyn(&shape))
            .map(|v| v.as_standard_layout().to_owned())
            .ok_or_else(|| shape_error(op, "batch dims do not broadcast"))
    };
    let count: usize = batch.iter().product();
    let a3 =
        full(&a2, m, k)?.into_shape_with_order((count, m, k)).map_err(|e| shape_error(op, e.to_string()))?;
    let b3 =
        full(&b2, k, n)?.into_shape_with_order((count, k, n)).map_err(|e| shape_error(op, e.to_string()))?;
    let dy = ctx.dy(0)?.as_standard_layout().to_owned();
    let dy3 = dy.into_shape_with_order((count, m, n)).map_err(|e| shape_error(op, e.to_string()))?;
    let mut da = ndarray::Array3::<f32>::zeros((count, m, k));
    let mut db = ndarray::Array3::<f32>::zeros((count, k, n));
    for i in 0..count {
        let g = dy3.index_axis(Axis(0), i);
        if ctx.needs(0) {
            da.index_axis_mut(Axis(0), i).assign(&g.dot(&b3.index_axis(Axis(0), i).t()));
        }
        if ctx.needs(1) {
            db.index_axis_mut(Axis(0), i).assign(&a3.index_axis(Axis(0), i).t().dot(&g));
        }
    }
    let back = |d: ndarray::Array3<f32>,
                rows: usize,
                cols: usize,
                orig: &[usize],
                promoted: &[usize]|
     -> Result<ArrayD<f32>> {
        let mut shape = batch.clone();
        shape.extend([rows, cols]);
        let d = d.into_shape_with_order(IxDyn(&shape)).map_err(|e| shape_error(op, e.to_string()))?;
        reduce_to(d, promoted, op)?
            .into_shape_with_order(IxDyn(orig))
            .map_err(|e| shape_error(op, e.to_string()))
    };
    Ok(vec![
        if ctx.needs(0) { Some(back(da, m, k, a.shape(), a2.shape())?) } else { None },
        if ctx.needs(1) { Some(back(db, k, n, b.shape(), b2.shape())?) } else { None },
    ])
}

/// A per-channel vector of `x`'s channel axis 1, shaped to broadcast against `x`.
fn per_channel(v: ArrayD<f32>, rank: usize, op: &str) -> Result<ArrayD<f32>> {
    let mut shape = vec![1; rank.max(2) - 1];
    shape[0] = v.len();
    v.into_shape_with_order(IxDyn(&shape)).map_err(|e| shape_error(op, e.to_string()))
}

fn batch_norm(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let op = ctx.op();
    if ctx.node.outputs().iter().skip(1).any(Option::is_some) {
        return Err(ctx.unsupported("training mode (running statistics as outputs)"));
    }
    let x = ctx.x(0)?;
    let eps = ctx.node.float_attr("epsilon", 1e-5)?;
    let (scale, mean, var) = (ctx.x(1)?, ctx.x(3)?, ctx.x(4)?);
    let inv_std = var.mapv(|v| 1.0 / (v + eps).sqrt());
    let rank = x.ndim();
    let k = per_channel(&scale.to_owned() * &inv_std, rank, op)?;
    let dy = ctx.dy(0)?;
    let dx = ctx.needs(0).then(|| &dy * &k);
    let x_hat = (&x - &per_channel(mean.to_owned(), rank, op)?) * &per_channel(inv_std.clone(), rank, op)?;
    let channel_shape = per_channel(ArrayD::zeros(IxDyn(&[scale.len()])), rank, op)?.shape().to_vec();
    let sum_channels = |a: ArrayD<f32>| -> Result<ArrayD<f32>> {
        let r = reduce_to(a, &channel_shape, op)?;
        r.into_shape_with_order(IxDyn(&[scale.len()])).map_err(|e| shape_error(op, e.to_string()))
    };
    let dscale = if ctx.needs(1) { Some(sum_channels(&dy * &x_hat)?) } else { None };
    let dbias = if ctx.needs(2) { Some(sum_channels(dy.clone())?) } else { None };
    // The statistics are inputs too: their gradients, for completeness.
    let dmean = if ctx.needs(3) { Some(sum_channels(&dy * &(-&k))?) } else { None };
    let dvar = if ctx.needs(4) {
        let half_inv_var = per_channel(inv_std.mapv(|s| -0.5 * s * s), rank, op)?;
        Some(sum_channels(&(&dy * &x_hat) * &(&per_channel(scale.to_owned(), rank, op)? * &half_inv_var))?)
    } else {
        None
    };
    Ok(vec![dx, dscale, dbias, dmean, dvar])
}

fn layer_norm(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let op = ctx.op();
    if ctx.node.outputs().iter().skip(1).any(Option::is_some) {
        return Err(ctx.unsupported("mean and inverse deviation as outputs"));
    }
    let x = ctx.x(0)?;
    let rank = x.ndim();
    let axis = ctx.axis(ctx.node.int_attr("axis", -1)?, rank)?;
    let eps = ctx.node.float_attr("epsilon", 1e-5)?;
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis..].iter().product();
    let to2 = |a: ArrayD<f32>| -> Result<Array2<f32>> {
        a.into_shape_with_order((outer, inner)).map_err(|e| shape_error(op, e.to_string()))
    };
    let x2 = to2(x.as_standard_layout().to_owned())?;
    let scale = ctx
        .x(1)?
        .broadcast(IxDyn(&x.shape()[axis..]))
        .map(|s| s.iter().copied().collect::<Vec<f32>>())
        .ok_or_else(|| shape_error(op, "scale does not broadcast"))?;
    let dy2 = to2(ctx.dy(0)?.as_standard_layout().to_owned())?;
    let mut dx = Array2::<f32>::zeros((outer, inner));
    let mut dscale = vec![0.0f32; inner];
    let mut dbias = vec![0.0f32; inner];
    for r in 0..outer {
        let row = x2.row(r);
        let mean = row.sum() / inner as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / inner as f32;
        let inv = 1.0 / (var + eps).sqrt();
        let xh: Vec<f32> = row.iter().map(|v| (v - mean) * inv).collect();
        let g: Vec<f32> = dy2.row(r).iter().zip(&scale).map(|(d, s)| d * s).collect();
        let g_mean = g.iter().sum::<f32>() / inner as f32;
        let gx_mean = g.iter().zip(&xh).map(|(g, x)| g * x).sum::<f32>() / inner as f32;
        for i in 0..inner {
            dx[[r, i]] = inv * (g[i] - g_mean - xh[i] * gx_mean);
            dscale[i] += dy2[[r, i]] * xh[i];
            dbias[i] += dy2[[r, i]];
        }
    }
    let norm_shape = IxDyn(&x.shape()[axis..]);
    let fit = |v: Vec<f32>, slot: usize| -> Result<Option<ArrayD<f32>>> {
        if !ctx.needs(slot) {
            return Ok(None);
        }
        let full = ArrayD::from_shape_vec(norm_shape.clone(), v).expect("sizes agree");
        Ok(Some(reduce_to(full, ctx.x(slot)?.shape(), op)?))
    };
    let dx = dx.into_shape_with_order(IxDyn(x.shape())).map_err(|e| shape_error(op, e.to_string()))?;
    Ok(vec![Some(dx), fit(dscale, 1)?, fit(dbias, 2)?])
}

fn reduce(ctx: &NodeGrad<'_>) -> Result<ArrayD<f32>> {
    let x = ctx.x(0)?;
    let rank = x.ndim();
    let from_input =
        ctx.node.op_type == "ReduceSum" && ctx.model.default_opset() >= 13 || ctx.model.default_opset() >= 18;
    let axes = if from_input { ctx.ints(1)? } else { ctx.node.ints_attr("axes")?.map(<[i64]>::to_vec) };
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&a| ctx.axis(a, rank)).collect::<Result<_>>()?,
        _ if ctx.node.int_attr("noop_with_empty_axes", 0)? != 0 => return ctx.dy(0),
        _ => (0..rank).collect(),
    };
    let mut kept = x.shape().to_vec();
    for &a in &axes {
        kept[a] = 1;
    }
    let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
    let dy = ctx.dy(0)?.as_standard_layout().to_owned();
    let dy = dy.into_shape_with_order(IxDyn(&kept)).map_err(|e| shape_error(ctx.op(), e.to_string()))?;
    let mut dx = dy
        .broadcast(x.raw_dim())
        .map(|v| v.to_owned())
        .ok_or_else(|| shape_error(ctx.op(), "gradient does not broadcast back"))?;
    if ctx.node.op_type == "ReduceMean" {
        dx /= count.max(1) as f32;
    }
    Ok(dx)
}

fn concat(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let dy = ctx.dy(0)?;
    let axis = ctx.axis(ctx.node.int_attr("axis", 0)?, dy.ndim())?;
    let mut start = 0usize;
    let mut out = Vec::with_capacity(ctx.node.inputs().len());
    for slot in 0..ctx.node.inputs().len() {
        let len = ctx.input(slot)?.shape().get(axis).copied().unwrap_or(0);
        let part = dy.slice_axis(Axis(axis), Slice::from(start..start + len)).to_owned();
        out.push(ctx.needs(slot).then_some(part));
        start += len;
    }
    Ok(out)
}

fn split(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let axis = ctx.axis(ctx.node.int_attr("axis", 0)?, x.ndim())?;
    let parts: Vec<ArrayD<f32>> =
        (0..ctx.node.outputs().len()).map(|slot| ctx.dy(slot)).collect::<Result<_>>()?;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let dx = ndarray::concatenate(Axis(axis), &views).map_err(|e| shape_error(ctx.op(), e.to_string()))?;
    if dx.shape() != x.shape() {
        return Err(shape_error(ctx.op(), "outputs do not cover the input"));
    }
    let mut out = vec![None; ctx.node.inputs().len()];
    out[0] = Some(dx);
    Ok(out)
}

fn slice(ctx: &NodeGrad<'_>) -> Result<ArrayD<f32>> {
    let x = ctx.x(0)?;
    let rank = x.ndim();
    let (starts, ends, axes, steps) = if ctx.model.default_opset() >= 10 {
        (ctx.ints(1)?.unwrap_or_default(), ctx.ints(2)?.unwrap_or_default(), ctx.ints(3)?, ctx.ints(4)?)
    } else {
        let attr = |n: &str| ctx.node.ints_attr(n).map(|v| v.map(<[i64]>::to_vec));
        (attr("starts")?.unwrap_or_default(), attr("ends")?.unwrap_or_default(), attr("axes")?, None)
    };
    let axes: Vec<i64> = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(shape_error(ctx.op(), "starts, ends, axes and steps differ in length"));
    }
    let mut slices = vec![Slice::from(..); rank];
    for i in 0..starts.len() {
        let a = ctx.axis(axes[i], rank)?;
        let dim = x.shape()[a] as i64;
        let step = steps[i];
        if step == 0 {
            return Err(shape_error(ctx.op(), "step 0"));
        }
        let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        slices[a] = if step > 0 {
            let s = norm(starts[i]).clamp(0, dim);
            let e = norm(ends[i]).clamp(0, dim).max(s);
            Slice::new(s as isize, Some(e as isize), step as isize)
        } else {
            let s = norm(starts[i]).clamp(0, dim - 1);
            let e = norm(ends[i]).clamp(-1, dim - 1);
            if s <= e {
                Slice::new(0, Some(0), 1)
            } else {
                Slice::new((e + 1) as isize, Some((s + 1) as isize), step as isize)
            }
        };
    }
    let dy = ctx.dy(0)?;
    let mut dx = ArrayD::<f32>::zeros(x.raw_dim());
    let mut view = dx.slice_each_axis_mut(|ax| slices[ax.axis.index()]);
    if view.shape() != dy.shape() {
        return Err(shape_error(
            ctx.op(),
            format!("slice {:?} against output {:?}", view.shape(), dy.shape()),
        ));
    }
    view.assign(&dy);
    Ok(dx)
}

fn gather(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let rank = x.ndim();
    let axis = ctx.axis(ctx.node.int_attr("axis", 0)?, rank)?;
    let idx = ctx.ints(1)?.unwrap_or_default();
    let dim = x.shape()[axis];
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let dy = ctx.dy(0)?.as_standard_layout().to_owned();
    if dy.len() != outer * idx.len() * inner {
        return Err(shape_error(ctx.op(), format!("output {:?} for {} indices", dy.shape(), idx.len())));
    }
    let dys = dy.as_slice().expect("standard layout");
    let mut dx = vec![0.0f32; x.len()];
    for (j, &i) in idx.iter().enumerate() {
        let i = if i < 0 { i + dim as i64 } else { i };
        if !(0..dim as i64).contains(&i) {
            return Err(shape_error(ctx.op(), format!("index {i} out of {dim}")));
        }
        for o in 0..outer {
            let src = &dys[(o * idx.len() + j) * inner..][..inner];
            let dst = &mut dx[(o * dim + i as usize) * inner..][..inner];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    }
    let mut out = vec![None; ctx.node.inputs().len()];
    out[0] = Some(ArrayD::from_shape_vec(IxDyn(x.shape()), dx).expect("sizes agree"));
    Ok(out)
}

fn pad(ctx: &NodeGrad<'_>) -> Result<Grads> {
    let x = ctx.x(0)?;
    let rank = x.ndim();
    let mode = ctx.node.string_attr("mode")?.unwrap_or("constant");
    if mode != "constant" {
        return Err(ctx.unsupported(format!("mode {mode}")));
    }
    let pads = if ctx.model.default_opset() >= 11 {
        ctx.ints(1)?.unwrap_or_default()
    } else {
        ctx.node.ints_attr("pads")?.map(<[i64]>::to_vec).unwrap_or_default()
    };
    let axes: Vec<usize> = match ctx.ints(3)? {
        Some(a) => a.iter().map(|&a| ctx.axis(a, rank)).collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
        return Err(ctx.unsupported(format!("pads {pads:?} (negative pads crop)")));
    }
    let mut slices = vec![Slice::from(..); rank];
    for (i, &a) in axes.iter().enumerate() {
        let b = pads[i] as isize;
        slices[a] = Slice::new(b, Some(b + x.shape()[a] as isize), 1);
    }
    let dy = ctx.dy(0)?;
    let dx = dy.slice_each_axis(|ax| slices[ax.axis.index()]).to_owned();
    let mut out = vec![None; ctx.node.inputs().len()];
    out[0] = Some(dx);
    Ok(out)
}
