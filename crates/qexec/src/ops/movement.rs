//! Data-movement and shape ops, generic over every element type: Reshape, Flatten, Squeeze,
//! Unsqueeze, Transpose, Concat, Split, Slice, Gather, Expand, Tile, Pad, Shape, Size, Range,
//! ConstantOfShape, Cast, CastLike, Identity, Dropout, GatherElements, CumSum, Trilu,
//! DepthToSpace and SpaceToDepth.

use ndarray::{ArrayD, Axis, IxDyn, Slice};
use qgraph::{DType, Element, Node, Tensor};

use super::elementwise::broadcast_shape;
use super::{
    Activation, ExecCtx, Kernel, contiguous, input, ints_of, norm_axis, opt_input, strides_of, take_input,
    typed, with_dtype, wrap,
};
use crate::error::{ExecError, KernelResult, Result};

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    let ints = |name: &str| node.ints_attr(name).map(|v| v.map(<[i64]>::to_vec)).map_err(ExecError::from);
    let k = |m: Movement| -> Result<Box<dyn Kernel>> { Ok(Box::new(m)) };
    let built = match node.op_type.as_str() {
        "Identity" => k(Movement::Identity { mask: false }),
        "Dropout" => k(Movement::Identity { mask: node.outputs().len() > 1 }),
        "Reshape" => node
            .int_attr("allowzero", 0)
            .map_err(ExecError::from)
            .and_then(|z| k(Movement::Reshape { allow_zero: z != 0 })),
        "Flatten" => {
            node.int_attr("axis", 1).map_err(ExecError::from).and_then(|axis| k(Movement::Flatten { axis }))
        }
        "Squeeze" => ints("axes").and_then(|axes| k(Movement::Squeeze { axes })),
        "Unsqueeze" => ints("axes").and_then(|axes| k(Movement::Unsqueeze { axes })),
        "Transpose" => ints("perm").and_then(|perm| k(Movement::Transpose { perm })),
        "Concat" => {
            node.int_attr("axis", 0).map_err(ExecError::from).and_then(|axis| k(Movement::Concat { axis }))
        }
        "Split" => (|| {
            k(Movement::Split {
                axis: node.int_attr("axis", 0)?,
                split: ints("split")?,
                outputs: node.outputs().len(),
            })
        })(),
        "Slice" if opset < 10 => (|| {
            let starts = ints("starts")?.unwrap_or_default();
            let ends = ints("ends")?.unwrap_or_default();
            k(Movement::Slice { attrs: Some(SliceAttrs { starts, ends, axes: ints("axes")? }) })
        })(),
        "Slice" => k(Movement::Slice { attrs: None }),
        "Gather" => {
            node.int_attr("axis", 0).map_err(ExecError::from).and_then(|axis| k(Movement::Gather { axis }))
        }
        "Expand" => k(Movement::Expand),
        "Tile" => k(Movement::Tile),
        "Pad" => (|| {
            let mode = node.string_attr("mode")?.unwrap_or("constant").to_string();
            let attrs = if opset < 11 {
                Some((ints("pads")?.unwrap_or_default(), node.float_attr("value", 0.0)?))
            } else {
                None
            };
            k(Movement::Pad { mode, attrs })
        })(),
        "Shape" => (|| {
            k(Movement::Shape {
                start: node.int_attr("start", 0)?,
                end: node.attr("end").map(|_| node.int_attr("end", 0)).transpose()?,
            })
        })(),
        "Size" => k(Movement::Size),
        "Range" => k(Movement::Range),
        "ConstantOfShape" => node.tensor_attr("value").map_err(ExecError::from).and_then(|v| {
            k(Movement::ConstantOfShape { value: v.cloned().unwrap_or_else(|| Tensor::scalar(0.0f32)) })
        }),
        "Cast" => (|| {
            let code = node.int_attr("to", 1)?;
            let to = DType::from_onnx(code as i32)
                .ok_or_else(|| super::invalid(node, format!("Cast to unsupported dtype code {code}")))?;
            k(Movement::Cast { to: Some(to) })
        })(),
        "CastLike" => k(Movement::Cast { to: None }),
        "GatherElements" => node
            .int_attr("axis", 0)
            .map_err(ExecError::from)
            .and_then(|axis| k(Movement::GatherElements { axis })),
        "CumSum" => (|| {
            k(Movement::CumSum {
                exclusive: node.int_attr("exclusive", 0)? != 0,
                reverse: node.int_attr("reverse", 0)? != 0,
            })
        })(),
        "Trilu" => node
            .int_attr("upper", 1)
            .map_err(ExecError::from)
            .and_then(|u| k(Movement::Trilu { upper: u != 0 })),
        op @ ("DepthToSpace" | "SpaceToDepth") => (|| {
            let block = node.int_attr("blocksize", 0)?;
            if block <= 0 || block > 1 << 15 {
                return Err(super::invalid(node, format!("blocksize {block} is not in 1..=32768")));
            }
            let crd = node.string_attr("mode")?.is_some_and(|m| m == "CRD");
            k(Movement::Blocks { to_space: op == "DepthToSpace", block: block as usize, crd })
        })(),
        _ => return None,
    };
    Some(built)
}

