//! Elementwise op families: unary (shape-preserving), broadcasting binary arithmetic, comparisons
//! and logic, `Where`, `Cast`. Integer values are folded so shape arithmetic resolves at load time.

use ndarray::{ArrayD, IxDyn};

use super::{Fact, OpSpec, broadcast_all, foldable, int_array, int_tensor, like_input, required};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::Node;
use crate::tensor::Tensor;

pub(super) fn spec(op: &str) -> Option<&'static dyn OpSpec> {
    Some(match op {
        "Relu" | "Sqrt" | "Erf" | "Exp" | "Log" | "Tanh" | "Sigmoid" | "HardSigmoid" | "HardSwish"
        | "LeakyRelu" | "Neg" | "Abs" | "Reciprocal" | "Floor" | "Ceil" | "Round" | "Sign" | "Sin"
        | "Cos" | "Elu" | "Selu" | "Softplus" | "Softsign" | "Gelu" | "Celu" | "Mish" | "Clip" | "Not"
        | "ThresholdedRelu" | "Shrink" => &Unary,
        "Identity" => &IdentityOp,
        "Dropout" => &DropoutOp,
        "IsNaN" | "IsInf" => &Predicate,
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Min" | "Max" | "Sum" | "Mean" | "BitShift"
        | "PRelu" => &Arithmetic,
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => &Comparison,
        "Where" => &WhereOp,
        "Cast" => &CastOp,
        "CastLike" => &CastLikeOp,
        _ => return None,
    })
}

struct Unary;
impl OpSpec for Unary {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        like_input(node, inputs)
    }
}

struct IdentityOp;
impl OpSpec for IdentityOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        Ok(vec![required(node, inputs, 0)?.clone()])
    }
}

struct DropoutOp;
impl OpSpec for DropoutOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        Ok(vec![Fact::typed(x.dtype, x.shape.clone()), Fact::typed(Some(DType::Bool), x.shape.clone())])
    }
}

struct Predicate;
impl OpSpec for Predicate {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        Ok(vec![Fact::typed(Some(DType::Bool), x.shape.clone())])
    }
}

/// Broadcast shape of all present inputs.
fn broadcast_inputs(node: &Node, inputs: &[Option<Fact>]) -> Result<Option<crate::shape::Shape>> {
    let shapes: Vec<_> = inputs.iter().flatten().map(|f| f.shape.as_ref()).collect();
    broadcast_all(node, &shapes)
}

/// Folds an integer elementwise op over broadcast inputs; `None` if any value is unknown, not
/// integer, too large, or `f` declines (e.g. division by zero).
fn fold_ints(inputs: &[&Fact], out_dtype: DType, f: impl Fn(&[i64]) -> Option<i64>) -> Option<Tensor> {
    let arrays: Vec<ArrayD<i64>> =
        inputs.iter().map(|x| x.value.as_ref().and_then(int_array)).collect::<Option<_>>()?;
    let mut out_shape: Vec<usize> = Vec::new();
    for a in &arrays {
        let (r, s) = (out_shape.len().max(a.ndim()), a.shape());
        let mut merged = vec![1; r];
        for (i, m) in merged.iter_mut().enumerate() {
            let x = (i + out_shape.len()).checked_sub(r).map_or(1, |k| out_shape[k]);
            let y = (i + s.len()).checked_sub(r).map_or(1, |k| s[k]);
            *m = if x == 1 { y } else { x };
        }
        out_shape = merged;
    }
    if !foldable(&out_shape) {
        return None;
    }
    let views: Vec<_> = arrays.iter().map(|a| a.broadcast(IxDyn(&out_shape))).collect::<Option<_>>()?;
    let mut out = ArrayD::<i64>::zeros(IxDyn(&out_shape));
    let mut args = vec![0i64; views.len()];
    for (idx, o) in out.indexed_iter_mut() {
        for (arg, v) in args.iter_mut().zip(&views) {
            *arg = v[&idx];
        }
        *o = f(&args)?;
    }
    int_tensor(out_dtype, &out)
}

