//! Graph queries: producers/consumers, parameter detection and per-channel axes for every op
//! variant of spec §1.3, MAC counts, shape inference across op families, and which graphs keep
//! the samples of a batch apart.

#![allow(dead_code)]
mod common;

use common::*;
use qgraph::ops::ParamRole;
use qgraph::{Attribute, DType, Dim, DimBindings, Graph, Model, Shape, Tensor};

fn known(d: &[usize]) -> Shape {
    Shape::known(d)
}

/// One node `op(x, weight[, bias])` with the given attributes; returns the model and node name.
fn single(op: &str, x: &[usize], w: &[usize], bias: Option<usize>, attrs: Vec<(&str, Attribute)>) -> Model {
    let mut g = Graph::new("single");
    let xi = g.add_input("x", DType::F32, known(x));
    let wi = g.add_initializer("w", tensor(w, 1));
    let mut inputs = vec![Some(xi), Some(wi)];
    if let Some(c) = bias {
        inputs.push(Some(g.add_initializer("b", tensor(&[c], 2))));
    }
    let y = node(&mut g, op, "layer", &inputs, &["y"], attrs);
    g.add_output(y[0]);
    let mut m = Model::new(g, 13);
    m.infer_shapes(&DimBindings::all(1)).unwrap();
    m
}

fn axes(m: &Model) -> Vec<(ParamRole, Option<usize>)> {
    let id = m.graph.node_id("layer").unwrap();
    m.graph.node_params(id).unwrap().iter().map(|p| (p.role, p.channel_axis)).collect()
}

fn out_shape(m: &Model, name: &str) -> String {
    m.graph.value(m.graph.value_id(name).unwrap()).shape.as_ref().unwrap().to_string()
}

fn macs(m: &Model) -> u64 {
    m.graph.node_macs(m.graph.node_id("layer").unwrap()).unwrap()
}

#[test]
fn conv_weight_axis_0_and_macs() {
    let m = single(
        "Conv",
        &[1, 8, 10, 10],
        &[16, 8, 3, 3],
        Some(16),
        vec![("pads", Attribute::Ints(vec![1; 4]))],
    );
    assert_eq!(axes(&m), [(ParamRole::Weight, Some(0)), (ParamRole::Bias, Some(0))]);
    assert_eq!(out_shape(&m, "y"), "[1, 16, 10, 10]");
    assert_eq!(macs(&m), 16 * 10 * 10 * 8 * 9);
}

#[test]
fn depthwise_strided_conv_macs() {
    let attrs = vec![
        ("group", Attribute::Int(8)),
        ("strides", Attribute::Ints(vec![2, 2])),
        ("auto_pad", Attribute::String(b"SAME_UPPER".to_vec())),
    ];
    let m = single("Conv", &[1, 8, 11, 11], &[8, 1, 3, 3], None, attrs);
    assert_eq!(out_shape(&m, "y"), "[1, 8, 6, 6]");
    assert_eq!(macs(&m), 8 * 6 * 6 * 9);
}

#[test]
fn conv_transpose_weight_axis_1_and_macs() {
    let m = single(
        "ConvTranspose",
        &[1, 4, 5, 5],
        &[4, 6, 2, 2],
        Some(6),
        vec![("strides", Attribute::Ints(vec![2, 2]))],
    );
    assert_eq!(axes(&m), [(ParamRole::Weight, Some(1)), (ParamRole::Bias, Some(0))]);
    assert_eq!(out_shape(&m, "y"), "[1, 6, 10, 10]");
    assert_eq!(macs(&m), 4 * 5 * 5 * 6 * 4);
}

#[test]
fn gemm_axis_follows_trans_b() {
    let m = single("Gemm", &[1, 20], &[20, 7], Some(7), vec![]);
    assert_eq!(axes(&m), [(ParamRole::Weight, Some(1)), (ParamRole::Bias, Some(0))]);
    assert_eq!(out_shape(&m, "y"), "[1, 7]");
    assert_eq!(macs(&m), 140);
    let m = single("Gemm", &[1, 20], &[7, 20], None, vec![("transB", Attribute::Int(1))]);
    assert_eq!(axes(&m), [(ParamRole::Weight, Some(0))]);
    assert_eq!(macs(&m), 140);
}

