//! Index-driven ops: `GatherND`, `ScatterElements`/`Scatter`, `ScatterND`, `OneHot`, `Compress`,
//! `NonZero`, `TopK`, `Unique`, `ReverseSequence`, `EyeLike` and `CenterCropPad`. Every index
//! read from data is range-checked (negative ones count from the end where ONNX allows it) and
//! every output whose size comes from data goes through the memory guard.

use std::cmp::Ordering;

use qgraph::{DType, Node, Tensor};

use super::arith::{Arith, numeric};
use super::{
    Activation, ExecCtx, Kernel, contiguous, input, ints_of, norm_axis, strides_of, tensor_from, typed,
    with_dtype,
};
use crate::error::{ExecError, KernelResult, Result};

/// How a scatter combines an update with the value already there.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

impl Reduction {
    fn parse(node: &Node) -> Result<Reduction> {
        Ok(match node.string_attr("reduction")?.unwrap_or("none") {
            "none" => Reduction::None,
            "add" => Reduction::Add,
            "mul" => Reduction::Mul,
            "max" => Reduction::Max,
            "min" => Reduction::Min,
            other => return Err(super::invalid(node, format!("unknown reduction '{other}'"))),
        })
    }

    fn combine<T: Arith>(self, old: T, new: T) -> T {
        match self {
            Reduction::None => new,
            Reduction::Add => old.add(new),
            Reduction::Mul => old.mul(new),
            Reduction::Max => {
                if new > old {
                    new
                } else {
                    old
                }
            }
            Reduction::Min => {
                if new < old {
                    new
                } else {
                    old
                }
            }
        }
    }
}

