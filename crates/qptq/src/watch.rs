//! A hook that hands the f32 values of a set of watched tensors to a closure, as a run produces
//! them: how bias correction and BN re-estimation gather their statistics.

use std::collections::HashSet;

use ndarray::ArrayViewD;
use qexec::{Hook, HookError, TensorEvent};
use qgraph::{Tensor, ValueId};

/// Calls `f(name, value, data)` on every watched f32 tensor.
pub(crate) struct Watch<'a, F> {
    watched: &'a HashSet<ValueId>,
    f: F,
}

impl<'a, F> Watch<'a, F>
where
    F: FnMut(&str, ValueId, ArrayViewD<'_, f32>) -> Result<(), String>,
{
    /// A hook calling `f` on the `watched` values.
    pub(crate) fn new(watched: &'a HashSet<ValueId>, f: F) -> Self {
        Watch { watched, f }
    }
}

impl<F> Hook for Watch<'_, F>
where
    F: FnMut(&str, ValueId, ArrayViewD<'_, f32>) -> Result<(), String>,
{
    fn observes(&self, value: ValueId) -> bool {
        self.watched.contains(&value)
    }

    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        match tensor.as_f32() {
            Some(a) => (self.f)(event.name, event.value, a.view()).map_err(HookError::from),
            None => Ok(()),
        }
    }
}
