//! Data-movement and shape ops: Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Concat, Split, Slice,
//! Gather, Expand, Tile, Pad, Shape, Size, Range, ConstantOfShape, Constant, Depth/SpaceToDepth.
//! Their integer values are computed when known, which resolves shape sub-graphs at load time.

use ndarray::{ArrayD, Axis, IxDyn};

use super::{Fact, OpSpec, foldable, input_ints, int_array, int_tensor, normalize_axis, required};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::Node;
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;

pub(super) fn spec(op: &str) -> Option<&'static dyn OpSpec> {
    Some(match op {
        "Reshape" => &ReshapeOp,
        "Flatten" => &FlattenOp,
        "Transpose" => &TransposeOp,
        "Squeeze" => &SqueezeOp,
        "Unsqueeze" => &UnsqueezeOp,
        "Concat" => &ConcatOp,
        "Split" => &SplitOp,
        "Slice" => &SliceOp,
        "Gather" => &GatherOp,
        "GatherElements" => &GatherElementsOp,
        "Expand" => &ExpandOp,
        "Tile" => &TileOp,
        "Pad" => &PadOp,
        "Shape" => &ShapeOp,
        "Size" => &SizeOp,
        "Range" => &RangeOp,
        "ConstantOfShape" => &ConstantOfShapeOp,
        "Constant" => &ConstantOp,
        "DepthToSpace" | "SpaceToDepth" => &BlockRearrange,
        _ => return None,
    })
}

/// Product of dims: known if all are; a lone symbol times ones keeps its name; else unknown.
fn product(dims: &[Dim]) -> Dim {
    let known: Vec<usize> = dims.iter().filter_map(Dim::known).collect();
    let symbols: Vec<&Dim> = dims.iter().filter(|d| d.known().is_none()).collect();
    match (symbols.as_slice(), crate::shape::checked_numel(&known)) {
        ([], Some(n)) => Dim::Known(n),
        ([one], Some(1)) => (*one).clone(),
        _ => Dim::Symbol(String::new()),
    }
}

/// Output fact from an optional folded value, else the given type and shape.
fn fact(value: Option<Tensor>, dtype: Option<DType>, shape: Option<Shape>) -> Fact {
    value.map_or_else(|| Fact::typed(dtype, shape), Fact::of_value)
}

/// Reshapes an integer value (same dtype) to `dims`.
fn reshape_value(x: &Fact, dims: &[usize]) -> Option<Tensor> {
    let a = int_array(x.value.as_ref()?)?;
    let r = a.into_shape_with_order(IxDyn(dims)).ok()?;
    int_tensor(x.dtype?, &r)
}

/// Axes from an attribute (old opsets) or an input (new opsets).
fn axes_of(
    node: &Node,
    inputs: &[Option<Fact>],
    slot: usize,
    opset: i64,
    since: i64,
) -> Result<Option<Vec<i64>>> {
    if opset >= since {
        Ok(input_ints(inputs, slot))
    } else {
        Ok(node.ints_attr("axes")?.map(<[i64]>::to_vec))
    }
}

struct ReshapeOp;
impl OpSpec for ReshapeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let s = required(node, inputs, 1)?;
        let allow_zero = node.int_attr("allowzero", 0)? != 0;
        let Some(target) = s.ints() else {
            let rank = s.dims().and_then(|d| d.first().copied());
            let shape = rank.map(|r| Shape(vec![Dim::Symbol(String::new()); r]));
            return Ok(vec![Fact::typed(x.dtype, shape)]);
        };
        let Some(in_shape) = &x.shape else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        let mut out: Vec<Dim> = Vec::with_capacity(target.len());
        let mut infer_at = None;
        for (i, &t) in target.iter().enumerate() {
            out.push(match t {
                0 if !allow_zero => in_shape.0.get(i).cloned().ok_or_else(|| {
                    node.shape_error(format!(
                        "shape entry {i} is 0 but the input has rank {}",
                        in_shape.rank()
                    ))
                })?,
                -1 => {
                    if infer_at.replace(i).is_some() {
                        return Err(node.shape_error("more than one -1 in the target shape"));
                    }
                    Dim::Symbol(String::new())
                }
                t if t < 0 => return Err(node.shape_error(format!("invalid target dim {t}"))),
                t => Dim::Known(t as usize),
            });
        }
        if let Some(at) = infer_at {
            let rest: Vec<Dim> =
                out.iter().enumerate().filter(|&(i, _)| i != at).map(|(_, d)| d.clone()).collect();
            if let (Dim::Known(total), Dim::Known(part)) = (product(&in_shape.0), product(&rest)) {
                if part == 0 || total % part != 0 {
                    return Err(node.shape_error(format!("cannot reshape {in_shape} into {target:?}")));
                }
                out[at] = Dim::Known(total / part);
            }
        } else if let (Dim::Known(a), Dim::Known(b)) = (product(&in_shape.0), product(&out)) {
            if a != b {
                return Err(
                    node.shape_error(format!("cannot reshape {in_shape} ({a} elements) into {target:?}"))
                );
            }
        }
        let shape = Shape(out);
        let value = shape.to_known().and_then(|d| reshape_value(x, &d));
        Ok(vec![fact(value, x.dtype, Some(shape))])
    }
}

