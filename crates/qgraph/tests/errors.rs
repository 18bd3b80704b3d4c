//! Bad input gets a distinct, named error and never a panic: truncated and non-ONNX bytes,
//! dangling names, cycles, unknown dtypes, duplicate definitions, bad attributes, plus a proptest
//! that feeds mutated and truncated bytes of a real-shaped model to the loader.

#![allow(dead_code)]
mod common;

use common::*;
use onnx_protobuf::{GraphProto, Message, ModelProto, TensorProto, ValueInfoProto};
use proptest::prelude::*;
use qgraph::{DimBindings, GraphError, load_bytes};

fn vi(name: &str) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v
}

fn model_bytes() -> Vec<u8> {
    qgraph::save_bytes(&conv_bn_classifier()).unwrap()
}

#[test]
fn truncated_file_is_named_truncated() {
    let bytes = model_bytes();
    let err = load_bytes(&bytes[..bytes.len() / 2], None).unwrap_err();
    assert!(matches!(err, GraphError::Truncated { .. }), "{err}");
}

#[test]
fn non_onnx_files_are_rejected() {
    for bytes in [&b""[..], b"this is a text file, not a model\n", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"] {
        let err = load_bytes(bytes, None).unwrap_err();
        assert!(matches!(err, GraphError::NotOnnx { .. } | GraphError::Truncated { .. }), "{err}");
    }
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let err = load_bytes(&m.write_to_bytes().unwrap(), None).unwrap_err();
    assert!(err.to_string().contains("no graph"), "{err}");
}

#[test]
fn dangling_input_names_node_and_tensor() {
    let mut g = GraphProto::new();
    g.input.push(vi("x"));
    g.node.push(nproto("Add", "adder", &["x", "ghost"], &["y"]));
    g.output.push(vi("y"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(
        matches!(&err, GraphError::DanglingInput { node, input, .. } if node == "adder" && input == "ghost"),
        "{err}"
    );
}

#[test]
fn dangling_output_is_named() {
    let mut g = GraphProto::new();
    g.input.push(vi("x"));
    g.output.push(vi("nowhere"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(matches!(&err, GraphError::DanglingOutput { output } if output == "nowhere"), "{err}");
}

#[test]
fn cycles_are_detected() {
    let mut g = GraphProto::new();
    g.input.push(vi("x"));
    g.node.push(nproto("Add", "a", &["x", "c"], &["b"]));
    g.node.push(nproto("Relu", "r", &["b"], &["c"]));
    g.output.push(vi("c"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(matches!(err, GraphError::Cycle { .. }), "{err}");
}

#[test]
fn unknown_dtype_names_the_tensor() {
    let mut g = GraphProto::new();
    let mut t = TensorProto::new();
    t.name = "words".into();
    t.data_type = 8;
    t.dims = vec![1];
    t.string_data = vec![b"hi".to_vec()];
    g.initializer.push(t);
    g.output.push(vi("words"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(
        matches!(&err, GraphError::UnsupportedDtype { tensor, dtype } if tensor == "words" && dtype == "STRING"),
        "{err}"
    );
}

#[test]
fn data_of_the_wrong_size_is_rejected() {
    let mut g = GraphProto::new();
    let mut t = TensorProto::new();
    t.name = "w".into();
    t.data_type = 1;
    t.dims = vec![2, 3];
    t.raw_data = vec![0; 20];
    g.initializer.push(t);
    g.output.push(vi("w"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(matches!(&err, GraphError::TensorData { tensor, .. } if tensor == "w"), "{err}");
}

#[test]
fn duplicate_definitions_are_rejected() {
    let mut g = GraphProto::new();
    g.input.push(vi("x"));
    g.node.push(nproto("Relu", "r1", &["x"], &["y"]));
    g.node.push(nproto("Relu", "r2", &["x"], &["y"]));
    g.output.push(vi("y"));
    let err = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap_err();
    assert!(matches!(&err, GraphError::DuplicateValue { name, .. } if name == "y"), "{err}");
}

#[test]
fn shape_errors_name_the_node() {
    let mut m = conv_bn_classifier();
    let conv = m.graph.node_id("conv").unwrap();
    m.graph.node_mut(conv).attrs = vec![("pads".into(), qgraph::Attribute::Ints(vec![1, 1]))];
    let err = m.infer_shapes(&DimBindings::all(1)).unwrap_err();
    assert!(matches!(&err, GraphError::Shape { node, .. } if node == "conv"), "{err}");
    m.graph.node_mut(conv).attrs = vec![("pads".into(), qgraph::Attribute::Float(1.0))];
    let err = m.infer_shapes(&DimBindings::all(1)).unwrap_err();
    assert!(
        matches!(&err, GraphError::Attribute { node, attr, .. } if node == "conv" && attr == "pads"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Mutated bytes either load (and then infer and save without panicking) or give an error.
    #[test]
    fn mutated_bytes_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let mut bytes = model_bytes();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(mut m) = load_bytes(&bytes, None) {
            let _ = m.infer_shapes(&DimBindings::all(1));
            let _ = m.graph.params();
            let _ = qgraph::save_bytes(&m);
        }
    }
}