enum Indexing {
    GatherNd { batch_dims: usize },
    ScatterElements { axis: i64, reduction: Reduction },
    ScatterNd { reduction: Reduction },
    OneHot { axis: i64 },
    Compress { axis: Option<i64> },
    NonZero,
    TopK { axis: i64, largest: bool, k: Option<i64> },
    Unique { axis: Option<i64>, sorted: bool },
    ReverseSequence { batch_axis: i64, time_axis: i64 },
    EyeLike { dtype: Option<DType>, k: i64 },
    CenterCropPad { axes: Option<Vec<i64>> },
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let int = |name: &str, default: i64| node.int_attr(name, default).map_err(ExecError::from);
    let opt_int = |name: &str| node.attr(name).map(|_| int(name, 0)).transpose();
    let built = (|| {
        Ok(Some(match node.op_type.as_str() {
            "GatherND" => {
                let b = int("batch_dims", 0)?;
                let batch_dims = usize::try_from(b)
                    .map_err(|_| super::invalid(node, format!("batch_dims {b} is negative")))?;
                Indexing::GatherNd { batch_dims }
            }
            "ScatterElements" | "Scatter" => {
                Indexing::ScatterElements { axis: int("axis", 0)?, reduction: Reduction::parse(node)? }
            }
            "ScatterND" => Indexing::ScatterNd { reduction: Reduction::parse(node)? },
            "OneHot" => Indexing::OneHot { axis: int("axis", -1)? },
            "Compress" => Indexing::Compress { axis: opt_int("axis")? },
            "NonZero" => Indexing::NonZero,
            "TopK" => {
                Indexing::TopK { axis: int("axis", -1)?, largest: int("largest", 1)? != 0, k: opt_int("k")? }
            }
            "Unique" => Indexing::Unique { axis: opt_int("axis")?, sorted: int("sorted", 1)? != 0 },
            "ReverseSequence" => Indexing::ReverseSequence {
                batch_axis: int("batch_axis", 1)?,
                time_axis: int("time_axis", 0)?,
            },
            "EyeLike" => {
                let dtype = opt_int("dtype")?
                    .map(|code| {
                        i32::try_from(code).ok().and_then(DType::from_onnx).ok_or_else(|| {
                            super::invalid(node, format!("dtype code {code} is not supported"))
                        })
                    })
                    .transpose()?;
                Indexing::EyeLike { dtype, k: int("k", 0)? }
            }
            "CenterCropPad" => Indexing::CenterCropPad {
                axes: node.ints_attr("axes").map_err(ExecError::from)?.map(<[i64]>::to_vec),
            },
            _ => return Ok(None),
        }))
    })();
    match built {
        Ok(Some(k)) => Some(Ok(Box::new(k) as Box<dyn Kernel>)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}

/// `i` (negative counts from the end) as an index below `dim`, or an error.
fn wrap_index(i: i64, dim: usize) -> KernelResult<usize> {
    let d = dim as i64;
    let j = if i < 0 { i + d } else { i };
    if (0..d).contains(&j) { Ok(j as usize) } else { Err(format!("index {i} is out of range for dim {dim}")) }
}

/// `prod(shape)` with the element count checked against the session's memory limit.
fn output_len(ctx: &ExecCtx<'_>, shape: &[usize], dtype: DType) -> KernelResult<usize> {
    ctx.checked_len(shape, dtype.size_of())
}

impl Kernel for Indexing {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        match self {
            Indexing::GatherNd { batch_dims } => gather_nd(inputs, *batch_dims, ctx).map(|t| vec![t]),
            Indexing::ScatterElements { axis, reduction } => {
                scatter_elements(inputs, *axis, *reduction).map(|t| vec![t])
            }
            Indexing::ScatterNd { reduction } => scatter_nd(inputs, *reduction).map(|t| vec![t]),
            Indexing::OneHot { axis } => one_hot(inputs, *axis, ctx).map(|t| vec![t]),
            Indexing::Compress { axis } => compress(inputs, *axis).map(|t| vec![t]),
            Indexing::NonZero => non_zero(input(inputs, 0)?, ctx).map(|t| vec![t]),
            Indexing::TopK { axis, largest, k } => top_k(inputs, *axis, *largest, *k),
            Indexing::Unique { axis, sorted } => unique(input(inputs, 0)?, *axis, *sorted),
            Indexing::ReverseSequence { batch_axis, time_axis } => {
                reverse_sequence(inputs, *batch_axis, *time_axis).map(|t| vec![t])
            }
            Indexing::EyeLike { dtype, k } => eye_like(input(inputs, 0)?, *dtype, *k).map(|t| vec![t]),
            Indexing::CenterCropPad { axes } => {
                center_crop_pad(inputs, axes.as_deref(), ctx).map(|t| vec![t])
            }
        }
    }
}

fn gather_nd(inputs: &[Option<Tensor>], b: usize, ctx: &ExecCtx<'_>) -> KernelResult<Tensor> {
    let (x, idx) = (input(inputs, 0)?, input(inputs, 1)?);
    let (xs, is) = (x.shape(), idx.shape());
    let Some((&k, lead)) = is.split_last() else { return Err("indices must have rank ≥ 1".into()) };
    if b >= is.len() || b > xs.len() || b + k > xs.len() || xs[..b] != is[..b] {
        return Err(format!("indices {is:?} do not address data {xs:?} with batch_dims {b}"));
    }
    let inner: usize = xs[b + k..].iter().product();
    let batch_block: usize = xs[b..].iter().product();
    let per_batch: usize = lead[b..].iter().product();
    let strides = strides_of(xs);
    let mut shape = lead.to_vec();
    shape.extend_from_slice(&xs[b + k..]);
    output_len(ctx, &shape, x.dtype())?;
    let raw = ints_of(idx)?;
    // Per index tuple: the flat offset of the slice it picks (its batch block plus its indices).
    let starts = (0..lead.iter().product::<usize>())
        .map(|p| {
            (0..k).try_fold((p / per_batch.max(1)) * batch_block, |off, j| {
                Ok(off + wrap_index(raw[p * k + j], xs[b + j])? * strides[b + j])
            })
        })
        .collect::<KernelResult<Vec<usize>>>()?;
    Ok(with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        let mut out = Vec::with_capacity(starts.len() * inner);
        starts.iter().for_each(|&s| out.extend_from_slice(&data[s..s + inner]));
        tensor_from(&shape, out)?
    }))
}

