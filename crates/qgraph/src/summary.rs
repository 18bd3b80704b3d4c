//! `Summary`: what `inspect` prints about a model — inputs/outputs with shapes, op histogram,
//! parameter count and MACs per op type.

use std::collections::BTreeMap;
use std::fmt;

use crate::dtype::DType;
use crate::graph::Model;
use crate::shape::Shape;

/// One graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Option<DType>,
    /// Shape.
    pub shape: Option<Shape>,
}

/// A model at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Graph name.
    pub name: String,
    /// Default-domain opset.
    pub opset: i64,
    /// Graph inputs.
    pub inputs: Vec<Port>,
    /// Graph outputs.
    pub outputs: Vec<Port>,
    /// Number of nodes.
    pub nodes: usize,
    /// (op type, count), most frequent first, ties by name.
    pub op_histogram: Vec<(String, usize)>,
    /// Elements of float initializers and float `Constant` outputs.
    pub float_params: u64,
    /// Elements of all static tensors.
    pub total_params: u64,
    /// (op type, MACs per sample), for op types with MACs.
    pub macs_by_op: Vec<(String, u64)>,
    /// Sum of `macs_by_op`.
    pub total_macs: u64,
    /// Whether an input has a symbolic dim besides the batch dim (MACs then count it as 1).
    pub symbolic_inputs: bool,
}

impl Model {
    /// Summarises the model. MACs need shapes: run `infer_shapes` first.
    pub fn summary(&self) -> Summary {
        let g = &self.graph;
        let port = |v| {
            let val = g.value(v);
            Port { name: val.name.clone(), dtype: val.dtype, shape: val.shape.clone() }
        };
        let mut hist: BTreeMap<String, usize> = BTreeMap::new();
        let mut macs: BTreeMap<String, u64> = BTreeMap::new();
        for (id, n) in g.nodes() {
            *hist.entry(n.op_type.clone()).or_default() += 1;
            if let Some(m) = g.node_macs(id) {
                let total = macs.entry(n.op_type.clone()).or_default();
                *total = total.saturating_add(m);
            }
        }
        let mut op_histogram: Vec<(String, usize)> = hist.into_iter().collect();
        op_histogram.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let (mut float_params, mut total_params) = (0u64, 0u64);
        for v in g.value_ids() {
            let val = g.value(v);
            let (dtype, len) = match (&val.data, &val.lazy) {
                (Some(t), _) => (t.dtype(), t.len()),
                (None, Some(l)) => (l.dtype(), l.shape().iter().product()),
                (None, None) => continue,
            };
            total_params += len as u64;
            if dtype.is_float() {
                float_params += len as u64;
            }
        }
        let macs_by_op: Vec<(String, u64)> = macs.into_iter().collect();
        Summary {
            name: g.name.clone(),
            opset: self.default_opset(),
            inputs: g.inputs().iter().map(|&v| port(v)).collect(),
            outputs: g.outputs().iter().map(|&v| port(v)).collect(),
            nodes: g.node_count(),
            op_histogram,
            float_params,
            total_params,
            total_macs: macs_by_op.iter().fold(0u64, |a, (_, m)| a.saturating_add(*m)),
            macs_by_op,
            symbolic_inputs: g.inputs().iter().any(|&v| {
                g.value(v).shape.as_ref().is_some_and(|s| s.0.iter().skip(1).any(|d| d.known().is_none()))
            }),
        }
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = |p: &Port| {
            let dtype = p.dtype.map_or("?".to_string(), |d| d.to_string());
            let shape = p.shape.as_ref().map_or("?".to_string(), ToString::to_string);
            format!("  {} : {dtype} {shape}", p.name)
        };
        writeln!(f, "graph '{}' (opset {})", self.name, self.opset)?;
        writeln!(f, "inputs:")?;
        for p in &self.inputs {
            writeln!(f, "{}", port(p))?;
        }
        writeln!(f, "outputs:")?;
        for p in &self.outputs {
            writeln!(f, "{}", port(p))?;
        }
        writeln!(f, "nodes: {}", self.nodes)?;
        let ops: Vec<String> = self.op_histogram.iter().map(|(op, n)| format!("{op} {n}")).collect();
        writeln!(f, "ops: {}", ops.join(", "))?;
        writeln!(f, "float parameters: {}", group_digits(self.float_params))?;
        if self.total_params != self.float_params {
            writeln!(f, "all static elements: {}", group_digits(self.total_params))?;
        }
        let by_op: Vec<String> =
            self.macs_by_op.iter().map(|(op, m)| format!("{op} {:.1} M", *m as f64 / 1e6)).collect();
        writeln!(
            f,
            "MACs per sample: {} ({:.1} M; {}){}",
            group_digits(self.total_macs),
            self.total_macs as f64 / 1e6,
            if by_op.is_empty() { "none".to_string() } else { by_op.join(", ") },
            if self.symbolic_inputs {
                " — symbolic dims count as 1: bind them with --shape or --dim"
            } else {
                ""
            }
        )
    }
}