struct FlattenOp;
impl OpSpec for FlattenOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(shape) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let axis = node.int_attr("axis", 1)?;
        let r = shape.rank() as i64;
        let axis = if axis < 0 { axis + r } else { axis };
        if !(0..=r).contains(&axis) {
            return Err(node.shape_error(format!("axis {axis} out of range for rank {r}")));
        }
        let (a, b) = shape.0.split_at(axis as usize);
        let out = Shape(vec![product(a), product(b)]);
        let value = out.to_known().and_then(|d| reshape_value(x, &d));
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct TransposeOp;
impl OpSpec for TransposeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(shape) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let r = shape.rank();
        let perm: Vec<usize> = match node.ints_attr("perm")? {
            Some(p) => p.iter().map(|&a| normalize_axis(node, a, r)).collect::<Result<_>>()?,
            None => (0..r).rev().collect(),
        };
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
            return Err(node.invalid_attr("perm", format!("{perm:?} is not a permutation of rank {r}")));
        }
        let out = Shape(perm.iter().map(|&p| shape.0[p].clone()).collect());
        let value = x.value.as_ref().and_then(int_array).and_then(|a| {
            let t = a.permuted_axes(IxDyn(&perm));
            int_tensor(x.dtype?, &t.as_standard_layout().to_owned())
        });
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct SqueezeOp;
impl OpSpec for SqueezeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(shape) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let has_axes_input = inputs.get(1).is_some_and(Option::is_some);
        let axes = axes_of(node, inputs, 1, opset, 13)?;
        let drop: Vec<usize> = match axes {
            Some(a) => a.iter().map(|&a| normalize_axis(node, a, shape.rank())).collect::<Result<_>>()?,
            None if has_axes_input => return Ok(vec![Fact::typed(x.dtype, None)]),
            None => {
                if shape.0.iter().any(|d| d.known().is_none()) {
                    return Ok(vec![Fact::typed(x.dtype, None)]);
                }
                (0..shape.rank()).filter(|&i| shape.0[i] == Dim::Known(1)).collect()
            }
        };
        for &a in &drop {
            if let Dim::Known(n) = shape.0[a]
                && n != 1
            {
                return Err(node.shape_error(format!("cannot squeeze axis {a} of size {n}")));
            }
        }
        let out = Shape(
            shape.0.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, d)| d.clone()).collect(),
        );
        let value = out.to_known().and_then(|d| reshape_value(x, &d));
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct UnsqueezeOp;
impl OpSpec for UnsqueezeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let (Some(shape), Some(axes)) = (&x.shape, axes_of(node, inputs, 1, opset, 13)?) else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        let out_rank = shape.rank() + axes.len();
        let mut axes: Vec<usize> =
            axes.iter().map(|&a| normalize_axis(node, a, out_rank)).collect::<Result<_>>()?;
        axes.sort_unstable();
        let mut rest = shape.0.iter();
        let out = Shape(
            (0..out_rank)
                .map(|i| {
                    if axes.contains(&i) {
                        Dim::Known(1)
                    } else {
                        rest.next().cloned().unwrap_or(Dim::Known(1))
                    }
                })
                .collect(),
        );
        let value = out.to_known().and_then(|d| reshape_value(x, &d));
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct ConcatOp;
impl OpSpec for ConcatOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let first = required(node, inputs, 0)?;
        let parts: Vec<&Fact> = inputs.iter().flatten().collect();
        let Some(rank) = parts.iter().find_map(|p| p.rank()) else {
            return Ok(vec![Fact::typed(first.dtype, None)]);
        };
        let axis = normalize_axis(node, node.int_attr("axis", 0)?, rank)?;
        let mut out: Option<Vec<Dim>> = None;
        let mut total = Some(0usize);
        for p in &parts {
            let Some(s) = &p.shape else {
                total = None;
                continue;
            };
            if s.rank() != rank {
                return Err(node.shape_error(format!("inputs of rank {} and {rank}", s.rank())));
            }
            total = total.and_then(|t| s.0[axis].known().map(|k| t + k));
            out = Some(match out {
                None => s.0.clone(),
                Some(o) => o
                    .into_iter()
                    .zip(&s.0)
                    .map(|(a, b)| if a.known().is_none() && b.known().is_some() { b.clone() } else { a })
                    .collect(),
            });
        }
        let Some(mut dims) = out else { return Ok(vec![Fact::typed(first.dtype, None)]) };
        dims[axis] = total.map_or(Dim::Symbol(String::new()), Dim::Known);
        let value = parts
            .iter()
            .map(|p| p.value.as_ref().and_then(int_array))
            .collect::<Option<Vec<_>>>()
            .and_then(|arrays| {
                let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
                ndarray::concatenate(Axis(axis), &views).ok()
            })
            .and_then(|a| int_tensor(first.dtype?, &a));
        Ok(vec![fact(value, first.dtype, Some(Shape(dims)))])
    }
}

