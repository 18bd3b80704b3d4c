//! Reverse-mode gradients of a whole graph: the values of a forward run (from `qexec`, kept with
//! `Keep::All`) and gradients seeded at some values flow back, node by node in reverse
//! topological order, through each op's vector-Jacobian rule (`graph/rules.rs`) to the values
//! asked for. Only nodes on a path from those values to a seed are visited. A caller-supplied
//! `through` sees each value's gradient once it is complete, before it flows on: quantization
//! simulation turns the gradient by a quantized value into the gradient by the value before
//! fake-quant there (the straight-through estimator) and records its scale and offset gradients.

use std::collections::{HashMap, HashSet};

use ndarray::ArrayD;
use qexec::ValueCache;
use qgraph::{Model, NodeId, Tensor, ValueId};

use crate::error::{GradError, Result, shape_error};

mod pool;
mod rules;
#[cfg(test)]
mod tests;

/// The tensors of one forward run that the rules read.
pub trait ForwardValues {
    /// `v` as its readers read it (after any fake-quant). Initializers not given here are read
    /// from the model.
    fn read(&self, v: ValueId) -> Option<&Tensor>;

    /// `v` as its producer computed it (before any fake-quant); defaults to [`Self::read`].
    fn produced(&self, v: ValueId) -> Option<&Tensor> {
        self.read(v)
    }
}

impl ForwardValues for ValueCache {
    fn read(&self, v: ValueId) -> Option<&Tensor> {
        self.get(v)
    }
}

/// Gradients by value: an f32 array of the value's shape.
pub type Gradients = HashMap<ValueId, ArrayD<f32>>;

/// The gradients of a loss by the values `wrt` (graph inputs, initializers or node outputs),
/// given its gradients `seeds` by some values of `model`'s forward run `values`. `through(v,
/// grad)` is called on every value's complete gradient before it flows on to `v`'s producer
/// (and before a `wrt` value's is returned) and may rewrite it. A `wrt` value no seed depends on
/// gets no entry. An op on the way without a rule is an error naming it, and so is a rule that produces a NaN or an infinity.
pub fn backward(
    model: &Model,
    values: &dyn ForwardValues,
    seeds: Vec<(ValueId, ArrayD<f32>)>,
    wrt: &[ValueId],
    through: &mut dyn FnMut(ValueId, &mut ArrayD<f32>) -> Result<()>,
) -> Result<Gradients> {
    backward_over(model, None, values, seeds, wrt, through)
}

/// [`backward`] through the nodes `within` only (a segment of a model whose values are
/// recomputed piece by piece): the gradients of values those nodes read from outside are
/// returned when asked for in `wrt` (after `through`), and go no further.
pub fn backward_within(
    model: &Model,
    within: &HashSet<NodeId>,
    values: &dyn ForwardValues,
    seeds: Vec<(ValueId, ArrayD<f32>)>,
    wrt: &[ValueId],
    through: &mut dyn FnMut(ValueId, &mut ArrayD<f32>) -> Result<()>,
) -> Result<Gradients> {
    backward_over(model, Some(within), values, seeds, wrt, through)
}

