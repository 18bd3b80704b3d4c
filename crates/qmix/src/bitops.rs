//! The bit-ops cost model (spec §7.4): `MAC × eff(activation bits) × eff(param bits)` summed over
//! the weighted ops, with float precisions counting `√1.5 ×` their bits. A weighted op takes the
//! candidate of the group holding its weight quantizer; its activation side changes only when that
//! group has activation quantizers (as in AIMET).
//!
//! MACs come from `qgraph`'s per-op metadata. [`MacOps::All`] counts Conv, ConvTranspose, Gemm and
//! MatMul with a weight; [`MacOps::AimetCompatible`] only Conv and Gemm, as AIMET does.

use qcalib::QuantSim;
use qgraph::NodeId;

use crate::candidate::{Candidate, effective_bits};
use crate::groups::QuantizerGroup;

/// Which ops count in the bit-ops model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MacOps {
    /// Conv, ConvTranspose, Gemm and MatMul.
    #[default]
    All,
    /// Conv and Gemm only (AIMET's model).
    AimetCompatible,
}

/// One weighted op of the cost model.
#[derive(Debug, Clone, PartialEq)]
pub struct CostedOp {
    /// The node.
    pub node: NodeId,
    /// Multiply-accumulates per sample.
    pub macs: u64,
    /// The group holding its weight quantizer, if any.
    pub group: Option<usize>,
    /// Whether that group has activation quantizers.
    pub group_has_activations: bool,
}

/// The weighted ops of a simulation and the groups that set their precision.
#[derive(Debug, Clone, PartialEq)]
pub struct BitOps {
    ops: Vec<CostedOp>,
    baseline: Candidate,
}

impl BitOps {
    /// The cost model of `sim` with `groups`, relative to all groups at `baseline`.
    pub fn new(sim: &QuantSim, groups: &[QuantizerGroup], baseline: Candidate, which: MacOps) -> BitOps {
        let g = &sim.model().graph;
        let p = sim.placement();
        let counted: &[&str] = match which {
            MacOps::All => &["Conv", "ConvTranspose", "Gemm", "MatMul"],
            MacOps::AimetCompatible => &["Conv", "Gemm"],
        };
        let mut ops = Vec::new();
        for (id, n) in g.nodes() {
            if !counted.contains(&n.op_type.as_str()) {
                continue;
            }
            let weight = p
                .param_quantizers(g, id)
                .into_iter()
                .find(|(role, _)| *role == qgraph::ops::ParamRole::Weight);
            let Some((_, wq)) = weight else { continue };
            let Some(macs) = g.node_macs(id).filter(|&m| m > 0) else { continue };
            let group = groups.iter().position(|gr| gr.params.contains(&wq));
            let group_has_activations = group.is_some_and(|i| !groups[i].activations.is_empty());
            ops.push(CostedOp { node: id, macs, group, group_has_activations });
        }
        BitOps { ops, baseline }
    }

    /// The counted ops.
    pub fn ops(&self) -> &[CostedOp] {
        &self.ops
    }

    /// Total bit-ops with each group at `assignment[group]`.
    pub fn total(&self, assignment: &[Candidate]) -> f64 {
        self.ops
            .iter()
            .map(|op| {
                let c = op.group.and_then(|g| assignment.get(g)).copied().unwrap_or(self.baseline);
                let a = if op.group_has_activations { c.activation } else { self.baseline.activation };
                op.macs as f64 * effective_bits(a) * effective_bits(c.param)
            })
            .sum()
    }

    /// Bit-ops of the ops whose weight quantizer is in `group`, at `candidate`.
    pub fn group_cost(&self, group: usize, candidate: Candidate) -> f64 {
        self.ops
            .iter()
            .filter(|op| op.group == Some(group))
            .map(|op| {
                let a =
                    if op.group_has_activations { candidate.activation } else { self.baseline.activation };
                op.macs as f64 * effective_bits(a) * effective_bits(candidate.param)
            })
            .sum()
    }

    /// Bit-ops of the ops no group sets (they stay at the starting candidate).
    pub fn fixed_cost(&self) -> f64 {
        self.ops
            .iter()
            .filter(|op| op.group.is_none())
            .map(|op| {
                op.macs as f64
                    * effective_bits(self.baseline.activation)
                    * effective_bits(self.baseline.param)
            })
            .sum()
    }

    /// Bit-ops with every group at `candidate`.
    pub fn uniform(&self, groups: usize, candidate: Candidate) -> f64 {
        self.total(&vec![candidate; groups])
    }

    /// AIMET's phase-1 tie-break (`find_bit_ops_reduction`): what moving `group` alone from the
    /// `max` candidate to `candidate` saves.
    pub fn reduction(&self, group: usize, candidate: Candidate, max: Candidate) -> f64 {
        self.ops
            .iter()
            .filter(|op| op.group == Some(group))
            .map(|op| {
                let m = op.macs as f64;
                let (a_max, p_max) = (effective_bits(max.activation), effective_bits(max.param));
                let (a, p) = (effective_bits(candidate.activation), effective_bits(candidate.param));
                if op.group_has_activations { m * (a_max * p_max - a * p) } else { m * a_max * (p_max - p) }
            })
            .sum()
    }
}