struct Arithmetic;
impl OpSpec for Arithmetic {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let op = node.op_type.as_str();
        if !matches!(op, "Sum" | "Mean" | "Min" | "Max") {
            required(node, inputs, 1)?;
        }
        let shape = broadcast_inputs(node, inputs)?;
        let dtype = x.dtype.or_else(|| inputs.iter().flatten().find_map(|f| f.dtype));
        let present: Vec<&Fact> = inputs.iter().flatten().collect();
        let value = dtype.filter(|d| d.is_integer()).and_then(|d| {
            fold_ints(&present, d, |a| match (op, a) {
                ("Add" | "Sum", _) => a.iter().try_fold(0i64, |s, &v| s.checked_add(v)),
                ("Sub", [x, y]) => x.checked_sub(*y),
                ("Mul", [x, y]) => x.checked_mul(*y),
                ("Div", [x, y]) => x.checked_div(*y),
                ("Mod", [x, y]) => x.checked_rem(*y),
                ("Min", _) => a.iter().copied().min(),
                ("Max", _) => a.iter().copied().max(),
                _ => None,
            })
        });
        Ok(vec![match value {
            Some(v) => Fact::of_value(v),
            None => Fact::typed(dtype, shape),
        }])
    }
}

struct Comparison;
impl OpSpec for Comparison {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let a = required(node, inputs, 0)?;
        let b = required(node, inputs, 1)?;
        let shape = broadcast_inputs(node, inputs)?;
        let integral = a.dtype.is_some_and(|d| !d.is_float());
        let op = node.op_type.as_str();
        let value = integral
            .then(|| {
                fold_ints(&[a, b], DType::Bool, |v| {
                    let (x, y) = (v[0], v[1]);
                    Some(i64::from(match op {
                        "Equal" => x == y,
                        "Less" => x < y,
                        "Greater" => x > y,
                        "LessOrEqual" => x <= y,
                        "GreaterOrEqual" => x >= y,
                        "And" => x != 0 && y != 0,
                        "Or" => x != 0 || y != 0,
                        "Xor" => (x != 0) != (y != 0),
                        _ => return None,
                    }))
                })
            })
            .flatten();
        Ok(vec![value.map_or_else(|| Fact::typed(Some(DType::Bool), shape), Fact::of_value)])
    }
}

struct WhereOp;
impl OpSpec for WhereOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let c = required(node, inputs, 0)?;
        let x = required(node, inputs, 1)?;
        let y = required(node, inputs, 2)?;
        let shape = broadcast_inputs(node, inputs)?;
        let value = x
            .dtype
            .filter(|d| !d.is_float())
            .and_then(|d| fold_ints(&[c, x, y], d, |v| Some(if v[0] != 0 { v[1] } else { v[2] })));
        Ok(vec![value.map_or_else(|| Fact::typed(x.dtype, shape), Fact::of_value)])
    }
}

/// Folds a cast of an integer value; float sources are not folded.
fn fold_cast(x: &Fact, to: DType) -> Option<Tensor> {
    let ints = x.ints()?;
    let shape = x.value.as_ref()?.shape().to_vec();
    Tensor::from_i64s(to, &shape, &ints)
}

struct CastOp;
impl OpSpec for CastOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let code = node.int_attr("to", 0)?;
        let to = DType::from_onnx(code as i32).ok_or_else(|| {
            node.invalid_attr(
                "to",
                format!("unsupported target dtype {}", crate::dtype::onnx_code_name(code as i32)),
            )
        })?;
        Ok(vec![fold_cast(x, to).map_or_else(|| Fact::typed(Some(to), x.shape.clone()), Fact::of_value)])
    }
}

struct CastLikeOp;
impl OpSpec for CastLikeOp {
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], _opset: i64) -> Result<Vec<Fact>> {
        let x = required(node, inputs, 0)?;
        let like = required(node, inputs, 1)?;
        let folded = like.dtype.and_then(|to| fold_cast(x, to));
        Ok(vec![folded.map_or_else(|| Fact::typed(like.dtype, x.shape.clone()), Fact::of_value)])
    }
}
