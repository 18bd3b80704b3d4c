//! Parameter queries: which node inputs are weights/biases (static tensors reached directly or
//! through `Identity`/`Transpose`), their per-channel axis (spec §1.3) and per-node MAC counts.

use crate::error::Result;
use crate::graph::Graph;
use crate::ids::{NodeId, ValueId};
use crate::ops::{Fact, ParamRole, op_spec};
use crate::shape::{Dim, Shape};

/// A parameter input of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The consuming node.
    pub node: NodeId,
    /// Its input slot.
    pub slot: usize,
    /// The role (`weight`, `bias`, …).
    pub role: ParamRole,
    /// The value as the node reads it.
    pub value: ValueId,
    /// The static tensor it comes from (same as `value` unless reached through Identity/Transpose).
    pub root: ValueId,
    /// Whether a `Transpose` lies between `root` and the node.
    pub through_transpose: bool,
    /// Per-channel axis of `value`, if per-channel quantization is possible.
    pub channel_axis: Option<usize>,
}

impl Graph {
    /// The static tensor behind `v`: `v` itself if it holds data (initializer or `Constant`
    /// output), else followed up through `Identity` and `Transpose`. Returns the root and whether
    /// a `Transpose` was crossed.
    pub fn static_root(&self, v: ValueId) -> Option<(ValueId, bool)> {
        let mut cur = v;
        let mut transposed = false;
        loop {
            if self.is_static(cur) {
                return Some((cur, transposed));
            }
            let node = self.producer_node(cur)?;
            match node.op_type.as_str() {
                "Identity" => {}
                "Transpose" => transposed = !transposed,
                _ => return None,
            }
            cur = node.input(0)?;
        }
    }

    /// The parameter inputs of `node` (only static ones count, as in AIMET).
    pub fn node_params(&self, node: NodeId) -> Result<Vec<Param>> {
        let n = self.node(node);
        let Some(spec) = n.is_onnx_domain().then(|| op_spec(&n.op_type)).flatten() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for &(slot, role) in spec.param_slots(n) {
            let Some(value) = n.input(slot) else { continue };
            let Some((root, through_transpose)) = self.static_root(value) else { continue };
            let rank = self.value(value).shape.as_ref().map_or(0, |s| s.rank());
            let channel_axis = spec.channel_axis(n, slot, rank, through_transpose)?;
            out.push(Param { node, slot, role, value, root, through_transpose, channel_axis });
        }
        Ok(out)
    }

    /// Parameters of every node, in node order.
    pub fn params(&self) -> Result<Vec<Param>> {
        let mut out = Vec::new();
        for id in self.node_ids() {
            out.extend(self.node_params(id)?);
        }
        Ok(out)
    }

    /// Multiply-accumulates of one node per sample (batch excluded), for Conv, ConvTranspose, Gemm
    /// and MatMul, from the shapes on the graph (run `Model::infer_shapes` first). Symbolic dims
    /// count as 1 (bind them when inferring shapes for exact counts), as AIMET's dummy input does.
    pub fn node_macs(&self, node: NodeId) -> Option<u64> {
        let n = self.node(node);
        let spec = n.is_onnx_domain().then(|| op_spec(&n.op_type)).flatten()?;
        let ones = |s: &Shape| Shape(s.0.iter().map(|d| Dim::Known(d.known().unwrap_or(1))).collect());
        let fact = |v: ValueId| Fact::typed(self.value(v).dtype, self.value(v).shape.as_ref().map(ones));
        let inputs: Vec<Option<Fact>> = n.inputs().iter().map(|v| v.map(fact)).collect();
        let outputs: Vec<Fact> = n.outputs().iter().map(|v| v.map(fact).unwrap_or_default()).collect();
        spec.macs(n, &inputs, &outputs)
    }
}