#[test]
fn matmul_axis_is_last_or_second_last_through_transpose() {
    let m = single("MatMul", &[2, 5, 12], &[12, 3], None, vec![]);
    assert_eq!(axes(&m), [(ParamRole::Weight, Some(1))]);
    assert_eq!(out_shape(&m, "y"), "[2, 5, 3]");
    assert_eq!(macs(&m), 5 * 3 * 12);

    let mut g = Graph::new("t");
    let x = g.add_input("x", DType::F32, known(&[1, 12]));
    let w = g.add_initializer("w", tensor(&[3, 12], 1));
    let id = node(&mut g, "Identity", "id", &[Some(w)], &["w_id"], vec![]);
    let t = node(
        &mut g,
        "Transpose",
        "tr",
        &[Some(id[0])],
        &["w_t"],
        vec![("perm", Attribute::Ints(vec![1, 0]))],
    );
    let y = node(&mut g, "MatMul", "layer", &[Some(x), Some(t[0])], &["y"], vec![]);
    g.add_output(y[0]);
    let mut m = Model::new(g, 13);
    m.infer_shapes(&DimBindings::all(1)).unwrap();
    let p = &m.graph.node_params(m.graph.node_id("layer").unwrap()).unwrap()[0];
    assert!(p.through_transpose);
    assert_eq!(m.graph.value(p.root).name, "w");
    assert_eq!(p.channel_axis, Some(0));
}

#[test]
fn dynamic_matmul_has_no_param() {
    let mut g = Graph::new("t");
    let a = g.add_input("a", DType::F32, known(&[4, 8]));
    let b = g.add_input("b", DType::F32, known(&[8, 2]));
    let y = node(&mut g, "MatMul", "layer", &[Some(a), Some(b)], &["y"], vec![]);
    g.add_output(y[0]);
    let m = Model::new(g, 13);
    assert!(m.graph.node_params(m.graph.node_id("layer").unwrap()).unwrap().is_empty());
}

#[test]
fn batchnorm_and_layernorm_params() {
    let mut g = Graph::new("norms");
    let x = g.add_input("x", DType::F32, known(&[1, 4, 2, 2]));
    let inits: Vec<_> = (0..4).map(|k| Some(g.add_initializer(&format!("p{k}"), tensor(&[4], k)))).collect();
    let mut ins = vec![Some(x)];
    ins.extend(inits);
    let y = node(&mut g, "BatchNormalization", "layer", &ins, &["y"], vec![]);
    g.add_output(y[0]);
    let m = Model::new(g, 13);
    let roles: Vec<ParamRole> = m.graph.params().unwrap().iter().map(|p| p.role).collect();
    assert_eq!(roles, [ParamRole::Weight, ParamRole::Bias, ParamRole::RunningMean, ParamRole::RunningVar]);
    assert_eq!(ParamRole::RunningVar.aimet_name(), "running_var");
}

#[test]
fn producers_and_consumers() {
    let m = conv_bn_classifier();
    let g = &m.graph;
    let conv_out = g.value_id("conv_out").unwrap();
    assert_eq!(g.producer_node(conv_out).unwrap().name, "conv");
    let readers: Vec<&str> = g.consumer_nodes(conv_out).iter().map(|&n| g.node(n).name.as_str()).collect();
    assert_eq!(readers, ["bn"]);
    let order: Vec<&str> = g.topological_order().unwrap().iter().map(|&n| g.node(n).name.as_str()).collect();
    assert_eq!(order, ["conv", "bn", "relu", "gap", "flatten", "fc"]);
    let downstream: Vec<&str> = g
        .downstream_nodes(&[g.value_id("relu_out").unwrap()])
        .iter()
        .map(|&n| g.node(n).name.as_str())
        .collect();
    assert_eq!(downstream, ["gap", "flatten", "fc"]);
}

#[test]
fn symbolic_batch_is_kept_or_bound() {
    let mut m = conv_bn_classifier();
    m.infer_shapes(&DimBindings::default()).unwrap();
    assert_eq!(out_shape(&m, "bn_out"), "[batch, 4, 8, 8]");
    m.infer_shapes(&DimBindings::default().with("batch", 32)).unwrap();
    assert_eq!(out_shape(&m, "logits"), "[32, 10]");
}

