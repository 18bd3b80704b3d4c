//! `qmix run --profile`: sums the step times of repeated runs per node and prints where the time
//! goes — the slowest steps with their output shapes, then the total per op type — so a user can
//! see which layers dominate a forward pass (and what fake-quant adds to each).

use std::collections::HashMap;
use std::time::Duration;

use qexec::StepTime;
use qgraph::{Graph, NodeId};

/// Step times summed over runs, per executed node.
#[derive(Default)]
pub struct Profile {
    runs: u32,
    /// (node, fused activation, output shape of the first run, total time), in execution order.
    steps: Vec<(NodeId, Option<NodeId>, Vec<usize>, Duration)>,
    index: HashMap<NodeId, usize>,
}

impl Profile {
    /// Adds one run's step times.
    pub fn add(&mut self, run: &[StepTime]) {
        self.runs += 1;
        for s in run {
            let at = *self.index.entry(s.node).or_insert_with(|| {
                self.steps.push((s.node, s.fused, s.output_shape.clone(), Duration::ZERO));
                self.steps.len() - 1
            });
            self.steps[at].3 += s.elapsed;
        }
    }

    /// The `top` slowest steps and the per-op-type totals, as lines of text (mean ms per run).
    pub fn report(&self, g: &Graph, top: usize) -> Vec<String> {
        let runs = f64::from(self.runs.max(1));
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / runs;
        let total: Duration = self.steps.iter().map(|s| s.3).sum();
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE);
        let op = |node: NodeId, fused: Option<NodeId>| match fused {
            Some(f) => format!("{}+{}", g.node(node).op_type, g.node(f).op_type),
            None => g.node(node).op_type.clone(),
        };
        let mut lines = vec![format!(
            "profile: {} steps, {:.2} ms per run (mean of {} runs); slowest steps:",
            self.steps.len(),
            ms(total),
            self.runs
        )];
        lines.push(format!("{:>9} {:>6}  {:<18} {:<22} node", "ms", "%", "op", "output shape"));
        let mut ranked: Vec<_> = self.steps.iter().collect();
        ranked.sort_by_key(|s| std::cmp::Reverse(s.3));
        for (node, fused, shape, d) in ranked.into_iter().take(top) {
            let shape = format!("{shape:?}");
            let name = short_name(&g.node(*node).name);
            lines.push(format!(
                "{:>9.3} {:>6.1}  {:<18} {shape:<22} {name}",
                ms(*d),
                pct(*d),
                op(*node, *fused)
            ));
        }
        let mut by_op: Vec<(String, usize, Duration)> = Vec::new();
        for &(node, fused, _, d) in &self.steps {
            let key = op(node, fused);
            match by_op.iter_mut().find(|e| e.0 == key) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += d;
                }
                None => by_op.push((key, 1, d)),
            }
        }
        by_op.sort_by_key(|e| std::cmp::Reverse(e.2));
        lines.push(format!("{:>9} {:>6}  {:<18} {:>5}", "ms", "%", "op type", "steps"));
        for (key, count, d) in by_op {
            lines.push(format!("{:>9.3} {:>6.1}  {key:<18} {count:>5}", ms(d), pct(d)));
        }
        lines
    }
}

/// A node name cut to its first 60 characters (exporters build names of whole op chains).
fn short_name(name: &str) -> String {
    match name.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.to_string(),
    }
}
