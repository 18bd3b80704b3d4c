//! Reductions over a set of axes (`ReduceMean`, `ReduceSum`, `ReduceMax`, `ReduceMin`,
//! `ReduceProd`, `ReduceL1`, `ReduceL2`, `ReduceSumSquare`, `ReduceLogSumExp`) and `ArgMax`/`ArgMin`.
//! Axes come from the attribute or, from the opset where ONNX moved them, the second input.
//! Float data reduce in f32 (f64 accumulators); integer data exactly in i64 (wrapping, as
//! integer kernels do), the mean truncated, the logarithmic kinds through f64; bool data take
//! `ReduceMax` (any) and `ReduceMin` (all).

use ndarray::IxDyn;
use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, ints_of, norm_axis, opt_input, typed};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    let (kind, axes_moved_at) = match node.op_type.as_str() {
        "ReduceMean" => (ReduceKind::Mean, 18),
        "ReduceSum" => (ReduceKind::Sum, 13),
        "ReduceMax" => (ReduceKind::Max, 18),
        "ReduceMin" => (ReduceKind::Min, 18),
        "ReduceProd" => (ReduceKind::Prod, 18),
        "ReduceL1" => (ReduceKind::L1, 18),
        "ReduceL2" => (ReduceKind::L2, 18),
        "ReduceSumSquare" => (ReduceKind::SumSquare, 18),
        "ReduceLogSumExp" => (ReduceKind::LogSumExp, 18),
        "ReduceLogSum" => (ReduceKind::LogSum, 18),
        "ArgMax" | "ArgMin" => {
            return Some((|| {
                Ok(Box::new(ArgReduce {
                    max: node.op_type == "ArgMax",
                    axis: node.int_attr("axis", 0)?,
                    keepdims: node.int_attr("keepdims", 1)? != 0,
                    last: node.int_attr("select_last_index", 0)? != 0,
                }) as Box<dyn Kernel>)
            })());
        }
        _ => return None,
    };
    Some((|| {
        let attr_axes =
            if opset < axes_moved_at { node.ints_attr("axes")?.map(<[i64]>::to_vec) } else { None };
        Ok(Box::new(Reduce {
            kind,
            attr_axes,
            keepdims: node.int_attr("keepdims", 1)? != 0,
            noop_with_empty_axes: node.int_attr("noop_with_empty_axes", 0)? != 0,
        }) as Box<dyn Kernel>)
    })())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ReduceKind {
    Mean,
    Sum,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSumExp,
    LogSum,
}

struct Reduce {
    kind: ReduceKind,
    attr_axes: Option<Vec<i64>>,
    keepdims: bool,
    noop_with_empty_axes: bool,
}

impl ReduceKind {
    fn lane(self, v: impl Iterator<Item = f32> + Clone, n: usize) -> f32 {
        let sum = |it: &mut dyn Iterator<Item = f64>| it.sum::<f64>();
        match self {
            ReduceKind::Mean => (sum(&mut v.map(f64::from)) / n as f64) as f32,
            ReduceKind::Sum => sum(&mut v.map(f64::from)) as f32,
            ReduceKind::Max => v.fold(f32::NEG_INFINITY, |a, b| if b > a || b.is_nan() { b } else { a }),
            ReduceKind::Min => v.fold(f32::INFINITY, |a, b| if b < a || b.is_nan() { b } else { a }),
            ReduceKind::Prod => v.map(f64::from).product::<f64>() as f32,
            ReduceKind::L1 => sum(&mut v.map(|x| f64::from(x).abs())) as f32,
            ReduceKind::L2 => sum(&mut v.map(|x| f64::from(x).powi(2))).sqrt() as f32,
            ReduceKind::SumSquare => sum(&mut v.map(|x| f64::from(x).powi(2))) as f32,
            ReduceKind::LogSum => sum(&mut v.map(f64::from)).ln() as f32,
            ReduceKind::LogSumExp => {
                let max = v.clone().fold(f32::NEG_INFINITY, f32::max);
                if max.is_infinite() {
                    return max;
                }
                (f64::from(max) + sum(&mut v.map(|x| f64::from(x - max).exp())).ln()) as f32
            }
        }
    }
}

impl ReduceKind {
    /// The reduction of an integer lane, computed in i64 (the float-valued kinds through f64).
    fn int_lane(self, v: &[i64]) -> i64 {
        match self {
            ReduceKind::Sum => v.iter().fold(0i64, |a, &b| a.wrapping_add(b)),
            ReduceKind::Mean => {
                v.iter().fold(0i64, |a, &b| a.wrapping_add(b)).checked_div(v.len() as i64).unwrap_or(0)
            }
            ReduceKind::Max => v.iter().copied().max().unwrap_or(i64::MIN),
            ReduceKind::Min => v.iter().copied().min().unwrap_or(i64::MAX),
            ReduceKind::Prod => v.iter().fold(1i64, |a, &b| a.wrapping_mul(b)),
            ReduceKind::L1 => v.iter().fold(0i64, |a, &b| a.wrapping_add(b.wrapping_abs())),
            ReduceKind::SumSquare => v.iter().fold(0i64, |a, &b| a.wrapping_add(b.wrapping_mul(b))),
            ReduceKind::L2 | ReduceKind::LogSum | ReduceKind::LogSumExp => {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                self.lane(f.iter().copied(), v.len()) as i64
            }
        }
    }
}