/// `starts`, `ends` and `axes` of an opset < 10 `Slice`.
struct SliceAttrs {
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Option<Vec<i64>>,
}

/// The data-movement ops; each variant holds its parsed attributes.
enum Movement {
    Identity { mask: bool },
    Reshape { allow_zero: bool },
    Flatten { axis: i64 },
    Squeeze { axes: Option<Vec<i64>> },
    Unsqueeze { axes: Option<Vec<i64>> },
    Transpose { perm: Option<Vec<i64>> },
    Concat { axis: i64 },
    Split { axis: i64, split: Option<Vec<i64>>, outputs: usize },
    Slice { attrs: Option<SliceAttrs> },
    Gather { axis: i64 },
    Expand,
    Tile,
    Pad { mode: String, attrs: Option<(Vec<i64>, f32)> },
    Shape { start: i64, end: Option<i64> },
    Size,
    Range,
    ConstantOfShape { value: Tensor },
    Cast { to: Option<DType> },
    GatherElements { axis: i64 },
    CumSum { exclusive: bool, reverse: bool },
    Trilu { upper: bool },
    Blocks { to_space: bool, block: usize, crd: bool },
}

/// `x` reshaped to `split`, its axes permuted by `perm`, and reshaped to `out` (the
/// DepthToSpace/SpaceToDepth rearrangements).
fn rearrange(x: &Tensor, split: &[usize], perm: &[usize], out: &[usize]) -> KernelResult<Tensor> {
    let t = reshape(x.clone(), split)?;
    reshape(transpose(&t, perm)?, out)
}

/// `x` with its axes permuted: output axis `i` is input axis `perm[i]`.
fn transpose(x: &Tensor, perm: &[usize]) -> KernelResult<Tensor> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    Ok(with_dtype!(x.dtype(), T => {
        let a = typed::<T>(x)?;
        super::tensor_from(&out_shape, permute(&contiguous(a), a.shape(), perm))?
    }))
}

/// Row-major `input` of `shape` with its axes permuted by `perm`. Output axes that stay adjacent
/// in the input merge, size-1 axes drop out, and the innermost output axis is copied as a run
/// (a slice copy where it is contiguous in the input, a strided gather otherwise).
pub(super) fn permute<T: Copy>(input: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let total: usize = shape.iter().product();
    let in_strides = strides_of(shape);
    // (extent, input stride) per output axis, merged.
    let mut axes: Vec<(usize, usize)> = Vec::with_capacity(perm.len());
    for &p in perm {
        let (n, s) = (shape[p], in_strides[p]);
        if n == 1 {
            continue;
        }
        match axes.last_mut() {
            Some((pn, ps)) if *ps == s * n => {
                *pn *= n;
                *ps = s;
            }
            _ => axes.push((n, s)),
        }
    }
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let Some(&(inner, inner_stride)) = axes.last() else {
        out.extend_from_slice(&input[..total]);
        return out;
    };
    let outer = &axes[..axes.len() - 1];
    let mut idx = vec![0usize; outer.len()];
    let mut base = 0usize;
    for _ in 0..total / inner {
        if inner_stride == 1 {
            out.extend_from_slice(&input[base..base + inner]);
        } else {
            out.extend((0..inner).map(|j| input[base + j * inner_stride]));
        }
        for d in (0..outer.len()).rev() {
            idx[d] += 1;
            base += outer[d].1;
            if idx[d] < outer[d].0 {
                break;
            }
            base -= outer[d].1 * outer[d].0;
            idx[d] = 0;
        }
    }
    out
}