/// Writes `updates[u]` into `out[targets[u]]` with `reduction`, for the numeric types.
fn scatter_into<T: Arith>(
    data: &Tensor,
    updates: &Tensor,
    targets: &[usize],
    unit: usize,
    reduction: Reduction,
) -> KernelResult<Tensor> {
    let mut out = contiguous(typed::<T>(data)?).into_owned();
    let upd = contiguous(typed::<T>(updates)?);
    for (u, &t) in targets.iter().enumerate() {
        for i in 0..unit {
            out[t + i] = reduction.combine(out[t + i], upd[u * unit + i]);
        }
    }
    tensor_from(data.shape(), out)
}

/// [`scatter_into`] for any element type: a plain overwrite, or a reduction on numeric data.
fn scatter(
    data: &Tensor,
    updates: &Tensor,
    targets: &[usize],
    unit: usize,
    r: Reduction,
) -> KernelResult<Tensor> {
    super::same_dtype(data.dtype(), updates.dtype())?;
    if updates.len() != targets.len() * unit {
        return Err(format!("{} updates for {} targets of {unit} elements", updates.len(), targets.len()));
    }
    if r == Reduction::None {
        return Ok(with_dtype!(data.dtype(), T => {
            let mut out = contiguous(typed::<T>(data)?).into_owned();
            let upd = contiguous(typed::<T>(updates)?);
            for (u, &t) in targets.iter().enumerate() {
                out[t..t + unit].copy_from_slice(&upd[u * unit..(u + 1) * unit]);
            }
            tensor_from(data.shape(), out)?
        }));
    }
    match data.dtype() {
        DType::F16 | DType::BF16 | DType::Bool => Err(format!("reduction on {} data", data.dtype())),
        d => numeric!(d, scatter_into(data, updates, targets, unit, r)),
    }
}

fn scatter_elements(inputs: &[Option<Tensor>], axis: i64, r: Reduction) -> KernelResult<Tensor> {
    let (x, idx, upd) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
    let rank = x.shape().len();
    let axis = norm_axis(axis, rank)?;
    let is = idx.shape();
    if is.len() != rank
        || upd.shape() != is
        || is.iter().zip(x.shape()).enumerate().any(|(d, (i, s))| d != axis && i > s)
    {
        return Err(format!("indices {is:?} and updates {:?} do not fit data {:?}", upd.shape(), x.shape()));
    }
    let (xs, ist) = (strides_of(x.shape()), strides_of(is));
    let targets = ints_of(idx)?
        .iter()
        .enumerate()
        .map(|(flat, &i)| {
            let j = wrap_index(i, x.shape()[axis])?;
            Ok((0..rank).map(|d| if d == axis { j } else { (flat / ist[d]) % is[d] } * xs[d]).sum())
        })
        .collect::<KernelResult<Vec<usize>>>()?;
    scatter(x, upd, &targets, 1, r)
}

fn scatter_nd(inputs: &[Option<Tensor>], r: Reduction) -> KernelResult<Tensor> {
    let (x, idx, upd) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
    let Some((&k, lead)) = idx.shape().split_last() else {
        return Err("indices must have rank ≥ 1".into());
    };
    if k > x.shape().len() {
        return Err(format!("index tuples of {k} for data of rank {}", x.shape().len()));
    }
    let mut want = lead.to_vec();
    want.extend_from_slice(&x.shape()[k..]);
    if upd.shape() != want.as_slice() {
        return Err(format!("updates have shape {:?}, expected {want:?}", upd.shape()));
    }
    let strides = strides_of(x.shape());
    let unit: usize = x.shape()[k..].iter().product();
    let raw = ints_of(idx)?;
    let count: usize = lead.iter().product();
    let targets = (0..count)
        .map(|p| {
            (0..k).try_fold(0usize, |off, j| Ok(off + wrap_index(raw[p * k + j], x.shape()[j])? * strides[j]))
        })
        .collect::<KernelResult<Vec<usize>>>()?;
    scatter(x, upd, &targets, unit, r)
}

