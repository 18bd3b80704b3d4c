//! `qexec`: a native CPU interpreter for `qgraph` graphs, with a hook on every produced tensor
//! (quantize it, observe it) and resumption from cached intermediate tensors.
//!
//! A [`Session`] compiles a model once (every node gets its kernel; an unsupported op is an error
//! naming op, node and opset before anything runs), then runs it any number of times. Each run
//! frees intermediates after their last reader, reports its peak memory, and calls an optional
//! [`Hook`] on every tensor a node produces — the attachment point of quantization simulation and
//! calibration, which never rewrite the graph. [`Session::resume`] recomputes only the nodes
//! downstream of changed values, reading the rest from a [`ValueCache`].
#![doc = include_str!("../README.md")]

mod buffers;
mod error;
mod hook;
pub mod image_codec;
mod memory;
mod ops;
mod session;

pub use error::{ExecError, Result};
pub use gemm::Parallelism;
pub use hook::{Epilogue, Hook, HookError, TensorEvent, TensorKind};
pub use memory::{default_max_tensor_bytes, set_default_max_tensor_bytes, tensor_bytes};
pub use ops::matmul::{MatRef, sgemm};
pub use session::{Keep, RunOptions, RunResult, RunStats, Session, SessionOptions, StepTime, ValueCache};
