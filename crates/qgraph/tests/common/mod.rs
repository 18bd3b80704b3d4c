//! Shared model builders for the qgraph integration tests: small graphs made with the public API,
//! and raw ONNX protos for constructs the API does not create (subgraphs, external data).

use onnx_protobuf::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor, ValueId};

/// A deterministic pseudo-random f32 tensor (values in [-1, 1)).
pub fn tensor(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(shape, data).unwrap()
}

/// A positive f32 tensor (for variances).
pub fn positive(shape: &[usize], seed: u32) -> Tensor {
    let t = tensor(shape, seed);
    let v: Vec<f32> = t.as_f32().unwrap().iter().map(|x| x.abs() + 0.5).collect();
    Tensor::from_vec(shape, v).unwrap()
}

pub fn node(
    g: &mut Graph,
    op: &str,
    name: &str,
    inputs: &[Option<ValueId>],
    outputs: &[&str],
    attrs: Vec<(&str, Attribute)>,
) -> Vec<ValueId> {
    let id = g.add_node(NodeSpec {
        name: name.into(),
        op_type: op.into(),
        domain: String::new(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        inputs: inputs.to_vec(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    });
    g.node(id).outputs().iter().flatten().copied().collect()
}

/// x[N,3,8,8] → Conv(3→4, 3×3, pad 1) → BN → Relu → GlobalAveragePool → Flatten → Gemm(4→10, transB).
pub fn conv_bn_classifier() -> Model {
    let mut g = Graph::new("classifier");
    let x = g.add_input(
        "x",
        DType::F32,
        Shape(vec![qgraph::Dim::Symbol("batch".into()), 3.into_dim(), 8.into_dim(), 8.into_dim()]),
    );
    let w = g.add_initializer("conv.weight", tensor(&[4, 3, 3, 3], 1));
    let b = g.add_initializer("conv.bias", tensor(&[4], 2));
    let y = node(
        &mut g,
        "Conv",
        "conv",
        &[Some(x), Some(w), Some(b)],
        &["conv_out"],
        vec![("pads", Attribute::Ints(vec![1, 1, 1, 1]))],
    );
    let gamma = g.add_initializer("bn.scale", tensor(&[4], 3));
    let beta = g.add_initializer("bn.bias", tensor(&[4], 4));
    let mean = g.add_initializer("bn.mean", tensor(&[4], 5));
    let var = g.add_initializer("bn.var", positive(&[4], 6));
    let y = node(
        &mut g,
        "BatchNormalization",
        "bn",
        &[Some(y[0]), Some(gamma), Some(beta), Some(mean), Some(var)],
        &["bn_out"],
        vec![("epsilon", Attribute::Float(1e-3))],
    );
    let y = node(&mut g, "Relu", "relu", &[Some(y[0])], &["relu_out"], vec![]);
    let y = node(&mut g, "GlobalAveragePool", "gap", &[Some(y[0])], &["gap_out"], vec![]);
    let y = node(&mut g, "Flatten", "flatten", &[Some(y[0])], &["flat"], vec![]);
    let fw = g.add_initializer("fc.weight", tensor(&[10, 4], 7));
    let fb = g.add_initializer("fc.bias", tensor(&[10], 8));
    let y = node(
        &mut g,
        "Gemm",
        "fc",
        &[Some(y[0]), Some(fw), Some(fb)],
        &["logits"],
        vec![("transB", Attribute::Int(1))],
    );
    g.add_output(y[0]);
    Model::new(g, 13)
}

pub trait IntoDim {
    fn into_dim(self) -> qgraph::Dim;
}

impl IntoDim for usize {
    fn into_dim(self) -> qgraph::Dim {
        qgraph::Dim::Known(self)
    }
}

/// Round trip through bytes.
pub fn reload(m: &Model) -> Model {
    qgraph::load_bytes(&qgraph::save_bytes(m).unwrap(), None).unwrap()
}

/// A raw ONNX node, for protos the public API does not build.
pub fn nproto(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

/// A raw ONNX model (IR 8, opset 13) around `g`.
pub fn model_proto(g: GraphProto) -> ModelProto {
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut op = OperatorSetIdProto::new();
    op.version = 13;
    m.opset_import.push(op);
    m.graph = Some(g).into();
    m
}
