//! Node attributes: a typed mirror of ONNX `AttributeProto`, with typed accessors on `Node` that
//! turn a missing or mistyped attribute into a `GraphError::Attribute` naming node and attribute.

use onnx_protobuf::{AttributeProto, GraphProto};

use crate::tensor::Tensor;

/// One attribute value. Subgraphs (`If`/`Loop`/`Scan` bodies) are kept as ONNX protos verbatim, so
/// they survive a load/save round trip even though the IR does not execute them.
#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    /// `FLOAT`.
    Float(f32),
    /// `INT`.
    Int(i64),
    /// `STRING` (bytes, usually UTF-8).
    String(Vec<u8>),
    /// `TENSOR`.
    Tensor(Tensor),
    /// `GRAPH`.
    Graph(Box<GraphProto>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `STRINGS`.
    Strings(Vec<Vec<u8>>),
    /// `TENSORS`.
    Tensors(Vec<Tensor>),
    /// `GRAPHS`.
    Graphs(Vec<GraphProto>),
    /// Sparse tensors, type protos and attribute references: kept verbatim.
    Verbatim(Box<AttributeProto>),
}

impl Attribute {
    /// The ONNX attribute type name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Attribute::Float(_) => "float",
            Attribute::Int(_) => "int",
            Attribute::String(_) => "string",
            Attribute::Tensor(_) => "tensor",
            Attribute::Graph(_) => "graph",
            Attribute::Floats(_) => "floats",
            Attribute::Ints(_) => "ints",
            Attribute::Strings(_) => "strings",
            Attribute::Tensors(_) => "tensors",
            Attribute::Graphs(_) => "graphs",
            Attribute::Verbatim(_) => "verbatim",
        }
    }
}
