//! The tensor hook: how quantization simulation and calibration attach to a run without touching
//! the graph. The session calls it on every tensor a node produces (and, on request, on graph
//! inputs and weights); it may observe the tensor or rewrite it in place.

use qgraph::{NodeId, Tensor, ValueId};

/// What kind of tensor a hook call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// A fed graph input (only with `RunOptions::hook_inputs`).
    GraphInput,
    /// An initializer or constant read by a node (only with `RunOptions::hook_params`).
    Param,
    /// An output of the given node.
    NodeOutput(NodeId),
}

/// The identity of the tensor a hook is called on.
#[derive(Debug, Clone, Copy)]
pub struct TensorEvent<'a> {
    /// The value.
    pub value: ValueId,
    /// Its ONNX name.
    pub name: &'a str,
    /// Where it comes from.
    pub kind: TensorKind,
}

/// An elementwise, in-place transform of f32 elements (see [`Hook::epilogue`]).
pub type Epilogue<'a> = &'a (dyn Fn(&mut [f32]) + Sync);

/// The error type a hook returns.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Called on produced tensors. `observes` lets the session skip values the hook does not care
/// about (which keeps Conv+Relu fusion available where no quantizer sits between them).
pub trait Hook {
    /// Whether `on_tensor` wants to see `value`. Defaults to every value.
    fn observes(&self, value: ValueId) -> bool {
        let _ = value;
        true
    }

    /// Observes or rewrites `tensor` (a copy-on-write handle: mutating a shared buffer copies it).
    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError>;

    /// An elementwise, in-place transform of `value`'s f32 elements that kernels able to do so
    /// (Conv, Clip, unary activations) apply to each part of their output while it is still in
    /// cache — in any order and chunking, so it must treat every element on its own. When a
    /// kernel applied it to an f32 output, `on_tensor` is not called for that value. Defaults to
    /// none.
    fn epilogue(&self, value: ValueId) -> Option<Epilogue<'_>> {
        let _ = value;
        None
    }
}

impl<F> Hook for F
where
    F: FnMut(TensorEvent<'_>, &mut Tensor) -> Result<(), HookError>,
{
    fn on_tensor(&mut self, event: TensorEvent<'_>, tensor: &mut Tensor) -> Result<(), HookError> {
        self(event, tensor)
    }
}
