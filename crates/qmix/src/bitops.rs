//! The bit-ops cost model (spec §7.4): `MAC × eff(activation bits) × eff(param bits)` summed over
//! the weighted ops, with float precisions counting `√1.5 ×` their bits. A weighted op takes the
//! candidate of the group holding its weight quantizer; its activation side changes only when that
//! group has activation quantizers (as in AIMET).
//!
//! MACs come from `qgraph`'s per-op metadata. [`MacOps::All`] counts Conv, ConvTranspose, Gemm and
//! MatMul with a weight; [`MacOps::AimetCompatible`] only Conv and Gemm, as AIMET does.
//!
//! A [`CostTable`] replaces the proxy with measured costs: per weighted op and precision pair, a
//! number in the table's unit (e.g. µs on the target). Every counted op must be priced at every
//! pair it can take; the phase-2 search, the budget search and phase 3 then trade accuracy
//! against that cost (their "bit-ops" figures are the table's unit).

use std::collections::HashMap;
use std::path::Path;

use qcalib::QuantSim;
use qgraph::NodeId;
use serde_json::Value;

use crate::AmpError;
use crate::candidate::{Candidate, effective_bits};
use crate::groups::QuantizerGroup;

/// Largest cost table read.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// Measured cost per op and precision pair.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CostTable {
    /// The unit of the numbers (e.g. `us`).
    pub unit: String,
    /// Op name → (pair → cost).
    pub ops: HashMap<String, HashMap<Candidate, f64>>,
}

fn table_error(origin: &str, detail: impl Into<String>) -> AmpError {
    AmpError::Settings(format!("cost table {origin}: {}", detail.into()))
}

impl CostTable {
    /// Reads `{"unit": "us", "ops": {"conv1": {"W8A8": 12.5, "W16A16": 30.0}, …}}` from `path`.
    pub fn load(path: &Path) -> Result<CostTable, AmpError> {
        let origin = path.display().to_string();
        let text = qgraph::read_text_at_most(path, MAX_TABLE_BYTES)
            .map_err(|e| table_error(&origin, e.to_string()))?;
        CostTable::parse(&text, &origin)
    }

