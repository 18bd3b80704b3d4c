//! `qgraph`: the graph IR every other crate of the toolkit builds on.
//!
//! A model is loaded from ONNX (`load_path`, `load_bytes`) into an arena of [`Node`]s and
//! [`Value`]s addressed by typed ids ([`NodeId`], [`ValueId`]); ONNX names are kept as labels,
//! weights are shared `ndarray` arrays ([`Tensor`]). On top of it: topological order and
//! producer/consumer queries, per-op metadata ([`ops::op_spec`]: weight inputs, per-channel axes,
//! MACs, shape inference), passes (batch-norm folding, Identity removal, constant folding of shape
//! sub-graphs, dead-node elimination) and saving back to ONNX. No numeric kernels live here.
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

mod attr;
mod batch;
mod dtype;
mod error;
mod graph;
mod ids;
mod infer;
mod lazy;
mod load;
pub mod ops;
mod params;
pub mod passes;
mod save;
mod shape;
mod summary;
mod tensor;

pub use attr::Attribute;
pub use batch::samples_independent;
pub use dtype::DType;
pub use error::{GraphError, Result};
pub use graph::{Graph, Model, Node, NodeSpec, Opset, Value, ValueSource};
pub use ids::{NodeId, Outlet, ValueId};
pub use infer::ShapeReport;
pub use lazy::LazyTensor;
pub use load::{
    LAZY_TENSOR_MIN_BYTES, LoadOptions, MAP_EXTERNAL_FROM, load_bytes, load_path, load_path_with,
    model_from_proto, subgraph_free_names, subgraph_model, subgraph_outer_names, tensor_from_bytes,
};
pub use params::Param;
pub use save::{
    OutputSet, inline_lazy, model_to_proto, process_tag, read_text_at_most, save_bytes, save_path,
    save_path_with_external_data, save_proto, tensor_to_proto, write_atomically,
};
pub use shape::{Dim, DimBindings, Shape, checked_numel};
pub use summary::{Port, Summary};
pub use tensor::{Element, Int4, Tensor, UInt4};
