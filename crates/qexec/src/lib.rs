//! `qexec`: a native CPU interpreter for `qgraph` graphs, with a hook on every produced tensor
//! (quantize it, observe it) and resumption from cached intermediate tensors.
//!
//! A [`Session`] compiles a model once (every node gets its kernel; an unsupported op is an error
//! naming op, node and opset before anything runs), then runs it any number of times. Each run
//! frees intermediates after their last reader, reports its peak memory, and calls an optional
//! [`Hook`] on every tensor a node produces — the attachment point of quantization simulation and
//! calibration, which never rewrite the graph. [`Session::resume`] recomputes only the nodes
//! downstream of changed values, reading the rest from a [`ValueCache`].
//!
//! ```no_run
//! use qexec::{Session, SessionOptions};
//! use qgraph::Tensor;
//! let model = qgraph::load_path("model.onnx")?;
//! let session = Session::new(model, SessionOptions::threads(1))?;
//! let x = Tensor::from_vec(&[1, 3, 224, 224], vec![0.5f32; 3 * 224 * 224]).unwrap();
//! let outputs = session.run(&[("input", x)])?;
//! println!("{:?}", outputs[0].shape());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod buffers;
mod error;
mod hook;
mod ops;
mod session;

pub use error::{ExecError, Result};
pub use hook::{Epilogue, Hook, HookError, TensorEvent, TensorKind};
pub use session::{Keep, RunOptions, RunResult, RunStats, Session, SessionOptions, ValueCache};