fn one_hot(inputs: &[Option<Tensor>], axis: i64, ctx: &ExecCtx<'_>) -> KernelResult<Tensor> {
    let (idx, depth, values) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
    let depth = depth.to_f64_vec().first().copied().ok_or("depth is empty")?;
    if !(depth.is_finite() && depth >= 1.0) {
        return Err(format!("depth {depth} is not a positive number"));
    }
    let depth = crate::memory::count_from_f64(depth, "depth")?;
    if values.len() != 2 {
        return Err(format!("values must hold [off, on], got {} elements", values.len()));
    }
    let rank = idx.shape().len() + 1;
    let axis = norm_axis(axis, rank)?;
    let mut shape = idx.shape().to_vec();
    shape.insert(axis, depth);
    output_len(ctx, &shape, values.dtype())?;
    let outer: usize = idx.shape()[..axis].iter().product();
    let inner: usize = idx.shape()[axis..].iter().product();
    let d = depth as f64;
    let hot: Vec<Option<usize>> = idx
        .to_f64_vec()
        .into_iter()
        .map(|v| {
            let v = v.trunc();
            let v = if v < 0.0 { v + d } else { v };
            (v >= 0.0 && v < d).then_some(v as usize)
        })
        .collect();
    Ok(with_dtype!(values.dtype(), T => {
        let vals = contiguous(typed::<T>(values)?);
        let (off, on) = (vals[0], vals[1]);
        let mut out = vec![off; outer * depth * inner];
        for o in 0..outer {
            for i in 0..inner {
                if let Some(h) = hot[o * inner + i] {
                    out[(o * depth + h) * inner + i] = on;
                }
            }
        }
        tensor_from(&shape, out)?
    }))
}

fn compress(inputs: &[Option<Tensor>], axis: Option<i64>) -> KernelResult<Tensor> {
    let (x, cond) = (input(inputs, 0)?, input(inputs, 1)?);
    let keep: Vec<usize> =
        cond.to_f64_vec().iter().enumerate().filter(|(_, c)| **c != 0.0).map(|(i, _)| i).collect();
    let (outer, dim, inner, mut shape, at) = match axis {
        None => (1, x.len(), 1, vec![0], 0),
        Some(a) => {
            let a = norm_axis(a, x.shape().len())?;
            (
                x.shape()[..a].iter().product(),
                x.shape()[a],
                x.shape()[a + 1..].iter().product(),
                x.shape().to_vec(),
                a,
            )
        }
    };
    if let Some(&last) = keep.last()
        && last >= dim
    {
        return Err(format!("condition selects index {last} of a dim of {dim}"));
    }
    shape[at] = keep.len();
    Ok(with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        let mut out = Vec::with_capacity(outer * keep.len() * inner);
        for o in 0..outer {
            for &k in &keep {
                let s = (o * dim + k) * inner;
                out.extend_from_slice(&data[s..s + inner]);
            }
        }
        tensor_from(&shape, out)?
    }))
}

fn non_zero(x: &Tensor, ctx: &ExecCtx<'_>) -> KernelResult<Tensor> {
    let shape = if x.shape().is_empty() { vec![1] } else { x.shape().to_vec() };
    let strides = strides_of(&shape);
    let hits: Vec<usize> =
        x.to_f64_vec().iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, _)| i).collect();
    output_len(ctx, &[shape.len(), hits.len()], DType::I64)?;
    let mut out = Vec::with_capacity(shape.len() * hits.len());
    for d in 0..shape.len() {
        out.extend(hits.iter().map(|&h| ((h / strides[d]) % shape[d]) as i64));
    }
    tensor_from(&[shape.len(), hits.len()], out)
}

/// Orders `a` before `b` when `a` is larger (`largest`) or smaller; NaN counts as the largest.
fn rank_order<T: PartialOrd>(a: &T, b: &T, largest: bool) -> Ordering {
    #[allow(clippy::eq_op)]
    let nan = |v: &T| v != v;
    let ord = match (nan(a), nan(b)) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(b).unwrap_or(Ordering::Equal),
    };
    if largest { ord.reverse() } else { ord }
}