/// Reinterprets `t` with a new shape of the same element count (shares the buffer when it is in
/// standard layout).
pub(crate) fn reshape(t: Tensor, shape: &[usize]) -> KernelResult<Tensor> {
    let count: usize = shape.iter().product();
    if count != t.len() {
        return Err(format!("cannot reshape {:?} ({} elements) to {shape:?}", t.shape(), t.len()));
    }
    Ok(with_dtype!(t.dtype(), T => {
        let a = T::unwrap(&t).ok_or("internal")?.clone();
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned().into_shared() };
        T::wrap(a.into_shape_with_order(IxDyn(shape)).map_err(|e| e.to_string())?)
    }))
}

fn resolve_reshape(input: &[usize], spec: &[i64], allow_zero: bool) -> KernelResult<Vec<usize>> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => {
                out.push(*input.get(i).ok_or_else(|| format!("shape {spec:?}: no input dim {i} to copy"))?)
            }
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("invalid target shape {spec:?}")),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        let total: usize = input.iter().product();
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {input:?} to {spec:?}"));
        }
        out[i] = total / known;
    }
    Ok(out)
}

/// Copies `input` into an output of `out_shape`, where output index `i` along axis `a` reads
/// input index `tables[a][i]`, or `fill` where that is `None`.
fn remap<T: Copy>(
    input: &[T],
    in_shape: &[usize],
    out_shape: &[usize],
    tables: &[Vec<Option<usize>>],
    fill: T,
) -> Vec<T> {
    let rank = out_shape.len();
    let total: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    if rank == 0 {
        out.push(input[0]);
        return out;
    }
    let mut strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * in_shape[a + 1];
    }
    let inner = &tables[rank - 1];
    let mut idx = vec![0usize; rank];
    loop {
        let mut base = Some(0usize);
        for a in 0..rank - 1 {
            base = match (base, tables[a][idx[a]]) {
                (Some(b), Some(i)) => Some(b + i * strides[a]),
                _ => None,
            };
        }
        match base {
            Some(b) => out.extend(inner.iter().map(|i| i.map_or(fill, |i| input[b + i]))),
            None => out.extend(std::iter::repeat_n(fill, inner.len())),
        }
        let mut a = rank - 1;
        loop {
            if a == 0 {
                return out;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < out_shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

fn remap_tensor(
    t: &Tensor,
    out_shape: &[usize],
    tables: &[Vec<Option<usize>>],
    fill: f64,
) -> KernelResult<Tensor> {
    Ok(with_dtype!(t.dtype(), T => {
        let a = typed::<T>(t)?;
        let fill_v = fill_as::<T>(fill).ok_or_else(|| format!("pad value {fill} does not convert to {}", T::DTYPE))?;
        let data = remap(&contiguous(a), a.shape(), out_shape, tables, fill_v);
        super::tensor_from(out_shape, data)?
    }))
}

/// The pad value `v` converted to `T` (through a one-element tensor cast).
fn fill_as<T: Element>(v: f64) -> Option<T> {
    let t = cast(&Tensor::from_vec(&[1], vec![v])?, T::DTYPE).ok()?;
    T::unwrap(&t)?.iter().next().copied()
}

/// Converts `t` to `to` with ONNX `Cast` semantics (float to integer truncates toward zero).
pub(crate) fn cast(t: &Tensor, to: DType) -> KernelResult<Tensor> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    let shape = t.shape().to_vec();
    // To 4 bits, as ONNX's reference: clipped to the range, then rounded half to even.
    if let DType::I4 | DType::U4 = to {
        let (lo, hi) = if to == DType::I4 { (-8.0, 7.0) } else { (0.0, 15.0) };
        let v: Vec<i64> = t.to_f64_vec().iter().map(|&x| x.clamp(lo, hi).round_ties_even() as i64).collect();
        return Tensor::from_i64s(to, &shape, &v).ok_or_else(|| format!("cannot cast {} to {to}", t.dtype()));
    }
    let built = if t.dtype().is_float() {
        let v = t.to_f64_vec();
        match to {
            DType::F32 => Tensor::from_vec(&shape, v.iter().map(|&x| x as f32).collect()),
            DType::F64 => Tensor::from_vec(&shape, v),
            DType::F16 => Tensor::from_vec(&shape, v.iter().map(|&x| half::f16::from_f64(x)).collect()),
            DType::BF16 => Tensor::from_vec(&shape, v.iter().map(|&x| half::bf16::from_f64(x)).collect()),
            DType::Bool => Tensor::from_vec(&shape, v.iter().map(|&x| x != 0.0).collect()),
            DType::U64 => Tensor::from_vec(&shape, v.iter().map(|&x| x as u64).collect()),
            int => Tensor::from_i64s(int, &shape, &v.iter().map(|&x| x as i64).collect::<Vec<_>>()),
        }
    } else {
        let v = t.to_i64_vec().ok_or("internal: integer tensor without integers")?;
        match to {
            DType::F32 => Tensor::from_vec(&shape, v.iter().map(|&x| x as f32).collect()),
            DType::F64 => Tensor::from_vec(&shape, v.iter().map(|&x| x as f64).collect()),
            other => Tensor::from_i64s(other, &shape, &v),
        }
    };
    built.ok_or_else(|| format!("cannot cast {} to {to}", t.dtype()))
}

impl Kernel for Movement {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        Ok(match self {
            Movement::Identity { mask: false } => vec![take_input(inputs, 0)?],
            Movement::Identity { mask: true } => {
                let x = take_input(inputs, 0)?;
                let shape = x.shape().to_vec();
                vec![x, Tensor::from_vec(&shape, vec![true; shape.iter().product()]).ok_or("internal")?]
            }
            Movement::Reshape { allow_zero } => {
                let spec = ints_of(input(inputs, 1)?)?;
                let x = take_input(inputs, 0)?;
                let shape = resolve_reshape(x.shape(), &spec, *allow_zero)?;
                vec![reshape(x, &shape)?]
            }
            Movement::Flatten { axis } => {
                let x = take_input(inputs, 0)?;
                let axis = if *axis < 0 { *axis + x.shape().len() as i64 } else { *axis };
                if axis < 0 || axis as usize > x.shape().len() {
                    return Err(format!("axis {axis} out of range for shape {:?}", x.shape()));
                }
                let (a, b) = x.shape().split_at(axis as usize);
                let shape = [a.iter().product(), b.iter().product()];
                vec![reshape(x, &shape)?]
            }
            Movement::Squeeze { axes } => {
                let axes = axes
                    .clone()
                    .map_or_else(|| opt_input(inputs, 1).map(ints_of).transpose(), |a| Ok(Some(a)))?;
                let x = take_input(inputs, 0)?;
                let rank = x.shape().len();
                let drop: Vec<usize> = match axes {
                    Some(axes) => axes.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?,
                    None => (0..rank).filter(|&i| x.shape()[i] == 1).collect(),
                };
                if let Some(&a) = drop.iter().find(|&&a| x.shape()[a] != 1) {
                    return Err(format!("cannot squeeze axis {a} of shape {:?}", x.shape()));
                }
                let shape: Vec<usize> =
                    (0..rank).filter(|i| !drop.contains(i)).map(|i| x.shape()[i]).collect();
                vec![reshape(x, &shape)?]
            }
            Movement::Unsqueeze { axes } => {
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => ints_of(input(inputs, 1)?)?,
                };
                let x = take_input(inputs, 0)?;
                let rank = x.shape().len() + axes.len();
                let mut ins: Vec<usize> =
                    axes.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?;
                ins.sort_unstable();
                let mut dims = x.shape().iter().copied();
                let shape: Vec<usize> =
                    (0..rank).map(|i| if ins.contains(&i) { 1 } else { dims.next().unwrap_or(1) }).collect();
                vec![reshape(x, &shape)?]
            }
            Movement::Transpose { perm } => {
                let x = input(inputs, 0)?;
                let rank = x.shape().len();
                let perm: Vec<usize> = match perm {
                    Some(p) => p.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?,
                    None => (0..rank).rev().collect(),
                };
                let mut seen = perm.clone();
                seen.sort_unstable();
                if seen != (0..rank).collect::<Vec<_>>() {
                    return Err(format!("perm {perm:?} is not a permutation of rank {rank}"));
                }
                vec![transpose(x, &perm)?]
            }
            Movement::Concat { axis } => {
                let parts: Vec<&Tensor> = inputs.iter().flatten().collect();
                let first = *parts.first().ok_or("Concat needs inputs")?;
                let axis = norm_axis(*axis, first.shape().len())?;
                vec![with_dtype!(first.dtype(), T => {
                    let views = parts.iter().map(|t| typed::<T>(t).map(|a| a.view())).collect::<KernelResult<Vec<_>>>()?;
                    wrap(ndarray::concatenate(Axis(axis), &views).map_err(|e| format!("cannot concatenate: {e}"))?)
                })]
            }
            Movement::Split { axis, split, outputs } => {
                let x = input(inputs, 0)?;
                let axis = norm_axis(*axis, x.shape().len())?;
                let dim = x.shape()[axis];
                let sizes: Vec<usize> = match split
                    .clone()
                    .map_or_else(|| opt_input(inputs, 1).map(ints_of).transpose(), |s| Ok(Some(s)))?
                {
                    Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
                    None => {
                        let chunk = dim.div_ceil((*outputs).max(1));
                        (0..*outputs).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
                    }
                };
                if sizes.iter().sum::<usize>() != dim {
                    return Err(format!("split sizes {sizes:?} do not add up to dim {dim}"));
                }
                let mut start = 0;
                let mut outs = Vec::with_capacity(sizes.len());
                for s in sizes {
                    outs.push(with_dtype!(x.dtype(), T => {
                        let a = typed::<T>(x)?;
                        wrap(a.slice_axis(Axis(axis), Slice::from(start..start + s)).to_owned())
                    }));
                    start += s;
                }
                outs
            }
            Movement::Slice { attrs } => {
                let (starts, ends, axes, steps) = match attrs {
                    Some(a) => (a.starts.clone(), a.ends.clone(), a.axes.clone(), None),
                    None => (
                        ints_of(input(inputs, 1)?)?,
                        ints_of(input(inputs, 2)?)?,
                        opt_input(inputs, 3).map(ints_of).transpose()?,
                        opt_input(inputs, 4).map(ints_of).transpose()?,
                    ),
                };
                let x = input(inputs, 0)?;
                let rank = x.shape().len();
                let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
                if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
                    return Err("starts, ends, axes and steps differ in length".into());
                }
                let mut slices = vec![Slice::from(..); rank];
                for i in 0..starts.len() {
                    let a = norm_axis(axes[i], rank)?;
                    let dim = x.shape()[a] as i64;
                    let step = steps[i];
                    if step == 0 {
                        return Err("slice step 0".into());
                    }
                    let fix = |v: i64| if v < 0 { v + dim } else { v };
                    let (s, e) = (fix(starts[i]), fix(ends[i]));
                    slices[a] = if step > 0 {
                        let s = s.clamp(0, dim);
                        let e = e.clamp(0, dim).max(s);
                        Slice::new(s as isize, Some(e as isize), step as isize)
                    } else {
                        let s = s.clamp(-1, dim - 1);
                        let e = e.clamp(-1, dim - 1).min(s);
                        Slice::new((e + 1) as isize, Some((s + 1) as isize), step as isize)
                    };
                }
                vec![with_dtype!(x.dtype(), T => {
                    let a = typed::<T>(x)?;
                    wrap(a.slice_each_axis(|ax| slices[ax.axis.index()]).to_owned())
                })]
            }
            Movement::Gather { axis } => {
                let (x, idx) = (input(inputs, 0)?, input(inputs, 1)?);
                let axis = norm_axis(*axis, x.shape().len())?;
                let dim = x.shape()[axis] as i64;
                let indices: Vec<usize> = ints_of(idx)?
                    .into_iter()
                    .map(|i| {
                        let j = if i < 0 { i + dim } else { i };
                        if (0..dim).contains(&j) {
                            Ok(j as usize)
                        } else {
                            Err(format!("index {i} out of range for dim {dim}"))
                        }
                    })
                    .collect::<KernelResult<_>>()?;
                let outer: usize = x.shape()[..axis].iter().product();
                let inner: usize = x.shape()[axis + 1..].iter().product();
                let mut shape = x.shape()[..axis].to_vec();
                shape.extend_from_slice(idx.shape());
                shape.extend_from_slice(&x.shape()[axis + 1..]);
                vec![with_dtype!(x.dtype(), T => {
                    let a = typed::<T>(x)?;
                    let data = contiguous(a);
                    let mut out = Vec::with_capacity(outer * indices.len() * inner);
                    for o in 0..outer {
                        for &i in &indices {
                            let base = (o * dim as usize + i) * inner;
                            out.extend_from_slice(&data[base..base + inner]);
                        }
                    }
                    super::tensor_from(&shape, out)?
                })]
            }
            Movement::Expand => {
                let (x, s) = (input(inputs, 0)?, input(inputs, 1)?);
                let target: Vec<usize> = ints_of(s)?.iter().map(|&d| d.max(0) as usize).collect();
                let shape = broadcast_shape(x.shape(), &target)?;
                ctx.checked_len(&shape, x.dtype().size_of())?;
                vec![with_dtype!(x.dtype(), T => {
                    let a = typed::<T>(x)?;
                    wrap(super::elementwise::broadcast_to(a, &shape)?.to_owned())
                })]
            }
            Movement::Tile => {
                let (x, r) = (input(inputs, 0)?, input(inputs, 1)?);
                let reps = ints_of(r)?;
                if reps.len() != x.shape().len() || reps.iter().any(|&v| v < 0) {
                    return Err(format!("repeats {reps:?} do not fit shape {:?}", x.shape()));
                }
                let tiled: Vec<i64> = x
                    .shape()
                    .iter()
                    .zip(&reps)
                    .map(|(&d, &r)| (d as i64).checked_mul(r).ok_or(format!("repeats {reps:?} overflow")))
                    .collect::<KernelResult<_>>()?;
                let out_shape = ctx.checked_shape(&tiled, x.dtype().size_of())?;
                let tables: Vec<Vec<Option<usize>>> = x
                    .shape()
                    .iter()
                    .zip(&out_shape)
                    .map(|(&d, &o)| (0..o).map(|i| Some(i % d)).collect())
                    .collect();
                vec![remap_tensor(x, &out_shape, &tables, 0.0)?]
            }
            Movement::Pad { mode, attrs } => {
                let x = input(inputs, 0)?;
                let rank = x.shape().len();
                let (pads, value) = match attrs {
                    Some((p, v)) => (p.clone(), f64::from(*v)),
                    None => {
                        let p = ints_of(input(inputs, 1)?)?;
                        let v =
                            opt_input(inputs, 2).and_then(|t| t.to_f64_vec().first().copied()).unwrap_or(0.0);
                        (p, v)
                    }
                };
                let axes: Vec<usize> = match opt_input(inputs, 3) {
                    Some(a) => {
                        ints_of(a)?.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?
                    }
                    None => (0..rank).collect(),
                };
                if pads.len() != 2 * axes.len() {
                    return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
                }
                let mut begin = vec![0i64; rank];
                let mut end = vec![0i64; rank];
                for (k, &a) in axes.iter().enumerate() {
                    begin[a] = pads[k];
                    end[a] = pads[k + axes.len()];
                }
                let mut padded = Vec::with_capacity(rank);
                for a in 0..rank {
                    let o = (x.shape()[a] as i64)
                        .checked_add(begin[a])
                        .and_then(|o| o.checked_add(end[a]))
                        .ok_or(format!("pads {pads:?} overflow"))?;
                    if o < 0 {
                        return Err(format!("pads {pads:?} crop more than shape {:?}", x.shape()));
                    }
                    padded.push(o);
                }
                let out_shape = ctx.checked_shape(&padded, x.dtype().size_of())?;
                let mut tables = Vec::with_capacity(rank);
                for (a, &o) in padded.iter().enumerate() {
                    let d = x.shape()[a] as i64;
                    let table = (0..o)
                        .map(|i| {
                            let j = i - begin[a];
                            if (0..d).contains(&j) {
                                return Ok(Some(j as usize));
                            }
                            Ok(match mode.as_str() {
                                "constant" => None,
                                _ if d == 0 => {
                                    return Err(format!(
                                        "{mode} padding of an empty axis {a} (shape {:?})",
                                        x.shape()
                                    ));
                                }
                                "edge" => Some(j.clamp(0, d - 1) as usize),
                                "wrap" => Some(j.rem_euclid(d) as usize),
                                "reflect" if d > 1 => {
                                    let period = 2 * (d - 1);
                                    let m = j.rem_euclid(period);
                                    Some((if m < d { m } else { period - m }) as usize)
                                }
                                "reflect" => Some(0),
                                other => return Err(format!("unknown pad mode '{other}'")),
                            })
                        })
                        .collect::<KernelResult<Vec<_>>>()?;
                    tables.push(table);
                }
                vec![remap_tensor(x, &out_shape, &tables, value)?]
            }
            Movement::Shape { start, end } => {
                let x = input(inputs, 0)?;
                let r = x.shape().len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (s, e) = (clampi(*start), clampi(end.unwrap_or(r)));
                let dims: Vec<i64> = x.shape()[s..e.max(s)].iter().map(|&d| d as i64).collect();
                vec![super::tensor_from(&[dims.len()], dims)?]
            }
            Movement::Size => vec![Tensor::scalar(input(inputs, 0)?.len() as i64)],
            Movement::Range => {
                let (s, l, d) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
                let dtype = s.dtype();
                let scalar = |t: &Tensor| {
                    t.to_f64_vec().first().copied().ok_or("Range needs scalar inputs".to_string())
                };
                let (s, l, d) = (scalar(s)?, scalar(l)?, scalar(d)?);
                if d == 0.0 {
                    return Err("Range delta is 0".into());
                }
                let n = crate::memory::count_from_f64(
                    ((l - s) / d).ceil().max(0.0),
                    &format!("Range from {s} to {l} by {d}"),
                )?;
                ctx.checked_len(&[n], dtype.size_of().max(8))?;
                let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
                let t = Tensor::from_vec(&[n], v).ok_or("internal")?;
                vec![cast(&t, dtype)?]
            }
            Movement::ConstantOfShape { value } => {
                let dims = ctx.checked_shape(&ints_of(input(inputs, 0)?)?, value.dtype().size_of())?;
                vec![with_dtype!(value.dtype(), T => {
                    let v = typed::<T>(value)?.iter().next().copied().ok_or("ConstantOfShape value is empty")?;
                    wrap(ArrayD::from_elem(IxDyn(&dims), v))
                })]
            }
            Movement::GatherElements { axis } => {
                let (x, idx) = (input(inputs, 0)?, input(inputs, 1)?);
                let rank = x.shape().len();
                let axis = norm_axis(*axis, rank)?;
                if idx.shape().len() != rank {
                    return Err(format!("indices rank {} differs from data rank {rank}", idx.shape().len()));
                }
                let (xs, is) = (strides_of(x.shape()), strides_of(idx.shape()));
                let dim = x.shape()[axis] as i64;
                let offsets: Vec<usize> = ints_of(idx)?
                    .iter()
                    .enumerate()
                    .map(|(flat, &i)| {
                        let j = if i < 0 { i + dim } else { i };
                        if !(0..dim).contains(&j) {
                            return Err(format!("index {i} out of range for dim {dim}"));
                        }
                        let mut off = 0;
                        for d in 0..rank {
                            let coord = (flat / is[d]) % idx.shape()[d];
                            if d != axis && coord >= x.shape()[d] {
                                return Err(format!(
                                    "indices shape {:?} exceeds data shape {:?}",
                                    idx.shape(),
                                    x.shape()
                                ));
                            }
                            off += if d == axis { j as usize } else { coord } * xs[d];
                        }
                        Ok(off)
                    })
                    .collect::<KernelResult<_>>()?;
                vec![with_dtype!(x.dtype(), T => {
                    let data = contiguous(typed::<T>(x)?);
                    super::tensor_from(idx.shape(), offsets.iter().map(|&o| data[o]).collect())?
                })]
            }
            Movement::CumSum { exclusive, reverse } => {
                let x = input(inputs, 0)?;
                let axis = norm_axis(
                    *ints_of(input(inputs, 1)?)?.first().ok_or("CumSum needs an axis")?,
                    x.shape().len(),
                )?;
                let (outer, n, inner) = (
                    x.shape()[..axis].iter().product::<usize>(),
                    x.shape()[axis],
                    x.shape()[axis + 1..].iter().product::<usize>(),
                );
                let v = x.to_f64_vec();
                let mut out = vec![0f64; v.len()];
                for o in 0..outer {
                    for i in 0..inner {
                        let mut acc = 0f64;
                        for step in 0..n {
                            let j = if *reverse { n - 1 - step } else { step };
                            let at = (o * n + j) * inner + i;
                            if *exclusive {
                                out[at] = acc;
                                acc += v[at];
                            } else {
                                acc += v[at];
                                out[at] = acc;
                            }
                        }
                    }
                }
                vec![cast(&Tensor::from_vec(x.shape(), out).ok_or("internal")?, x.dtype())?]
            }
            Movement::Trilu { upper } => {
                let x = input(inputs, 0)?;
                let k = opt_input(inputs, 1)
                    .map(ints_of)
                    .transpose()?
                    .and_then(|v| v.first().copied())
                    .unwrap_or(0);
                let r = x.shape().len();
                if r < 2 {
                    return Err(format!("Trilu needs rank ≥ 2, got {:?}", x.shape()));
                }
                let (rows, cols) = (x.shape()[r - 2], x.shape()[r - 1]);
                vec![with_dtype!(x.dtype(), T => {
                    let data = contiguous(typed::<T>(x)?);
                    let out: Vec<T> = data
                        .iter()
                        .enumerate()
                        .map(|(flat, &v)| {
                            let (i, j) = (((flat / cols) % rows) as i64, (flat % cols) as i64);
                            let keep = if *upper { j - i >= k } else { j - i <= k };
                            if keep { v } else { T::default() }
                        })
                        .collect();
                    super::tensor_from(x.shape(), out)?
                })]
            }
            Movement::Blocks { to_space, block, crd } => {
                let x = input(inputs, 0)?;
                let &[n, c, h, w] = x.shape() else {
                    return Err(format!("expected a rank-4 input, got {:?}", x.shape()));
                };
                let b = *block;
                let out = if *to_space {
                    if c % (b * b) != 0 {
                        return Err(format!("{c} channels are not divisible by blocksize² {}", b * b));
                    }
                    let cb = c / (b * b);
                    let out = [n, cb, h * b, w * b];
                    if *crd {
                        rearrange(x, &[n, cb, b, b, h, w], &[0, 1, 4, 2, 5, 3], &out)?
                    } else {
                        rearrange(x, &[n, b, b, cb, h, w], &[0, 3, 4, 1, 5, 2], &out)?
                    }
                } else {
                    if h % b != 0 || w % b != 0 {
                        return Err(format!("spatial dims {h}×{w} are not divisible by blocksize {b}"));
                    }
                    rearrange(
                        x,
                        &[n, c, h / b, b, w / b, b],
                        &[0, 3, 5, 1, 2, 4],
                        &[n, c * b * b, h / b, w / b],
                    )?
                };
                vec![out]
            }
            Movement::Cast { to } => {
                let to = match to {
                    Some(t) => *t,
                    None => input(inputs, 1)?.dtype(),
                };
                vec![cast(input(inputs, 0)?, to)?]
            }
        })
    }
}
