//! Graph passes: batch-norm folding checked numerically against a naive reference (backward into
//! Conv/Gemm/MatMul, forward into Conv/Gemm, affine rewrite of unfoldable BNs), Identity/Dropout
//! removal, constant folding of a shape chain, dead-node elimination, and inputs bound to values.

#![allow(dead_code)]
mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use qgraph::passes::{
    BnFoldDirection, eliminate_dead_nodes, fold_batch_norms, fold_constants, remove_identities,
};
use qgraph::{Attribute, DType, Dim, DimBindings, Graph, Model, Node, Shape, Tensor, ValueSource};

fn data(m: &Model, name: &str) -> ArrayD<f32> {
    m.graph.static_value(m.graph.value_id(name).unwrap()).unwrap().as_f32().unwrap().to_owned()
}

fn input_data(m: &Model, node: &Node, slot: usize) -> Option<ArrayD<f32>> {
    node.input(slot).and_then(|v| m.graph.static_value(v)).map(|t| t.as_f32().unwrap().to_owned())
}

/// Naive NCHW convolution (group 1, stride 1, symmetric padding `pad`).
fn conv(x: &ArrayD<f32>, w: &ArrayD<f32>, b: Option<&ArrayD<f32>>, pad: usize) -> ArrayD<f32> {
    let (c_in, h, wd) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let (c_out, k) = (w.shape()[0], w.shape()[2]);
    let (ho, wo) = (h + 2 * pad - k + 1, wd + 2 * pad - k + 1);
    let mut y = ArrayD::zeros(IxDyn(&[1, c_out, ho, wo]));
    for o in 0..c_out {
        for i in 0..ho {
            for j in 0..wo {
                let mut acc = b.map_or(0.0, |b| b[[o]]);
                for c in 0..c_in {
                    for ki in 0..k {
                        for kj in 0..k {
                            let (yi, xj) =
                                ((i + ki) as isize - pad as isize, (j + kj) as isize - pad as isize);
                            if yi >= 0 && xj >= 0 && (yi as usize) < h && (xj as usize) < wd {
                                acc += x[[0, c, yi as usize, xj as usize]] * w[[o, c, ki, kj]];
                            }
                        }
                    }
                }
                y[[0, o, i, j]] = acc;
            }
        }
    }
    y
}

/// Inference BatchNormalization over axis 1.
fn bn(
    x: &ArrayD<f32>,
    g: &ArrayD<f32>,
    b: &ArrayD<f32>,
    mean: &ArrayD<f32>,
    var: &ArrayD<f32>,
    eps: f32,
) -> ArrayD<f32> {
    let mut y = x.clone();
    for (idx, v) in y.indexed_iter_mut() {
        let c = idx[1];
        *v = (*v - mean[[c]]) / (var[[c]] + eps).sqrt() * g[[c]] + b[[c]];
    }
    y
}

/// `x[M,K] · W` (W stored `[K,N]`, or `[N,K]` when `trans_b`) `+ beta·c`.
fn gemm(x: &ArrayD<f32>, w: &ArrayD<f32>, c: Option<&ArrayD<f32>>, trans_b: bool, beta: f32) -> ArrayD<f32> {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let n = if trans_b { w.shape()[0] } else { w.shape()[1] };
    let mut y = ArrayD::zeros(IxDyn(&[m, n]));
    for i in 0..m {
        for j in 0..n {
            let mut acc = c.map_or(0.0, |c| beta * c[[j]]);
            for kk in 0..k {
                acc += x[[i, kk]] * if trans_b { w[[j, kk]] } else { w[[kk, j]] };
            }
            y[[i, j]] = acc;
        }
    }
    y
}