fn top_k(
    inputs: &[Option<Tensor>],
    axis: i64,
    largest: bool,
    k_attr: Option<i64>,
) -> KernelResult<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let k = match k_attr {
        Some(k) => k,
        None => *ints_of(input(inputs, 1)?)?.first().ok_or("K is empty")?,
    };
    let axis = norm_axis(axis, x.shape().len())?;
    let dim = x.shape()[axis];
    let k =
        usize::try_from(k).ok().filter(|&k| k <= dim).ok_or_else(|| format!("K {k} is not in 0..={dim}"))?;
    let (outer, inner) =
        (x.shape()[..axis].iter().product::<usize>(), x.shape()[axis + 1..].iter().product::<usize>());
    let mut shape = x.shape().to_vec();
    shape[axis] = k;
    let indices;
    let values = with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        let mut picked = vec![T::default(); outer * k * inner];
        let mut order: Vec<usize> = Vec::with_capacity(dim);
        let mut chosen = vec![0i64; outer * k * inner];
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| (o * dim + j) * inner + i;
                order.clear();
                order.extend(0..dim);
                order.sort_by(|&a, &b| rank_order(&data[at(a)], &data[at(b)], largest));
                for (r, &j) in order.iter().take(k).enumerate() {
                    let dst = (o * k + r) * inner + i;
                    picked[dst] = data[at(j)];
                    chosen[dst] = j as i64;
                }
            }
        }
        indices = chosen;
        tensor_from(&shape, picked)?
    });
    Ok(vec![values, tensor_from(&shape, indices)?])
}

fn unique(x: &Tensor, axis: Option<i64>, sorted: bool) -> KernelResult<Vec<Tensor>> {
    let (outer, dim, inner, axis_at, mut shape) = match axis {
        None => (1, x.len(), 1, 0, vec![x.len()]),
        Some(a) => {
            let a = norm_axis(a, x.shape().len())?;
            (
                x.shape()[..a].iter().product(),
                x.shape()[a],
                x.shape()[a + 1..].iter().product(),
                a,
                x.shape().to_vec(),
            )
        }
    };
    let (first, counts): (Vec<i64>, Vec<i64>);
    let mut inverse = vec![0i64; dim];
    let y = with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        let slice_of = |j: usize| -> Vec<T> {
            (0..outer).flat_map(|o| data[(o * dim + j) * inner..(o * dim + j + 1) * inner].iter().copied()).collect()
        };
        let slices: Vec<Vec<T>> = (0..dim).map(slice_of).collect();
        let cmp = |a: &Vec<T>, b: &Vec<T>| {
            a.iter().zip(b).map(|(p, q)| rank_order(p, q, false)).find(|o| o.is_ne()).unwrap_or(Ordering::Equal)
        };
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| cmp(&slices[a], &slices[b]));
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut member = vec![0usize; dim];
        for &j in &order {
            match groups.last_mut() {
                Some((head, n)) if cmp(&slices[*head], &slices[j]).is_eq() => *n += 1,
                _ => groups.push((j, 1)),
            }
            member[j] = groups.len() - 1;
        }
        let mut rank: Vec<usize> = (0..groups.len()).collect();
        if !sorted {
            rank.sort_by_key(|&g| groups[g].0);
        }
        let mut position = vec![0usize; groups.len()];
        rank.iter().enumerate().for_each(|(p, &g)| position[g] = p);
        for j in 0..dim {
            inverse[j] = position[member[j]] as i64;
        }
        first = rank.iter().map(|&g| groups[g].0 as i64).collect();
        counts = rank.iter().map(|&g| groups[g].1 as i64).collect();
        shape[axis_at] = groups.len();
        let mut out = Vec::with_capacity(outer * groups.len() * inner);
        for o in 0..outer {
            for &g in &rank {
                let s = (o * dim + groups[g].0) * inner;
                out.extend_from_slice(&data[s..s + inner]);
            }
        }
        tensor_from(&shape, out)?
    });
    let n = first.len();
    Ok(vec![y, tensor_from(&[n], first)?, tensor_from(&[dim], inverse)?, tensor_from(&[n], counts)?])
}

