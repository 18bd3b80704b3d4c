//! Shape inference: walks the nodes in order, feeds each op's `OpSpec::infer` with the facts of its
//! inputs (graph inputs with symbolic dims bound by `DimBindings`, static tensors with their data),
//! and stores the resulting dtypes and shapes on the values. Small integer values computed on the
//! way (shape arithmetic) are returned for constant folding.

use crate::error::{GraphError, Result};
use crate::graph::{Model, ValueSource};
use crate::ids::NodeId;
use crate::ops::{Fact, MAX_FOLDED_ELEMENTS, op_spec};
use crate::shape::{DimBindings, Shape};
use crate::tensor::Tensor;

/// What shape inference learned beyond the types and shapes it stored on the graph.
#[derive(Debug, Clone, Default)]
pub struct ShapeReport {
    /// Nodes whose op type has no `OpSpec` (outputs keep the file's declared types, if any).
    pub unknown_ops: Vec<NodeId>,
    /// Per value (indexed by `ValueId::index`): the value computed at load time, if any.
    pub values: Vec<Option<Tensor>>,
}

/// The fact a static tensor contributes: type, shape, and the data if small enough to compute on.
fn static_fact(t: &Tensor) -> Fact {
    let mut f = Fact::typed(Some(t.dtype()), Some(Shape::known(t.shape())));
    if t.len() <= MAX_FOLDED_ELEMENTS {
        f.value = Some(t.clone());
    }
    f
}

/// Keeps the more informative of an inferred and a declared shape: inferred known dims win,
/// declared dims fill what inference could not resolve. Known dims that disagree are an error.
fn merge_shape(
    inferred: Option<Shape>,
    declared: Option<Shape>,
) -> std::result::Result<Option<Shape>, String> {
    match (inferred, declared) {
        (Some(i), Some(d)) if i.rank() == d.rank() => {
            let mut out = i.clone();
            for (k, (a, b)) in i.0.iter().zip(&d.0).enumerate() {
                match (a.known(), b.known()) {
                    (Some(x), Some(y)) if x != y => {
                        return Err(format!("inferred shape {i} but the model declares {d}"));
                    }
                    (None, _) => out.0[k] = b.clone(),
                    _ => {}
                }
            }
            Ok(Some(out))
        }
        (Some(i), _) => Ok(Some(i)),
        (None, d) => Ok(d),
    }
}

impl Model {
    /// Infers dtypes and shapes of every value, binding symbolic input dims with `bindings`
    /// (unbound symbols stay symbolic). Ops without an `OpSpec` are listed, not rejected.
    pub fn infer_shapes(&mut self, bindings: &DimBindings) -> Result<ShapeReport> {
        let opset = self.default_opset();
        let g = &mut self.graph;
        let mut facts: Vec<Fact> = g
            .values
            .iter()
            .map(|v| match (&v.data, v.source) {
                (Some(t), _) => static_fact(t),
                (None, _) if v.lazy.is_some() => Fact::typed(v.dtype, v.shape.clone()),
                (None, ValueSource::Input) => {
                    Fact::typed(v.dtype, v.shape.as_ref().map(|s| bindings.apply(s)))
                }
                (None, _) => Fact::default(),
            })
            .collect();
        let mut report = ShapeReport::default();
        for i in 0..g.nodes.len() {
            let node = &g.nodes[i];
            if node.op_type == "Constant"
                && node.output(0).is_some_and(|v| g.values[v.index()].data.is_some())
            {
                continue;
            }
            let spec = if node.is_onnx_domain() { op_spec(&node.op_type) } else { None };
            let Some(spec) = spec else {
                report.unknown_ops.push(NodeId(i as u32));
                for v in node.outputs.iter().flatten() {
                    let val = &g.values[v.index()];
                    facts[v.index()] = Fact::typed(val.dtype, val.shape.clone());
                }
                continue;
            };
            let inputs: Vec<Option<Fact>> =
                node.inputs.iter().map(|v| v.map(|v| facts[v.index()].clone())).collect();
            let outputs = spec.infer(node, &inputs, opset)?;
            for (slot, v) in node.outputs.iter().enumerate() {
                let (Some(v), Some(mut f)) = (v, outputs.get(slot).cloned()) else { continue };
                // Declared symbols are the exporter's names, not the user's: only inputs are bound.
                let declared = g.values[v.index()].shape.clone();
                f.shape = merge_shape(f.shape, declared).map_err(|detail| GraphError::Shape {
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    detail: format!("output '{}': {detail}", g.values[v.index()].name),
                })?;
                f.dtype = f.dtype.or(g.values[v.index()].dtype);
                facts[v.index()] = f;
            }
        }
        for (val, f) in g.values.iter_mut().zip(&facts) {
            if val.data.is_none() && val.lazy.is_none() {
                val.dtype = f.dtype.or(val.dtype);
                val.shape = f.shape.clone().or(val.shape.take());
            }
        }
        report.values = facts.into_iter().map(|f| f.value).collect();
        Ok(report)
    }
}