fn assert_close(a: &ArrayD<f32>, b: &ArrayD<f32>) {
    assert_eq!(a.shape(), b.shape());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn backward_fold_into_conv_matches_conv_then_bn() {
    let mut m = conv_bn_classifier();
    let x = tensor(&[1, 3, 8, 8], 99).as_f32().unwrap().to_owned();
    let reference = bn(
        &conv(&x, &data(&m, "conv.weight"), Some(&data(&m, "conv.bias")), 1),
        &data(&m, "bn.scale"),
        &data(&m, "bn.bias"),
        &data(&m, "bn.mean"),
        &data(&m, "bn.var"),
        1e-3,
    );
    let folds = fold_batch_norms(&mut m).unwrap();
    assert_eq!(folds.len(), 1);
    assert_eq!(folds[0].direction, BnFoldDirection::Backward);
    m.graph.validate().unwrap();
    assert!(m.graph.nodes().all(|(_, n)| n.op_type != "BatchNormalization"));
    let conv_node = m.graph.node(m.graph.node_id("conv").unwrap());
    assert_eq!(m.graph.value(conv_node.output(0).unwrap()).name, "bn_out", "the BN output name is kept");
    let folded = conv(&x, &input_data(&m, conv_node, 1).unwrap(), input_data(&m, conv_node, 2).as_ref(), 1);
    assert_close(&folded, &reference);
    assert_eq!(data(&m, "conv.weight").shape(), &[4, 3, 3, 3], "weights keep their names");
    assert_eq!(reload(&m), m);
}

fn linear_bn(op: &str, trans_b: bool, beta: f32) -> Model {
    let mut g = Graph::new("lin");
    let x = g.add_input("x", DType::F32, Shape::known(&[3, 5]));
    let w = g.add_initializer("w", tensor(if trans_b { &[4, 5] } else { &[5, 4] }, 11));
    let mut ins = vec![Some(x), Some(w)];
    let mut attrs = vec![];
    if op == "Gemm" {
        ins.push(Some(g.add_initializer("c", tensor(&[4], 12))));
        attrs = vec![("transB", Attribute::Int(i64::from(trans_b))), ("beta", Attribute::Float(beta))];
    }
    let y = node(&mut g, op, "lin", &ins, &["lin_out"], attrs);
    let p: Vec<_> = (0..4)
        .map(|k| {
            Some(g.add_initializer(
                &format!("bn{k}"),
                if k == 3 { positive(&[4], 20) } else { tensor(&[4], 13 + k) },
            ))
        })
        .collect();
    let mut bn_in = vec![Some(y[0])];
    bn_in.extend(p);
    let z = node(&mut g, "BatchNormalization", "bn", &bn_in, &["z"], vec![]);
    g.add_output(z[0]);
    Model::new(g, 13)
}

#[test]
fn backward_fold_into_gemm_and_matmul() {
    for (op, trans_b, beta) in [("Gemm", true, 0.5f32), ("Gemm", false, 1.0), ("MatMul", false, 1.0)] {
        let mut m = linear_bn(op, trans_b, beta);
        let x = tensor(&[3, 5], 5).as_f32().unwrap().to_owned();
        let c = (op == "Gemm").then(|| data(&m, "c"));
        let y = gemm(&x, &data(&m, "w"), c.as_ref(), trans_b, beta);
        let reference = bn(&y, &data(&m, "bn0"), &data(&m, "bn1"), &data(&m, "bn2"), &data(&m, "bn3"), 1e-5);
        assert_eq!(fold_batch_norms(&mut m).unwrap().len(), 1, "{op}");
        let n = m.graph.node(m.graph.node_id("lin").unwrap());
        assert_eq!(n.op_type, "Gemm");
        assert_eq!(n.float_attr("beta", 1.0).unwrap(), 1.0);
        let tb = n.int_attr("transB", 0).unwrap() != 0;
        let folded = gemm(&x, &input_data(&m, n, 1).unwrap(), input_data(&m, n, 2).as_ref(), tb, 1.0);
        assert_close(&folded, &reference);
        m.graph.validate().unwrap();
    }
}

#[test]
fn forward_fold_into_pointwise_conv() {
    let mut g = Graph::new("fwd");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 3, 4, 4]));
    let p: Vec<_> = (0..4)
        .map(|k| {
            Some(g.add_initializer(
                &format!("bn{k}"),
                if k == 3 { positive(&[3], 30) } else { tensor(&[3], 31 + k) },
            ))
        })
        .collect();
    let mut bn_in = vec![Some(x)];
    bn_in.extend(p);
    let y = node(&mut g, "BatchNormalization", "bn", &bn_in, &["bn_out"], vec![]);
    let w = g.add_initializer("w", tensor(&[5, 3, 1, 1], 40));
    let z = node(&mut g, "Conv", "conv", &[Some(y[0]), Some(w)], &["z"], vec![]);
    g.add_output(z[0]);
    let mut m = Model::new(g, 13);
    let xin = tensor(&[1, 3, 4, 4], 41).as_f32().unwrap().to_owned();
    let normed = bn(&xin, &data(&m, "bn0"), &data(&m, "bn1"), &data(&m, "bn2"), &data(&m, "bn3"), 1e-5);
    let reference = conv(&normed, &data(&m, "w"), None, 0);
    let folds = fold_batch_norms(&mut m).unwrap();
    assert_eq!(folds[0].direction, BnFoldDirection::Forward);
    let n = m.graph.node(m.graph.node_id("conv").unwrap());
    assert_eq!(m.graph.value(n.input(0).unwrap()).name, "x");
    let folded = conv(&xin, &input_data(&m, n, 1).unwrap(), input_data(&m, n, 2).as_ref(), 0);
    assert_close(&folded, &reference);
    m.graph.validate().unwrap();
}

