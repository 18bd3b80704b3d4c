//! What quantization-aware training needs from a simulation: a forward run that keeps every
//! value as its readers read it and, for each fake-quantized activation, the value before
//! fake-quant (the straight-through estimator's input); updating a weight; and weight encodings
//! that follow the weights.

use std::collections::HashMap;

use qexec::{Hook, HookError, Keep, RunOptions, TensorEvent, ValueCache};
use qgraph::{Model, NodeId, Tensor, ValueId};

use super::{FakeQuantHook, QuantSim};
use crate::error::{CalibError, Result};
use crate::placement::{Quantizer, TensorRole};

/// One forward run of the simulation kept for a backward pass.
pub struct TrainingRun<'a> {
    /// The graph outputs.
    pub outputs: Vec<Tensor>,
    /// Every value fed or computed, as its readers read it (after fake-quant).
    pub values: ValueCache,
    /// Every fake-quantized activation as its producer computed it (before fake-quant).
    pub before_quantization: HashMap<ValueId, Tensor>,
    /// The model the run executed: weights fake-quantized, simulated converts inserted (value
    /// ids of the float model are kept).
    pub model: &'a Model,
    /// The enabled quantizers of activations (and of simulated converts), by value.
    pub quantizers: Vec<(ValueId, &'a Quantizer)>,
}

/// The fake-quant hook, keeping a copy of each value it quantizes.
struct KeepingHook<'a> {
    fake_quant: FakeQuantHook<'a>,
    before: HashMap<ValueId, Tensor>,
}

impl Hook for KeepingHook<'_> {
    fn observes(&self, value: ValueId) -> bool {
        self.fake_quant.observes(value)
    }

    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        self.before.insert(event.value, tensor.clone());
        self.fake_quant.on_tensor(event, tensor)
    }
}

impl QuantSim {
    /// Replaces the float data of initializer `v` (same dtype and shape). The simulation uses it
    /// after the next [`QuantSim::refresh`] or [`QuantSim::recompute_param_encodings`].
    pub fn set_param(&mut self, v: ValueId, data: Tensor) -> Result<()> {
        let value = self.model.graph.value(v);
        let fits =
            value.data.as_ref().is_some_and(|d| d.dtype() == data.dtype() && d.shape() == data.shape());
        if !fits {
            return Err(CalibError::Quantizer {
                tensor: value.name.clone(),
                detail: format!(
                    "not a static tensor of dtype {:?} and shape {:?}",
                    data.dtype(),
                    data.shape()
                ),
            });
        }
        self.model.graph.value_mut(v).data = Some(data);
        Ok(())
    }

    /// Recomputes the encodings of the (enabled, non-frozen) weight quantizers from the current
    /// weights, adjusts weight scales against overflow and rebuilds the session; activation
    /// encodings stay as they are.
    pub fn recompute_param_encodings(&mut self) -> Result<()> {
        self.gather_static_stats()?;
        self.compute_param_encodings()?;
        self.adjust_weight_scales()?;
        self.refresh()
    }

    /// Runs the simulation on `feeds` keeping what a backward pass reads (see [`TrainingRun`]).
    pub fn run_for_training(&self, feeds: &[(&str, Tensor)]) -> Result<TrainingRun<'_>> {
        let (session, fake_quant) = self.session_and_hook(false)?;
        let quantizers = self.training_quantizers();
        let mut hook = KeepingHook { fake_quant, before: HashMap::new() };
        let opts =
            RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() }.keep(Keep::All);
        let run = session.run_with(feeds, opts)?;
        Ok(TrainingRun {
            outputs: run.outputs,
            values: run.kept,
            before_quantization: hook.before,
            model: session.model(),
            quantizers,
        })
    }

    /// The model a training run executes (see [`TrainingRun::model`]).
    pub fn training_model(&self) -> Result<&Model> {
        Ok(self.session()?.model())
    }

    /// Runs the simulation on `feeds` keeping only the graph outputs and the values `keep` (as
    /// their readers read them): the first pass of a training step that recomputes its values
    /// segment by segment.
    pub fn run_keeping(
        &self,
        feeds: &[(&str, Tensor)],
        keep: &[ValueId],
    ) -> Result<(Vec<Tensor>, ValueCache)> {
        let (session, mut hook) = self.session_and_hook(false)?;
        let opts = RunOptions { hook: Some(&mut hook), hook_inputs: true, ..RunOptions::default() }
            .keep(Keep::Values(keep.to_vec()));
        let run = session.run_with(feeds, opts)?;
        Ok((run.outputs, run.kept))
    }

    /// Recomputes `nodes` of the training model from the values in `cache` (the graph inputs and
    /// every value they read that they do not compute), keeping what a backward pass through
    /// them reads; `outputs` of the result is empty.
    pub fn rerun_for_training(&self, cache: &ValueCache, nodes: &[NodeId]) -> Result<TrainingRun<'_>> {
        let (session, fake_quant) = self.session_and_hook(false)?;
        let quantizers = self.training_quantizers();
        let mut hook = KeepingHook { fake_quant, before: HashMap::new() };
        let opts =
            RunOptions { hook: Some(&mut hook), hook_inputs: false, ..RunOptions::default() }.keep(Keep::All);
        let run = session.run_nodes(cache, nodes, opts)?;
        Ok(TrainingRun {
            outputs: Vec::new(),
            values: run.kept,
            before_quantization: hook.before,
            model: session.model(),
            quantizers,
        })
    }

    /// The enabled activation quantizers (and those of simulated converts), by value.
    fn training_quantizers(&self) -> Vec<(ValueId, &Quantizer)> {
        let mut quantizers: Vec<(ValueId, &Quantizer)> = self
            .placement
            .tensors()
            .iter()
            .filter(|t| matches!(t.role, TensorRole::GraphInput | TensorRole::Output { .. }))
            .map(|t| (t.value, self.placement.quantizer(t.quantizer)))
            .filter(|(_, q)| q.enabled)
            .collect();
        quantizers.extend(self.convert_quantizers.iter().map(|(v, q)| (*v, q)));
        quantizers
    }
}
