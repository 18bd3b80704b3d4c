//! Enable-one without the whole FP32 run in memory: each piece's FP32 forward pass is walked node
//! by node alongside the layers, keeping only the values still ahead of it — those a node not yet
//! run reads, and those a layer not yet scored resumes from. The layers are scored in the order in
//! which the walk reaches everything their resumed runs read, so each piece's FP32 pass runs once
//! and its memory is the pass's working set, not every value it ever made.

use std::collections::HashMap;

use qcalib::QuantSim;
use qgraph::{NodeId, ValueId, ValueSource};

use crate::sensitivity::AnalyzeError;

/// One scored layer of a [`Walk`].
struct Step {
    /// Its index among the layers planned for.
    layer: usize,
    /// The nodes the FP32 pass runs before it (a range of the walk's order, maybe empty).
    advance: std::ops::Range<usize>,
    /// Of the values those nodes make, the ones kept: wanted by a later node or step.
    keep: Vec<ValueId>,
    /// The values no longer wanted once this layer is scored.
    drop: Vec<ValueId>,
}

/// The plan of a walk: the nodes in run order and the layers in scoring order.
pub(crate) struct Walk {
    order: Vec<NodeId>,
    steps: Vec<Step>,
}

impl Walk {
    /// Plans the walk for layers whose resumed runs start from `changed[j]` (the values layer `j`
    /// changes; its run recomputes everything downstream of them).
    pub(crate) fn plan(sim: &QuantSim, changed: &[Vec<ValueId>]) -> Result<Walk, AnalyzeError> {
        let g = &sim.model().graph;
        let order = g.topological_order().map_err(qcalib::CalibError::from)?;
        let mut position = vec![usize::MAX; g.node_count()];
        for (i, n) in order.iter().enumerate() {
            position[n.index()] = i;
        }
        let made_at = |v: ValueId| match g.value(v).source() {
            ValueSource::Node(o) => Some(position[o.node.index()]),
            _ => None,
        };
        let computed: Vec<(ValueId, usize)> = g.value_ids().filter_map(|v| Some((v, made_at(v)?))).collect();
        // Per value, the position of the last node reading it.
        let last_node: HashMap<ValueId, usize> = computed
            .iter()
            .filter_map(|&(v, _)| Some((v, g.consumer_nodes(v).iter().map(|n| position[n.index()]).max()?)))
            .collect();
        // What each layer's resumed run reads from the FP32 values: what its dirty nodes read and
        // clean nodes made, and the graph outputs no dirty node makes.
        let mut planned: Vec<(usize, usize, Vec<ValueId>)> = Vec::with_capacity(changed.len());
        for (j, ch) in changed.iter().enumerate() {
            let mut dirty = vec![false; g.node_count()];
            for n in g.downstream_nodes(ch) {
                dirty[n.index()] = true;
            }
            let read: Vec<ValueId> = computed
                .iter()
                .filter(|&&(v, at)| {
                    !dirty[order[at].index()]
                        && (g.is_output(v) || g.consumer_nodes(v).iter().any(|n| dirty[n.index()]))
                })
                .map(|&(v, _)| v)
                .collect();
            let reach = read.iter().filter_map(|&v| made_at(v)).map(|p| p + 1).max().unwrap_or(0);
            planned.push((reach, j, read));
        }
        planned.sort_by_key(|&(reach, j, _)| (reach, j));
        let mut last_step: HashMap<ValueId, usize> = HashMap::new();
        for (s, (_, _, read)) in planned.iter().enumerate() {
            for &v in read {
                last_step.insert(v, s);
            }
        }
        // Whether `v` is wanted from step `s` on, once the pass has run `reach` nodes.
        let wanted_from = |v: ValueId, s: usize, reach: usize| {
            last_node.get(&v).is_some_and(|&p| p >= reach) || last_step.get(&v).is_some_and(|&l| l >= s)
        };
        let mut steps = Vec::with_capacity(planned.len());
        let mut done = 0usize;
        let mut live: Vec<ValueId> = Vec::new();
        for (s, &(reach, layer, _)) in planned.iter().enumerate() {
            let reach = reach.max(done);
            let advance = done..reach;
            let keep: Vec<ValueId> = computed
                .iter()
                .filter(|&&(v, at)| advance.contains(&at) && wanted_from(v, s, reach))
                .map(|&(v, _)| v)
                .collect();
            live.extend(&keep);
            let (kept, drop): (Vec<ValueId>, Vec<ValueId>) =
                live.iter().partition(|&&v| wanted_from(v, s + 1, reach));
            live = kept;
            steps.push(Step { layer, advance, keep, drop });
            done = reach;
        }
        Ok(Walk { order, steps })
    }

    /// The most bytes of FP32 values one sample keeps at once, given each value's bytes per
    /// sample (values missing from `bytes` count 0): the measure of a window.
    pub(crate) fn peak_bytes(&self, bytes: &HashMap<ValueId, usize>) -> usize {
        let size = |v: &ValueId| bytes.get(v).copied().unwrap_or(0);
        let (mut live, mut peak) = (0usize, 0usize);
        for step in &self.steps {
            live += step.keep.iter().map(size).sum::<usize>();
            peak = peak.max(live);
            live = live.saturating_sub(step.drop.iter().map(size).sum());
        }
        peak
    }

    /// The steps in scoring order: (layer index, nodes to run first, values to keep of them,
    /// values to drop after scoring).
    pub(crate) fn steps(&self) -> impl Iterator<Item = (usize, &[NodeId], &[ValueId], &[ValueId])> {
        self.steps
            .iter()
            .map(|s| (s.layer, &self.order[s.advance.clone()], s.keep.as_slice(), s.drop.as_slice()))
    }
}