#[test]
fn unfoldable_bn_becomes_affine() {
    let mut m = conv_bn_classifier();
    // A second reader of the conv output forbids the backward fold; the BN feeds a Relu.
    let conv_out = m.graph.value_id("conv_out").unwrap();
    let extra = node(&mut m.graph, "Relu", "extra", &[Some(conv_out)], &["extra_out"], vec![]);
    m.graph.add_output(extra[0]);
    let before = ["bn.scale", "bn.bias", "bn.mean", "bn.var"].map(|n| data(&m, n));
    let x = tensor(&[1, 4, 2, 2], 3).as_f32().unwrap().to_owned();
    let reference = bn(&x, &before[0], &before[1], &before[2], &before[3], 1e-3);
    assert!(fold_batch_norms(&mut m).unwrap().is_empty());
    let n = m.graph.node(m.graph.node_id("bn").unwrap());
    let p: Vec<ArrayD<f32>> = (1..5).map(|s| input_data(&m, n, s).unwrap()).collect();
    assert!(p[2].iter().all(|&v| v == 0.0) && p[3].iter().all(|&v| v == 1.0));
    assert_eq!(n.float_attr("epsilon", 1.0).unwrap(), 0.0);
    assert_close(&bn(&x, &p[0], &p[1], &p[2], &p[3], 0.0), &reference);
}

