//! Per-op metadata in one place: the `OpSpec` trait answers, for each supported op type, which
//! inputs are parameters (weight, bias, …), the per-channel axis of a weight, the MAC count, and the
//! output types/shapes — plus the output *values* of integer shape computations, which is what
//! shape inference and constant folding of `Shape → Gather → Concat → Reshape` chains run on.

mod elementwise;
mod movement;
mod nn;
mod reduce;

use ndarray::{ArrayD, IxDyn};

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::Node;
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;

/// Largest integer tensor (elements) whose value shape inference computes and folding stores.
pub const MAX_FOLDED_ELEMENTS: usize = 1 << 16;

/// The role of a parameter input, named as AIMET's ConnectedGraph names it (`weight`, `bias`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// Main weight (Conv kernel, Gemm/MatMul matrix, norm gamma).
    Weight,
    /// Bias (or norm beta).
    Bias,
    /// BatchNormalization running mean.
    RunningMean,
    /// BatchNormalization running variance.
    RunningVar,
    /// Recurrent weight of RNN/GRU/LSTM.
    RecurrentWeight,
}

impl ParamRole {
    /// AIMET's param-type name, as used in quantsim configs (`"weight"`, `"bias"`, …).
    pub fn aimet_name(self) -> &'static str {
        match self {
            ParamRole::Weight => "weight",
            ParamRole::Bias => "bias",
            ParamRole::RunningMean => "running_mean",
            ParamRole::RunningVar => "running_var",
            ParamRole::RecurrentWeight => "weight_r",
        }
    }
}

/// What is known about one value during inference: type, shape, and for small integer tensors
/// the value itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fact {
    /// Element type.
    pub dtype: Option<DType>,
    /// Shape.
    pub shape: Option<Shape>,
    /// The value, when computable at load time.
    pub value: Option<Tensor>,
}

impl Fact {
    /// A fact with type and shape.
    pub fn typed(dtype: Option<DType>, shape: Option<Shape>) -> Fact {
        Fact { dtype, shape, value: None }
    }

    /// A fact for a known value.
    pub fn of_value(t: Tensor) -> Fact {
        Fact { dtype: Some(t.dtype()), shape: Some(Shape::known(t.shape())), value: Some(t) }
    }

    /// The shape if fully known.
    pub fn dims(&self) -> Option<Vec<usize>> {
        self.shape.as_ref().and_then(Shape::to_known)
    }

    /// The rank if known.
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Shape::rank)
    }

    /// The value as i64s, if known and integer.
    pub fn ints(&self) -> Option<Vec<i64>> {
        self.value.as_ref().and_then(Tensor::to_i64_vec)
    }
}

/// Op-specific knowledge. One implementation per op family; `op_spec` maps op types to them.
pub trait OpSpec: Sync {
    /// Input slots that are parameters when static, with their roles.
    fn param_slots(&self, _node: &Node) -> &'static [(usize, ParamRole)] {
        &[]
    }

    /// The per-channel axis of the parameter at `slot` (rank `rank`), `None` if per-channel is
    /// impossible. `through_transpose` says the weight reaches the node through a `Transpose`.
    fn channel_axis(
        &self,
        _node: &Node,
        _slot: usize,
        rank: usize,
        _through_transpose: bool,
    ) -> Result<Option<usize>> {
        Ok((rank == 1).then_some(0))
    }

    /// Multiply-accumulates per sample (batch excluded), for compute-heavy ops.
    fn macs(&self, _node: &Node, _inputs: &[Option<Fact>], _outputs: &[Fact]) -> Option<u64> {
        None
    }

    /// Output facts from input facts (`None` = omitted optional input). `opset` is the default
    /// domain's version, for ops whose signature changed.
    fn infer(&self, node: &Node, inputs: &[Option<Fact>], opset: i64) -> Result<Vec<Fact>>;
}