    /// Parses a cost table (see [`CostTable::load`]); `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<CostTable, AmpError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| table_error(origin, format!("not JSON: {e}")))?;
        let unit = v.get("unit").and_then(Value::as_str).unwrap_or("").to_string();
        let ops = v
            .get("ops")
            .and_then(Value::as_object)
            .ok_or_else(|| table_error(origin, "expected an object \"ops\" of op name → {pair: cost}"))?;
        let mut table = CostTable { unit, ops: HashMap::with_capacity(ops.len()) };
        for (op, row) in ops {
            let row = row
                .as_object()
                .ok_or_else(|| table_error(origin, format!("ops.{op}: expected an object")))?;
            let mut costs = HashMap::with_capacity(row.len());
            for (pair, cost) in row {
                let c = Candidate::parse(pair).ok_or_else(|| {
                    table_error(origin, format!("ops.{op}: '{pair}' is not a pair like W8A16"))
                })?;
                let x = cost.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| {
                    table_error(origin, format!("ops.{op}.{pair}: {cost} is not a finite cost ≥ 0"))
                })?;
                costs.insert(c, x);
            }
            table.ops.insert(op.clone(), costs);
        }
        Ok(table)
    }

    /// A checksum of the contents (for the AMP cache's settings).
    pub fn checksum(&self) -> String {
        let mut rows: Vec<String> = self
            .ops
            .iter()
            .flat_map(|(op, row)| row.iter().map(move |(c, x)| format!("{op}\u{0}{c}\u{0}{x:e}")))
            .collect();
        rows.sort();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rows.join("\n").bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

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
    /// Measured cost per op (same order as `ops`) and pair, in place of `MAC × bits`.
    measured: Option<Vec<HashMap<Candidate, f64>>>,
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
        BitOps { ops, baseline, measured: None }
    }

    /// Prices every counted op from `table` instead of `MAC × bits`. Each must be listed, at the
    /// pair each of `candidates` gives it; the table may list no other op.
    pub fn with_table(
        mut self,
        sim: &QuantSim,
        table: &CostTable,
        candidates: &[Candidate],
    ) -> Result<BitOps, AmpError> {
        let g = &sim.model().graph;
        let mut rows = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            let name = &g.node(op.node).name;
            let row = table.ops.get(name).ok_or_else(|| {
                AmpError::Settings(format!(
                    "cost table: weighted op '{name}' is not priced (every counted op must be)"
                ))
            })?;
            for &c in candidates {
                let pair = self.effective(op, c);
                if !row.contains_key(&pair) {
                    return Err(AmpError::Settings(format!("cost table: op '{name}' has no cost at {pair}")));
                }
            }
            rows.push(row.clone());
        }
        if let Some(extra) = table.ops.keys().find(|k| !self.ops.iter().any(|op| &g.node(op.node).name == *k))
        {
            return Err(AmpError::Settings(format!(
                "cost table: '{extra}' is not a weighted op the cost model counts"
            )));
        }
        self.measured = Some(rows);
        Ok(self)
    }

    /// The distinct pairs counted op `i` runs at under `candidates` (what a cost table must price).
    pub fn pairs(&self, i: usize, candidates: &[Candidate]) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for &c in candidates {
            let pair = self.effective(&self.ops[i], c);
            if !out.contains(&pair) {
                out.push(pair);
            }
        }
        out
    }

    /// The pair `op` runs at when its group takes `c` (the activation side stays at the
    /// baseline's when the group has no activation quantizers).
    fn effective(&self, op: &CostedOp, c: Candidate) -> Candidate {
        let activation = if op.group_has_activations { c.activation } else { self.baseline.activation };
        Candidate { activation, ..c }
    }

    /// The cost of op `i` at pair `pair`.
    fn op_cost(&self, i: usize, pair: Candidate) -> f64 {
        match &self.measured {
            Some(rows) => rows[i].get(&pair).copied().unwrap_or(f64::NAN),
            None => self.ops[i].macs as f64 * effective_bits(pair.activation) * effective_bits(pair.param),
        }
    }

    /// The counted ops.
    pub fn ops(&self) -> &[CostedOp] {
        &self.ops
    }

    /// Total bit-ops with each group at `assignment[group]`.
    pub fn total(&self, assignment: &[Candidate]) -> f64 {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let c = op.group.and_then(|g| assignment.get(g)).copied().unwrap_or(self.baseline);
                self.op_cost(i, self.effective(op, c))
            })
            .sum()
    }

    /// Bit-ops of the ops whose weight quantizer is in `group`, at `candidate`.
    pub fn group_cost(&self, group: usize, candidate: Candidate) -> f64 {
        self.ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.group == Some(group))
            .map(|(i, op)| self.op_cost(i, self.effective(op, candidate)))
            .sum()
    }

    /// Bit-ops of the ops no group sets (they stay at the starting candidate).
    pub fn fixed_cost(&self) -> f64 {
        self.ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.group.is_none())
            .map(|(i, _)| self.op_cost(i, self.baseline))
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
            .enumerate()
            .filter(|(_, op)| op.group == Some(group))
            .map(|(i, op)| {
                if self.measured.is_some() {
                    return self.op_cost(i, self.effective(op, max))
                        - self.op_cost(i, self.effective(op, candidate));
                }
                // AIMET's formula: without activations in the group, the max's activation side.
                let m = op.macs as f64;
                let (a_max, p_max) = (effective_bits(max.activation), effective_bits(max.param));
                let (a, p) = (effective_bits(candidate.activation), effective_bits(candidate.param));
                if op.group_has_activations { m * (a_max * p_max - a * p) } else { m * a_max * (p_max - p) }
            })
            .sum()
    }
}