struct SplitOp;
impl OpSpec for SplitOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let n_out = node.outputs().len();
        let unknown = || vec![Fact::typed(x.dtype, None); n_out];
        let Some(shape) = &x.shape else { return Ok(unknown()) };
        let axis = normalize_axis(node, node.int_attr("axis", 0)?, shape.rank())?;
        let sizes: Option<Vec<i64>> =
            if opset >= 13 { input_ints(inputs, 1) } else { node.ints_attr("split")?.map(<[i64]>::to_vec) };
        let sizes: Vec<Dim> = match sizes {
            Some(s) => s.iter().map(|&k| Dim::Known(k.max(0) as usize)).collect(),
            None => match shape.0[axis].known() {
                Some(d) => {
                    let chunk = d.div_ceil(n_out.max(1));
                    (0..n_out).map(|i| Dim::Known(chunk.min(d.saturating_sub(i * chunk)))).collect()
                }
                None => vec![Dim::Symbol(String::new()); n_out],
            },
        };
        if sizes.len() != n_out {
            return Err(node.shape_error(format!("{} split sizes for {n_out} outputs", sizes.len())));
        }
        Ok(sizes
            .into_iter()
            .map(|d| {
                let mut s = shape.clone();
                s.0[axis] = d;
                Fact::typed(x.dtype, Some(s))
            })
            .collect())
    }
}

/// Clamped `(start, len, step)` of one sliced axis of size `dim` (ONNX Slice semantics).
fn slice_range(start: i64, end: i64, step: i64, dim: usize) -> (i64, usize) {
    let d = dim as i64;
    let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = (fix(start), fix(end));
    let (s, e) =
        if step > 0 { (s.clamp(0, d), e.clamp(0, d)) } else { (s.clamp(0, d - 1), e.clamp(-1, d - 1)) };
    let len = if step > 0 { (e - s + step - 1) / step } else { (s - e + (-step) - 1) / (-step) };
    (s, len.max(0) as usize)
}