fn backward_over(
    model: &Model,
    within: Option<&HashSet<NodeId>>,
    values: &dyn ForwardValues,
    seeds: Vec<(ValueId, ArrayD<f32>)>,
    wrt: &[ValueId],
    through: &mut dyn FnMut(ValueId, &mut ArrayD<f32>) -> Result<()>,
) -> Result<Gradients> {
    let g = &model.graph;
    let order = g.topological_order()?;
    // Which values depend on a `wrt` value: only their gradients are needed.
    let mut depends = vec![false; g.value_count()];
    for &v in wrt {
        depends[v.index()] = true;
    }
    for &n in &order {
        let node = g.node(n);
        if node.inputs().iter().flatten().chain(node.implicit_inputs()).any(|v| depends[v.index()]) {
            for v in node.outputs().iter().flatten() {
                depends[v.index()] = true;
            }
        }
    }
    let mut grads: Gradients = HashMap::new();
    for (v, grad) in seeds {
        if !depends[v.index()] {
            continue;
        }
        accumulate(&mut grads, v, grad, &g.value(v).name)?;
    }
    let wanted: HashSet<ValueId> = wrt.iter().copied().collect();
    let mut out = Gradients::new();
    for &n in order.iter().rev() {
        let node = g.node(n);
        let mut dys: Vec<Option<ArrayD<f32>>> = Vec::with_capacity(node.outputs().len());
        for v in node.outputs() {
            let grad = match v {
                Some(v) => match grads.remove(v) {
                    Some(mut grad) => {
                        through(*v, &mut grad)?;
                        if wanted.contains(v) {
                            out.insert(*v, grad.clone());
                        }
                        Some(grad)
                    }
                    None => None,
                },
                None => None,
            };
            dys.push(grad);
        }
        if dys.iter().all(Option::is_none) || within.is_some_and(|w| !w.contains(&n)) {
            continue;
        }
        let need: Vec<bool> = node.inputs().iter().map(|v| v.is_some_and(|v| depends[v.index()])).collect();
        if !need.iter().any(|&b| b) {
            continue;
        }
        let ctx = rules::NodeGrad::new(model, node, values, dys, need)?;
        let dxs = rules::vjp(&ctx)?;
        for (slot, dx) in dxs.into_iter().enumerate() {
            let (Some(dx), Some(v)) = (dx, node.input(slot)) else { continue };
            if depends[v.index()] {
                if dx.iter().any(|g| !g.is_finite()) {
                    return Err(GradError::NonFinite {
                        op: format!("{} ({})", node.name, node.op_type),
                        value: g.value(v).name.clone(),
                    });
                }
                accumulate(&mut grads, v, dx, &g.value(v).name)?;
            }
        }
    }
    // What is left are the gradients of graph inputs and initializers.
    for (v, mut grad) in grads {
        if wanted.contains(&v) {
            through(v, &mut grad)?;
            out.insert(v, grad);
        }
    }
    Ok(out)
}

fn accumulate(grads: &mut Gradients, v: ValueId, grad: ArrayD<f32>, name: &str) -> Result<()> {
    match grads.get_mut(&v) {
        Some(sum) => {
            if sum.shape() != grad.shape() {
                return Err(shape_error(
                    name,
                    format!("gradients of shapes {:?} and {:?} meet", sum.shape(), grad.shape()),
                ));
            }
            *sum += &grad;
        }
        None => {
            grads.insert(v, grad);
        }
    }
    Ok(())
}

/// The gradient `dx` by a value of `shape` whose broadcast to `dy`'s shape fed an op: `dy`
/// summed over the broadcast axes.
pub(crate) fn reduce_to(dy: ArrayD<f32>, shape: &[usize], op: &str) -> Result<ArrayD<f32>> {
    if dy.shape() == shape {
        return Ok(dy);
    }
    let extra = dy.ndim().checked_sub(shape.len()).ok_or_else(|| {
        shape_error(op, format!("gradient {:?} is of lower rank than its input {shape:?}", dy.shape()))
    })?;
    let mut r = dy;
    for _ in 0..extra {
        r = r.sum_axis(ndarray::Axis(0));
    }
    for (axis, &d) in shape.iter().enumerate() {
        if d == 1 && r.shape()[axis] != 1 {
            r = r.sum_axis(ndarray::Axis(axis)).insert_axis(ndarray::Axis(axis));
        } else if d != r.shape()[axis] {
            return Err(shape_error(
                op,
                format!("gradient {:?} does not broadcast from {shape:?}", r.shape()),
            ));
        }
    }
    Ok(r)
}

/// An unsupported-op error.
pub(crate) fn unsupported(op: &str, op_type: &str, detail: impl Into<String>) -> GradError {
    GradError::Unsupported { op: format!("{op} ({op_type})"), detail: detail.into() }
}