fn reverse_sequence(inputs: &[Option<Tensor>], batch_axis: i64, time_axis: i64) -> KernelResult<Tensor> {
    let (x, lens) = (input(inputs, 0)?, input(inputs, 1)?);
    let rank = x.shape().len();
    let (ba, ta) = (norm_axis(batch_axis, rank)?, norm_axis(time_axis, rank)?);
    if ba == ta {
        return Err("batch_axis and time_axis are the same".into());
    }
    let (batch, time) = (x.shape()[ba], x.shape()[ta]);
    let lens = ints_of(lens)?;
    if lens.len() != batch {
        return Err(format!("{} sequence lengths for a batch of {batch}", lens.len()));
    }
    if let Some(l) = lens.iter().find(|&&l| !(0..=time as i64).contains(&l)) {
        return Err(format!("sequence length {l} is not in 0..={time}"));
    }
    let strides = strides_of(x.shape());
    Ok(with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        let mut out = data.to_vec();
        for (flat, slot) in out.iter_mut().enumerate() {
            let (b, t) = ((flat / strides[ba]) % batch, (flat / strides[ta]) % time);
            let len = lens[b] as usize;
            if t < len {
                let src = flat - t * strides[ta] + (len - 1 - t) * strides[ta];
                *slot = data[src];
            }
        }
        tensor_from(x.shape(), out)?
    }))
}

fn eye_like(x: &Tensor, dtype: Option<DType>, k: i64) -> KernelResult<Tensor> {
    let [rows, cols] = x.shape() else { return Err(format!("input must be 2-D, got {:?}", x.shape())) };
    let (rows, cols) = (*rows, *cols);
    let mut ones = vec![0i64; rows * cols];
    for r in 0..rows {
        let c = r as i64 + k;
        if (0..cols as i64).contains(&c) {
            ones[r * cols + c as usize] = 1;
        }
    }
    let to = dtype.unwrap_or(x.dtype());
    let t = tensor_from(&[rows, cols], ones)?;
    super::movement::cast(&t, to)
}

fn center_crop_pad(
    inputs: &[Option<Tensor>],
    axes: Option<&[i64]>,
    ctx: &ExecCtx<'_>,
) -> KernelResult<Tensor> {
    let (x, target) = (input(inputs, 0)?, input(inputs, 1)?);
    let rank = x.shape().len();
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?,
        None => (0..rank).collect(),
    };
    let target = ints_of(target)?;
    if target.len() != axes.len() {
        return Err(format!("{} target sizes for {} axes", target.len(), axes.len()));
    }
    let mut shape = x.shape().to_vec();
    // Per axis: the signed offset from an output coordinate to the input one.
    let mut offset = vec![0i64; rank];
    for (&a, &t) in axes.iter().zip(&target) {
        let t = usize::try_from(t).map_err(|_| format!("target size {t} is negative"))?;
        let dim = x.shape()[a];
        offset[a] = if t <= dim { ((dim - t) / 2) as i64 } else { -(((t - dim) / 2) as i64) };
        shape[a] = t;
    }
    let len = output_len(ctx, &shape, x.dtype())?;
    let (xs, os) = (strides_of(x.shape()), strides_of(&shape));
    let source: Vec<Option<usize>> = (0..len)
        .map(|flat| {
            (0..rank).try_fold(0usize, |off, d| {
                let c = ((flat / os[d]) % shape[d]) as i64 + offset[d];
                (0..x.shape()[d] as i64).contains(&c).then(|| off + c as usize * xs[d])
            })
        })
        .collect();
    Ok(with_dtype!(x.dtype(), T => {
        let data = contiguous(typed::<T>(x)?);
        tensor_from(&shape, source.iter().map(|s| s.map_or(T::default(), |s| data[s])).collect())?
    }))
}
