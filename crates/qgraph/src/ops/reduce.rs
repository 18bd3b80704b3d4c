//! Reductions (`ReduceMean`, `ReduceSum`, …) and `ArgMax`/`ArgMin`: axes from the attribute or, in
//! newer opsets, from the second input; `keepdims` and `noop_with_empty_axes` as ONNX defines them.

use super::{Fact, OpSpec, input_ints, normalize_axis, required};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::Node;
use crate::shape::{Dim, Shape};

pub(super) fn spec(op: &str) -> Option<&'static dyn OpSpec> {
    Some(match op {
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
        | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => &ReduceOp,
        "ArgMax" | "ArgMin" => &ArgOp,
        _ => return None,
    })
}

/// Output shape of reducing `shape` over `axes` (all axes when empty).
fn reduced(shape: &Shape, axes: &[usize], keepdims: bool) -> Shape {
    let all = axes.is_empty();
    Shape(
        shape
            .0
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                if all || axes.contains(&i) { keepdims.then_some(Dim::Known(1)) } else { Some(d.clone()) }
            })
            .collect(),
    )
}

struct ReduceOp;
impl OpSpec for ReduceOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(xs) = &x.shape else { return Ok(vec![Fact::typed(x.dtype, None)]) };
        let keepdims = node.int_attr("keepdims", 1)? != 0;
        let axes_from_input = opset >= 18 || (node.op_type == "ReduceSum" && opset >= 13);
        let axes = if axes_from_input {
            if inputs.get(1).is_some_and(Option::is_some) {
                match input_ints(inputs, 1) {
                    Some(a) => a,
                    None => return Ok(vec![Fact::typed(x.dtype, None)]),
                }
            } else {
                Vec::new()
            }
        } else {
            node.ints_attr("axes")?.map(<[i64]>::to_vec).unwrap_or_default()
        };
        if axes.is_empty() && node.int_attr("noop_with_empty_axes", 0)? != 0 {
            return Ok(vec![Fact::typed(x.dtype, Some(xs.clone()))]);
        }
        let axes: Vec<usize> =
            axes.iter().map(|&a| normalize_axis(node, a, xs.rank())).collect::<Result<_>>()?;
        Ok(vec![Fact::typed(x.dtype, Some(reduced(xs, &axes, keepdims)))])
    }
}

struct ArgOp;
impl OpSpec for ArgOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let Some(xs) = &x.shape else { return Ok(vec![Fact::typed(Some(DType::I64), None)]) };
        let axis = normalize_axis(node, node.int_attr("axis", 0)?, xs.rank())?;
        let keepdims = node.int_attr("keepdims", 1)? != 0;
        Ok(vec![Fact::typed(Some(DType::I64), Some(reduced(xs, &[axis], keepdims)))])
    }
}