#[test]
fn identities_and_dropouts_are_removed() {
    let mut g = Graph::new("ids");
    let x = g.add_input("x", DType::F32, Shape::known(&[2]));
    let a = node(&mut g, "Relu", "r", &[Some(x)], &["a"], vec![]);
    let b = node(&mut g, "Identity", "i1", &[Some(a[0])], &["b"], vec![]);
    let c = node(&mut g, "Dropout", "d", &[Some(b[0])], &["c"], vec![]);
    let d = node(&mut g, "Neg", "n", &[Some(c[0])], &["d"], vec![]);
    let e = node(&mut g, "Identity", "i2", &[Some(d[0])], &["out"], vec![]);
    let passthrough = node(&mut g, "Identity", "i3", &[Some(x)], &["x_copy"], vec![]);
    g.add_output(e[0]);
    g.add_output(passthrough[0]);
    let mut m = Model::new(g, 13);
    assert_eq!(remove_identities(&mut m.graph).unwrap(), 3);
    m.graph.validate().unwrap();
    let ops: Vec<&str> = m.graph.nodes().map(|(_, n)| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Relu", "Neg", "Identity"], "an Identity from a graph input to an output stays");
    let outs: Vec<&str> = m.graph.outputs().iter().map(|&v| m.graph.value(v).name.as_str()).collect();
    assert_eq!(outs, ["out", "x_copy"]);
    let neg = m.graph.node(m.graph.node_id("n").unwrap());
    assert_eq!(m.graph.value(neg.input(0).unwrap()).name, "a");
}

#[test]
fn shape_chain_folds_into_an_initializer() {
    let mut g = Graph::new("chain");
    let x = g.add_input(
        "x",
        DType::F32,
        Shape(vec![Dim::Symbol("batch".into()), Dim::Symbol("seq".into()), Dim::Known(8)]),
    );
    let s = node(&mut g, "Shape", "shape", &[Some(x)], &["s"], vec![]);
    let i0 = g.add_initializer("i0", Tensor::scalar(0i64));
    let i1 = g.add_initializer("i1", Tensor::scalar(1i64));
    let b = node(&mut g, "Gather", "gb", &[Some(s[0]), Some(i0)], &["b"], vec![]);
    let q = node(&mut g, "Gather", "gq", &[Some(s[0]), Some(i1)], &["q"], vec![]);
    let zero = g.add_initializer("ax", Tensor::from_vec(&[1], vec![0i64]).unwrap());
    let ub = node(&mut g, "Unsqueeze", "ub", &[Some(b[0]), Some(zero)], &["ub"], vec![]);
    let uq = node(&mut g, "Unsqueeze", "uq", &[Some(q[0]), Some(zero)], &["uq"], vec![]);
    let heads = g.add_initializer("heads", Tensor::from_vec(&[2], vec![2i64, 4]).unwrap());
    let t = node(
        &mut g,
        "Concat",
        "cat",
        &[Some(ub[0]), Some(uq[0]), Some(heads)],
        &["target"],
        vec![("axis", Attribute::Int(0))],
    );
    let r = node(&mut g, "Reshape", "reshape", &[Some(x), Some(t[0])], &["r"], vec![]);
    g.add_output(r[0]);
    let mut m = Model::new(g, 13);
    assert_eq!(fold_constants(&mut m, &DimBindings::default()).unwrap(), 0, "symbolic dims do not fold");
    assert_eq!(fold_constants(&mut m, &DimBindings::default().with("batch", 2).with("seq", 5)).unwrap(), 6);
    let ops: Vec<&str> = m.graph.nodes().map(|(_, n)| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Reshape"]);
    let target = m.graph.value_id("target").unwrap();
    assert_eq!(m.graph.value(target).source(), ValueSource::Initializer);
    assert_eq!(m.graph.static_value(target).unwrap().to_i64_vec().unwrap(), vec![2, 5, 2, 4]);
    m.graph.validate().unwrap();
    assert_eq!(reload(&m), m);
}

#[test]
fn dead_nodes_are_eliminated() {
    let mut m = conv_bn_classifier();
    let relu = m.graph.value_id("relu_out").unwrap();
    node(&mut m.graph, "Neg", "unused1", &[Some(relu)], &["u1"], vec![]);
    let u1 = m.graph.value_id("u1").unwrap();
    node(&mut m.graph, "Abs", "unused2", &[Some(u1)], &["u2"], vec![]);
    assert_eq!(eliminate_dead_nodes(&mut m.graph).unwrap(), 2);
    assert_eq!(m.graph.node_count(), 6);
    m.graph.validate().unwrap();
    assert_eq!(m, conv_bn_classifier());
}

#[test]
fn a_bound_input_becomes_an_initializer_of_its_declared_type_and_shape() {
    let mut g = Graph::new("bind");
    g.add_input("x", DType::F32, Shape(vec![Dim::Symbol("N".into()), Dim::Known(2)]));
    let rate = g.add_input("rate", DType::I64, Shape::known(&[]));
    let gains = g.add_input("gains", DType::F32, Shape::known(&[2]));
    let y = g.add_op("Mul", "y", &[gains, gains], vec![]);
    g.add_output(y);
    g.add_output(rate);
    g.bind_input_numbers("rate", &[16000.0]).unwrap();
    g.bind_input_numbers("gains", &[0.5, 2.0]).unwrap();
    assert_eq!(g.inputs().iter().map(|&v| g.value(v).name.as_str()).collect::<Vec<_>>(), ["x"]);
    assert_eq!(g.static_value(rate).unwrap().to_i64_vec().unwrap(), [16000]);
    assert_eq!(g.static_value(gains).unwrap().shape(), [2]);
    for (name, values, needle) in [
        ("x", vec![1.0], "not fully declared"),
        ("rate", vec![1.5], "not an integer"),
        ("nope", vec![1.0], "not a graph input"),
    ] {
        let e = g.bind_input_numbers(name, &values).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(name), "{e}");
    }
    let e = g.bind_input("x", Tensor::from_vec(&[1, 3], vec![0f32; 3]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
}