#[test]
fn pooling_and_resize_shapes() {
    let mut g = Graph::new("pools");
    let x = g.add_input("x", DType::F32, known(&[1, 3, 7, 7]));
    let p = node(
        &mut g,
        "MaxPool",
        "mp",
        &[Some(x)],
        &["mp"],
        vec![
            ("kernel_shape", Attribute::Ints(vec![2, 2])),
            ("strides", Attribute::Ints(vec![2, 2])),
            ("ceil_mode", Attribute::Int(1)),
        ],
    );
    let a = node(
        &mut g,
        "AveragePool",
        "ap",
        &[Some(p[0])],
        &["ap"],
        vec![("kernel_shape", Attribute::Ints(vec![3, 3])), ("pads", Attribute::Ints(vec![1, 1, 1, 1]))],
    );
    let scales = g.add_initializer("scales", Tensor::from_vec(&[4], vec![1.0f32, 1.0, 2.0, 2.0]).unwrap());
    let r = node(&mut g, "Resize", "rs", &[Some(a[0]), None, Some(scales)], &["rs"], vec![]);
    let gp = node(&mut g, "GlobalAveragePool", "gp", &[Some(r[0])], &["gp"], vec![]);
    g.add_output(gp[0]);
    let mut m = Model::new(g, 13);
    m.infer_shapes(&DimBindings::all(1)).unwrap();
    assert_eq!(out_shape(&m, "mp"), "[1, 3, 4, 4]");
    assert_eq!(out_shape(&m, "ap"), "[1, 3, 4, 4]");
    assert_eq!(out_shape(&m, "rs"), "[1, 3, 8, 8]");
    assert_eq!(out_shape(&m, "gp"), "[1, 3, 1, 1]");
}

#[test]
fn movement_ops_compute_shapes_and_values() {
    let mut g = Graph::new("moves");
    let x = g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("n".into()), Dim::Known(6), Dim::Known(4)]));
    let sh = node(&mut g, "Shape", "shape", &[Some(x)], &["s"], vec![]);
    let idx = g.add_initializer("idx", Tensor::scalar(1i64));
    let d1 = node(&mut g, "Gather", "g", &[Some(sh[0]), Some(idx)], &["d1"], vec![]);
    let ax = g.add_initializer("ax", Tensor::from_vec(&[1], vec![0i64]).unwrap());
    let u = node(&mut g, "Unsqueeze", "u", &[Some(d1[0]), Some(ax)], &["u"], vec![]);
    let minus = g.add_initializer("minus1", Tensor::from_vec(&[1], vec![-1i64]).unwrap());
    let c = node(
        &mut g,
        "Concat",
        "c",
        &[Some(minus), Some(u[0])],
        &["target"],
        vec![("axis", Attribute::Int(0))],
    );
    let r = node(&mut g, "Reshape", "r", &[Some(x), Some(c[0])], &["r"], vec![]);
    let starts = g.add_initializer("starts", Tensor::from_vec(&[1], vec![-3i64]).unwrap());
    let ends = g.add_initializer("ends", Tensor::from_vec(&[1], vec![i64::MAX]).unwrap());
    let axes1 = g.add_initializer("axes1", Tensor::from_vec(&[1], vec![1i64]).unwrap());
    let sl =
        node(&mut g, "Slice", "sl", &[Some(r[0]), Some(starts), Some(ends), Some(axes1)], &["sl"], vec![]);
    let sp = node(
        &mut g,
        "Split",
        "sp",
        &[Some(sl[0])],
        &["sp0", "sp1", "sp2"],
        vec![("axis", Attribute::Int(1))],
    );
    let t = node(&mut g, "Transpose", "t", &[Some(sp[0])], &["t"], vec![]);
    let red = node(
        &mut g,
        "ReduceMean",
        "rm",
        &[Some(t[0])],
        &["rm"],
        vec![("axes", Attribute::Ints(vec![-1])), ("keepdims", Attribute::Int(0))],
    );
    g.add_output(red[0]);
    let mut m = Model::new(g, 13);
    let report = m.infer_shapes(&DimBindings::default().with("n", 2)).unwrap();
    assert_eq!(
        report.values[m.graph.value_id("target").unwrap().index()].as_ref().unwrap().to_i64_vec().unwrap(),
        vec![-1, 6]
    );
    assert_eq!(out_shape(&m, "r"), "[8, 6]");
    assert_eq!(out_shape(&m, "sl"), "[8, 3]");
    assert_eq!(out_shape(&m, "sp2"), "[8, 1]");
    assert_eq!(out_shape(&m, "t"), "[1, 8]");
    assert_eq!(out_shape(&m, "rm"), "[1]");
    assert!(report.unknown_ops.is_empty());
}