struct SliceOp;
impl OpSpec for SliceOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(shape) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let r = shape.rank();
        let (starts, ends, axes, steps) = if opset >= 10 {
            let (Some(s), Some(e)) = (input_ints(inputs, 1), input_ints(inputs, 2)) else {
                return Ok(vec![Fact::typed(x.dtype, Some(Shape(vec![Dim::Symbol(String::new()); r])))]);
            };
            let has = |slot: usize| inputs.get(slot).is_some_and(Option::is_some);
            let axes = if has(3) { input_ints(inputs, 3) } else { Some((0..s.len() as i64).collect()) };
            let steps = if has(4) { input_ints(inputs, 4) } else { Some(vec![1; s.len()]) };
            let (Some(axes), Some(steps)) = (axes, steps) else {
                return Ok(vec![Fact::typed(x.dtype, Some(Shape(vec![Dim::Symbol(String::new()); r])))]);
            };
            (s, e, axes, steps)
        } else {
            let s = node.ints_attr("starts")?.unwrap_or_default().to_vec();
            let e = node.ints_attr("ends")?.unwrap_or_default().to_vec();
            let axes = node.ints_attr("axes")?.map_or_else(|| (0..s.len() as i64).collect(), <[i64]>::to_vec);
            let steps = vec![1; s.len()];
            (s, e, axes, steps)
        };
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(node.shape_error("starts, ends, axes and steps differ in length"));
        }
        let mut out = shape.clone();
        let mut ranges: Vec<(usize, i64, usize, i64)> = Vec::new();
        for i in 0..starts.len() {
            let a = normalize_axis(node, axes[i], r)?;
            if steps[i] == 0 {
                return Err(node.shape_error("slice step 0"));
            }
            if let Some(d) = shape.0[a].known() {
                let (s, len) = slice_range(starts[i], ends[i], steps[i], d);
                out.0[a] = Dim::Known(len);
                ranges.push((a, s, len, steps[i]));
            } else {
                out.0[a] = Dim::Symbol(String::new());
            }
        }
        let value = (|| {
            let mut a = int_array(x.value.as_ref()?)?;
            for &(axis, start, len, step) in &ranges {
                let idx: Vec<usize> = (0..len as i64).map(|k| (start + k * step) as usize).collect();
                a = a.select(Axis(axis), &idx);
            }
            int_tensor(x.dtype?, &a)
        })();
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct GatherOp;
impl OpSpec for GatherOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let data = required(node, inputs, 0)?;
        let idx = required(node, inputs, 1)?;
        let (Some(ds), Some(is)) = (&data.shape, &idx.shape) else {
            return Ok(vec![Fact::typed(data.dtype, None)]);
        };
        let axis = normalize_axis(node, node.int_attr("axis", 0)?, ds.rank())?;
        let mut dims = ds.0[..axis].to_vec();
        dims.extend(is.0.iter().cloned());
        dims.extend(ds.0[axis + 1..].iter().cloned());
        let out = Shape(dims);
        let value = (|| {
            let d = int_array(data.value.as_ref()?)?;
            let indices = idx.ints()?;
            let n = d.shape()[axis] as i64;
            let mut picked = Vec::with_capacity(indices.len());
            for i in indices {
                let i = if i < 0 { i + n } else { i };
                if !(0..n).contains(&i) {
                    return None;
                }
                picked.push(i as usize);
            }
            let sel = d.select(Axis(axis), &picked);
            let r = sel.into_shape_with_order(IxDyn(&out.to_known()?)).ok()?;
            int_tensor(data.dtype?, &r)
        })();
        Ok(vec![fact(value, data.dtype, Some(out))])
    }
}

struct GatherElementsOp;
impl OpSpec for GatherElementsOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let data = required(node, inputs, 0)?;
        let idx = required(node, inputs, 1)?;
        Ok(vec![Fact::typed(data.dtype, idx.shape.clone())])
    }
}

struct ExpandOp;
impl OpSpec for ExpandOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let (Some(xs), Some(target)) = (&x.shape, input_ints(inputs, 1)) else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        let t = Shape(target.iter().map(|&d| Dim::Known(d.max(0) as usize)).collect());
        let out = super::broadcast(node, xs, &t)?;
        let value = out.to_known().filter(|d| foldable(d)).and_then(|d| {
            let a = int_array(x.value.as_ref()?)?;
            int_tensor(x.dtype?, &a.broadcast(IxDyn(&d))?.to_owned())
        });
        Ok(vec![fact(value, x.dtype, Some(out))])
    }
}

struct TileOp;
impl OpSpec for TileOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let (Some(xs), Some(reps)) = (&x.shape, input_ints(inputs, 1)) else {
            return Ok(vec![Fact::typed(x.dtype, None)]);
        };
        if reps.len() != xs.rank() {
            return Err(node.shape_error(format!("{} repeats for rank {}", reps.len(), xs.rank())));
        }
        let out = Shape(
            xs.0.iter()
                .zip(&reps)
                .map(|(d, &k)| d.known().map_or(d.clone(), |n| Dim::Known(n * k.max(0) as usize)))
                .collect(),
        );
        Ok(vec![Fact::typed(x.dtype, Some(out))])
    }
}

struct PadOp;
impl OpSpec for PadOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(xs) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let r = xs.rank();
        let pads =
            if opset >= 11 { input_ints(inputs, 1) } else { node.ints_attr("pads")?.map(<[i64]>::to_vec) };
        let Some(pads) = pads else {
            return Ok(vec![Fact::typed(x.dtype, Some(Shape(vec![Dim::Symbol(String::new()); r])))]);
        };
        let axes: Vec<usize> = match input_ints(inputs, 3) {
            Some(a) if opset >= 18 => a.iter().map(|&a| normalize_axis(node, a, r)).collect::<Result<_>>()?,
            _ => (0..r).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return Err(node.shape_error(format!("{} pads for {} axes", pads.len(), axes.len())));
        }
        let mut out = xs.clone();
        for (k, &a) in axes.iter().enumerate() {
            if let Some(d) = xs.0[a].known() {
                let n = d as i64 + pads[k] + pads[k + axes.len()];
                if n < 0 {
                    return Err(node.shape_error(format!("negative padded size on axis {a}")));
                }
                out.0[a] = Dim::Known(n as usize);
            }
        }
        Ok(vec![Fact::typed(x.dtype, Some(out))])
    }
}