/// The spec for an op type of the default ONNX domain, if the IR knows it.
pub fn op_spec(op_type: &str) -> Option<&'static dyn OpSpec> {
    elementwise::spec(op_type)
        .or_else(|| movement::spec(op_type))
        .or_else(|| nn::spec(op_type))
        .or_else(|| reduce::spec(op_type))
}

/// Input `slot`'s fact, or a shape error naming the node.
pub(crate) fn required<'a>(node: &Node, inputs: &'a [Option<Fact>], slot: usize) -> Result<&'a Fact> {
    inputs
        .get(slot)
        .and_then(Option::as_ref)
        .ok_or_else(|| node.shape_error(format!("missing required input {slot}")))
}

/// Resolves a possibly negative axis against `rank`.
pub(crate) fn normalize_axis(node: &Node, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(node.shape_error(format!("axis {axis} out of range for rank {rank}")))
    }
}

/// Multidirectional (numpy) broadcast of two shapes.
pub(crate) fn broadcast(node: &Node, a: &Shape, b: &Shape) -> Result<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = (i + a.rank()).checked_sub(r).map(|k| &a.0[k]);
        let db = (i + b.rank()).checked_sub(r).map(|k| &b.0[k]);
        out.push(match (da, db) {
            (None, Some(d)) | (Some(d), None) => d.clone(),
            (Some(Dim::Known(1)), Some(d)) | (Some(d), Some(Dim::Known(1))) => d.clone(),
            (Some(Dim::Known(x)), Some(Dim::Known(y))) if x == y => Dim::Known(*x),
            (Some(Dim::Known(x)), Some(Dim::Known(y))) => {
                return Err(node.shape_error(format!("cannot broadcast {a} with {b} (dims {x} and {y})")));
            }
            (Some(Dim::Symbol(s)), Some(Dim::Symbol(t))) if s == t => Dim::Symbol(s.clone()),
            (Some(Dim::Known(x)), Some(Dim::Symbol(_))) | (Some(Dim::Symbol(_)), Some(Dim::Known(x))) => {
                Dim::Known(*x)
            }
            _ => Dim::Symbol(String::new()),
        });
    }
    Ok(Shape(out))
}

/// Broadcast of several optional shapes; `None` if any is unknown.
pub(crate) fn broadcast_all(node: &Node, shapes: &[Option<&Shape>]) -> Result<Option<Shape>> {
    let mut acc: Option<Shape> = None;
    for s in shapes {
        let Some(s) = s else { return Ok(None) };
        acc = Some(match acc {
            None => (*s).clone(),
            Some(a) => broadcast(node, &a, s)?,
        });
    }
    Ok(acc)
}

/// An integer tensor as an i64 array (for value folding).
pub(crate) fn int_array(t: &Tensor) -> Option<ArrayD<i64>> {
    ArrayD::from_shape_vec(IxDyn(t.shape()), t.to_i64_vec()?).ok()
}

/// An i64 array converted back to `dtype`.
pub(crate) fn int_tensor(dtype: DType, a: &ArrayD<i64>) -> Option<Tensor> {
    let v: Vec<i64> = a.iter().copied().collect();
    Tensor::from_i64s(dtype, a.shape(), &v)
}

/// Whether a value of this shape is small enough to compute at load time.
pub(crate) fn foldable(shape: &[usize]) -> bool {
    crate::shape::checked_numel(shape).is_some_and(|n| n <= MAX_FOLDED_ELEMENTS)
}

/// The integer list held by input `slot` (shape, axes, pads…) if known.
pub(crate) fn input_ints(inputs: &[Option<Fact>], slot: usize) -> Option<Vec<i64>> {
    inputs.get(slot).and_then(Option::as_ref).and_then(Fact::ints)
}

/// Same dtype and shape as input 0 (helper for shape-preserving ops).
pub(crate) fn like_input(node: &Node, inputs: &[Option<Fact>]) -> Result<Vec<Fact>> {
    let x = required(node, inputs, 0)?;
    Ok(vec![Fact::typed(x.dtype, x.shape.clone())])
}