/// The elements of `a` with the `kept` axes first and the `reduced` ones last, row-major (so
/// each run of `n` elements is one lane to reduce).
fn lanes<T: Clone>(a: ndarray::ArrayViewD<'_, T>, kept: &[usize], reduced: &[usize]) -> Vec<T> {
    let mut perm = kept.to_vec();
    perm.extend(reduced);
    a.permuted_axes(IxDyn(&perm)).iter().cloned().collect()
}

impl Kernel for Reduce {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let shape = x.shape().to_vec();
        let rank = shape.len();
        let axes = match &self.attr_axes {
            Some(a) => a.clone(),
            None => opt_input(inputs, 1).map(ints_of).transpose()?.unwrap_or_default(),
        };
        if axes.is_empty() && self.noop_with_empty_axes {
            return Ok(vec![x.clone()]);
        }
        let mut reduced: Vec<usize> = if axes.is_empty() {
            (0..rank).collect()
        } else {
            axes.iter().map(|&a| norm_axis(a, rank)).collect::<KernelResult<_>>()?
        };
        reduced.sort_unstable();
        reduced.dedup();
        let kept: Vec<usize> = (0..rank).filter(|a| !reduced.contains(a)).collect();
        let n: usize = reduced.iter().map(|&i| shape[i]).product();
        let outer: usize = kept.iter().map(|&i| shape[i]).product();
        let out_shape: Vec<usize> = if self.keepdims {
            (0..rank).map(|i| if reduced.contains(&i) { 1 } else { shape[i] }).collect()
        } else {
            kept.iter().map(|&i| shape[i]).collect()
        };
        if x.dtype() != qgraph::DType::F32 {
            let bool_kind = matches!(self.kind, ReduceKind::Max | ReduceKind::Min);
            if x.dtype().is_float() || (x.dtype() == qgraph::DType::Bool && !bool_kind) {
                return Err(format!("{:?} does not reduce {} data", self.kind, x.dtype()));
            }
            let ints = x.to_i64_vec().ok_or("internal: integer data")?;
            let a = ndarray::ArrayViewD::from_shape(IxDyn(&shape), &ints).map_err(|e| e.to_string())?;
            let data = lanes(a, &kept, &reduced);
            let out: Vec<i64> = if n == 0 {
                vec![self.kind.int_lane(&[]); outer]
            } else {
                data.chunks(n).map(|lane| self.kind.int_lane(lane)).collect()
            };
            let out = if n == 0 && x.dtype() == qgraph::DType::Bool {
                vec![i64::from(self.kind == ReduceKind::Min); outer]
            } else {
                out
            };
            return Ok(vec![
                Tensor::from_i64s(x.dtype(), &out_shape, &out).ok_or("internal: reduced shape")?,
            ]);
        }
        let mut perm = kept.clone();
        perm.extend(&reduced);
        let view = typed::<f32>(x)?.view().permuted_axes(IxDyn(&perm));
        let view = view.as_standard_layout();
        let data = view.as_slice().ok_or("internal")?;
        let out: Vec<f32> = if n == 0 {
            vec![self.kind.lane(std::iter::empty(), 0); outer]
        } else {
            data.chunks(n).map(|lane| self.kind.lane(lane.iter().copied(), n)).collect()
        };
        Ok(vec![super::tensor_from(&out_shape, out)?])
    }
}

struct ArgReduce {
    max: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

impl Kernel for ArgReduce {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let shape = x.shape().to_vec();
        let axis = norm_axis(self.axis, shape.len())?;
        let v = x.to_f64_vec();
        let (outer, n, inner) = (
            shape[..axis].iter().product::<usize>(),
            shape[axis],
            shape[axis + 1..].iter().product::<usize>(),
        );
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let mut best = 0usize;
                for j in 1..n {
                    let (cand, cur) = (v[(o * n + j) * inner + i], v[(o * n + best) * inner + i]);
                    let better = if self.max { cand > cur } else { cand < cur };
                    if better || (self.last && cand == cur) {
                        best = j;
                    }
                }
                out.push(best as i64);
            }
        }
        let mut out_shape = shape.clone();
        if self.keepdims {
            out_shape[axis] = 1;
        } else {
            out_shape.remove(axis);
        }
        Ok(vec![super::tensor_from(&out_shape, out)?])
    }
}