struct ShapeOp;
impl OpSpec for ShapeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(xs) = &x.shape else {
            return Ok(vec![Fact::typed(Some(DType::I64), Some(Shape(vec![Dim::Symbol(String::new())])))]);
        };
        let r = xs.rank() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let start = clamp(node.int_attr("start", 0)?);
        let end = clamp(node.int_attr("end", r)?).max(start);
        let dims = &xs.0[start..end];
        let value = dims
            .iter()
            .map(|d| d.known().map(|k| k as i64))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| Tensor::from_vec(&[v.len()], v));
        Ok(vec![fact(value, Some(DType::I64), Some(Shape::known(&[dims.len()])))])
    }
}

struct SizeOp;
impl OpSpec for SizeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let value = x.shape.as_ref().and_then(Shape::numel).map(|n| Tensor::scalar(n as i64));
        Ok(vec![fact(value, Some(DType::I64), Some(Shape(vec![])))])
    }
}

struct RangeOp;
impl OpSpec for RangeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let start = required(node, inputs, 0)?;
        let limit = required(node, inputs, 1)?;
        let delta = required(node, inputs, 2)?;
        let unknown = Fact::typed(start.dtype, Some(Shape(vec![Dim::Symbol(String::new())])));
        let (Some(s), Some(l), Some(d)) = (start.ints(), limit.ints(), delta.ints()) else {
            return Ok(vec![unknown]);
        };
        let (Some(&s), Some(&l), Some(&d)) = (s.first(), l.first(), d.first()) else {
            return Ok(vec![unknown]);
        };
        if d == 0 {
            return Err(node.shape_error("Range delta is 0"));
        }
        let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
        let value = foldable(&[n])
            .then(|| {
                Tensor::from_i64s(start.dtype?, &[n], &(0..n as i64).map(|k| s + k * d).collect::<Vec<_>>())
            })
            .flatten();
        Ok(vec![fact(value, start.dtype, Some(Shape::known(&[n])))])
    }
}

struct ConstantOfShapeOp;
impl OpSpec for ConstantOfShapeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let s = required(node, inputs, 0)?;
        let fill = node.tensor_attr("value")?;
        let dtype = fill.map_or(DType::F32, Tensor::dtype);
        let Some(dims) = s.ints() else {
            let rank = s.dims().and_then(|d| d.first().copied());
            return Ok(vec![Fact::typed(
                Some(dtype),
                rank.map(|r| Shape(vec![Dim::Symbol(String::new()); r])),
            )]);
        };
        let dims: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
        let value = fill
            .and_then(Tensor::to_i64_vec)
            .and_then(|v| v.first().copied())
            .filter(|_| foldable(&dims))
            .and_then(|v| int_tensor(dtype, &ArrayD::from_elem(IxDyn(&dims), v)));
        Ok(vec![fact(value, Some(dtype), Some(Shape::known(&dims)))])
    }
}

struct ConstantOp;
impl OpSpec for ConstantOp {
    fn infer(&self, node: &Node, _inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let t = node.tensor_attr("value")?;
        Ok(vec![
            t.map_or_else(Fact::default, |t| Fact::typed(Some(t.dtype()), Some(Shape::known(t.shape())))),
        ])
    }
}

struct BlockRearrange;
impl OpSpec for BlockRearrange {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let b = node.int_attr("blocksize", 0)?;
        if b <= 0 || b > 1 << 15 {
            return Err(node.invalid_attr("blocksize", format!("must be in 1..=32768, got {b}")));
        }
        let b = b as usize;
        let Some(d) = x.dims().filter(|d| d.len() == 4) else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let out = if node.op_type == "DepthToSpace" {
            if d[1] % (b * b) != 0 {
                return Err(node.shape_error(format!(
                    "channels {} not divisible by blocksize² {}",
                    d[1],
                    b * b
                )));
            }
            [d[0], d[1] / (b * b), d[2] * b, d[3] * b]
        } else {
            if d[2] % b != 0 || d[3] % b != 0 {
                return Err(
                    node.shape_error(format!("spatial dims {:?} not divisible by blocksize {b}", &d[2..]))
                );
            }
            [d[0], d[1] * b * b, d[2] / b, d[3] / b]
        };
        Ok(vec![Fact::typed(x.dtype, Some(Shape::known(&out)))])
    }
}
