//! `qgrad`: reverse-mode gradients for quantization techniques — the vector-Jacobian rules of the
//! weighted layers (Conv incl. grouped and depthwise, Gemm, MatMul) and the activations that
//! follow them, whole-graph backward passes over a `qexec` run, the straight-through estimator of fake-quant with the scale and offset gradients
//! range learning needs, reconstruction losses, Adam and SGD with momentum, and finite-difference
//! checks that every rule passes. Products go through `qexec`'s one `sgemm`.
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

mod activation;
pub mod check;
mod error;
mod fake_quant;
mod graph;
mod linear;
mod loss;
mod optim;

pub use activation::Activation;
pub use error::{GradError, Result};
pub use fake_quant::{EncodingGrad, fake_quant_backward, fake_quant_backward_indexed};
pub use graph::{ForwardValues, Gradients, backward, backward_within};
pub use linear::{Columns, ConvGeometry, Gram, Linear, LinearKind};
pub use loss::{channel_mse, channel_mse_after};
pub use optim::{Adam, Sgd};