#[test]
fn unknown_ops_are_listed_not_fatal() {
    let mut g = Graph::new("custom");
    let x = g.add_input("x", DType::F32, known(&[2]));
    let y = node(&mut g, "MyFancyOp", "fancy", &[Some(x)], &["y"], vec![]);
    g.add_output(y[0]);
    let mut m = Model::new(g, 13);
    let report = m.infer_shapes(&DimBindings::all(1)).unwrap();
    assert_eq!(report.unknown_ops.len(), 1);
}

/// x[N,3,8,8] → Conv → `tail` (one op on the conv output, with static extra inputs) → output.
fn conv_then(op: &str, extra: &[Tensor], attrs: Vec<(&str, Attribute)>) -> Model {
    let mut g = Graph::new("tail");
    let shape = Shape(vec![Dim::Symbol("N".into()), Dim::Known(3), Dim::Known(8), Dim::Known(8)]);
    let x = g.add_input("x", DType::F32, shape);
    let w = g.add_initializer("w", tensor(&[4, 3, 3, 3], 1));
    let c = node(&mut g, "Conv", "conv", &[Some(x), Some(w)], &["c"], vec![]);
    let mut inputs = vec![Some(c[0])];
    for (i, t) in extra.iter().enumerate() {
        inputs.push(Some(g.add_initializer(&format!("k{i}"), t.clone())));
    }
    let y = node(&mut g, op, "tail", &inputs, &["y"], attrs);
    g.add_output(y[0]);
    Model::new(g, 13)
}

#[test]
fn samples_are_independent_only_through_ops_that_keep_them_apart() {
    let i64s = |v: &[i64]| Tensor::from_vec(&[v.len()], v.to_vec()).unwrap();
    assert_eq!(qgraph::samples_independent(&conv_bn_classifier()), Ok(()));
    let keeps = [
        conv_then("Relu", &[], vec![]),
        conv_then("Reshape", &[i64s(&[-1, 144])], vec![]),
        conv_then("Reshape", &[i64s(&[0, 4, 36])], vec![]),
        conv_then("Transpose", &[], vec![("perm", Attribute::Ints(vec![0, 2, 3, 1]))]),
        conv_then("Softmax", &[], vec![("axis", Attribute::Int(1))]),
        conv_then("ReduceMean", &[], vec![("axes", Attribute::Ints(vec![2, 3]))]),
        conv_then("Add", &[tensor(&[4, 1, 1], 3)], vec![]),
        conv_then("Add", &[tensor(&[1, 4, 6, 6], 3)], vec![]),
    ];
    for m in &keeps {
        assert_eq!(
            qgraph::samples_independent(m),
            Ok(()),
            "{}",
            m.graph.node(m.graph.node_id("tail").unwrap()).op_type
        );
    }
    let mixes = [
        (conv_then("Reshape", &[i64s(&[-1])], vec![]), "Reshape node 'tail' may reshape the batch axis"),
        (conv_then("Reshape", &[i64s(&[1, -1])], vec![]), "Reshape node 'tail' may reshape the batch axis"),
        (
            conv_then("Transpose", &[], vec![("perm", Attribute::Ints(vec![1, 0, 2, 3]))]),
            "moves the batch axis",
        ),
        (conv_then("Softmax", &[], vec![("axis", Attribute::Int(0))]), "works along the batch axis"),
        (conv_then("ReduceMean", &[], vec![]), "reduces every axis"),
        (conv_then("Add", &[tensor(&[2, 4, 6, 6], 3)], vec![]), "broadcasts an operand over the batch axis"),
        (conv_then("Shape", &[], vec![]), "Shape node 'tail' is not known to keep samples apart"),
        (
            conv_then("Concat", &[tensor(&[1, 4, 6, 6], 3)], vec![("axis", Attribute::Int(1))]),
            "joins batched",
        ),
    ];
    for (m, why) in &mixes {
        let err = qgraph::samples_independent(m).unwrap_err();
        assert!(err.contains(why), "{err} (expected: {why})");
    }
    let mut fixed = conv_bn_classifier();
    let x = fixed.graph.inputs()[0];
    fixed.graph.value_mut(x).shape = Some(Shape::known(&[2, 3, 8, 8]));
    assert!(qgraph::samples_independent(&fixed).unwrap_err().contains("no free first axis"));
}
