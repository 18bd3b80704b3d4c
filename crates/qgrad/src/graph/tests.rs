//! Every rule against central finite differences: one-node (or few-node) graphs run by `qexec`,
//! the loss `Σ r·y` over all outputs for fixed pseudo-random `r`, its analytic gradient by every
//! f32 input and initializer compared with the numeric one.

use ndarray::{ArrayD, IxDyn};
use qexec::{Keep, RunOptions, Session, SessionOptions};
use qgraph::{Attribute, DType, Graph, Model, Shape, Tensor, ValueId};

use super::backward;
use crate::check::{compare, numeric_gradient, sample_values as values};

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, values(n, seed)).unwrap()
}

/// A graph under construction: float inputs with their test values.
struct Case {
    g: Graph,
    feeds: Vec<(String, Tensor)>,
    opset: i64,
}

impl Case {
    fn new() -> Case {
        Case { g: Graph::new("case"), feeds: Vec::new(), opset: 17 }
    }

    fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let seed = self.feeds.len() as u64 + 1;
        self.input_with(name, tensor(shape, seed))
    }

    fn input_with(&mut self, name: &str, t: Tensor) -> ValueId {
        let v = self.g.add_input(name, DType::F32, Shape::known(t.shape()));
        self.feeds.push((name.into(), t));
        v
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.g.add_initializer(name, tensor(shape, 100 + self.g.value_count() as u64))
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> ValueId {
        self.g.add_initializer(name, Tensor::from_vec(&[v.len()], v.to_vec()).unwrap())
    }

    fn scalar(&mut self, name: &str, v: f32) -> ValueId {
        self.g.add_initializer(name, Tensor::scalar(v))
    }

    fn op(&mut self, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attribute)>) -> ValueId {
        let name = format!("{}_{}", op.to_lowercase(), self.g.node_count());
        self.g.add_op(op, &name, inputs, attrs)
    }

    /// Checks the gradient of `Σ r·out` by every float input and initializer.
    fn check(mut self, out: ValueId) {
        self.g.add_output(out);
        let model = Model::new(self.g, self.opset);
        check_model(&model, &self.feeds, 2e-2, 0);
    }
}

fn run(model: &Model, feeds: &[(String, Tensor)], keep: Keep) -> qexec::RunResult {
    let session = Session::new(model.clone(), SessionOptions::threads(1)).unwrap();
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    session.run_with(&feeds, RunOptions::default().keep(keep)).unwrap()
}

fn loss(outputs: &[Tensor], r: &[Vec<f32>]) -> f64 {
    outputs
        .iter()
        .zip(r)
        .map(|(t, r)| {
            t.as_f32().unwrap().iter().zip(r).map(|(&y, &r)| f64::from(y) * f64::from(r)).sum::<f64>()
        })
        .sum()
}

/// Checks the gradients by every graph input and every f32 initializer of more than
/// `min_param_len` elements (a clip bound shared by many values sits on kinks).
pub(crate) fn check_model(model: &Model, feeds: &[(String, Tensor)], tol: f64, min_param_len: usize) {
    let g = &model.graph;
    let forward = run(model, feeds, Keep::All);
    let r: Vec<Vec<f32>> =
        forward.outputs.iter().enumerate().map(|(i, t)| values(t.len(), 1000 + i as u64)).collect();
    let seeds = g
        .outputs()
        .iter()
        .zip(&forward.outputs)
        .zip(&r)
        .map(|((&v, t), r)| (v, ArrayD::from_shape_vec(IxDyn(t.shape()), r.clone()).unwrap()))
        .collect();
    let inputs: Vec<ValueId> = g.inputs().to_vec();
    let params: Vec<ValueId> = g
        .initializers()
        .filter(|&v| g.static_value(v).is_some_and(|t| t.dtype() == DType::F32 && t.len() > min_param_len))
        .collect();
    let wrt: Vec<ValueId> = inputs.iter().chain(&params).copied().collect();
    let grads = backward(model, &forward.kept, seeds, &wrt, &mut |_, _| Ok(())).unwrap();
    for (i, &v) in inputs.iter().enumerate() {
        let name = &g.value(v).name;
        let x: Vec<f32> = feeds[i].1.as_f32().unwrap().iter().copied().collect();
        let mut f = |probe: &[f32]| {
            let mut fed = feeds.to_vec();
            fed[i].1 = Tensor::from_vec(feeds[i].1.shape(), probe.to_vec()).unwrap();
            loss(&run(model, &fed, Keep::Outputs).outputs, &r)
        };
        let numeric = numeric_gradient(&mut f, &x, 1e-3);
        let analytic: Vec<f32> =
            grads.get(&v).map(|a| a.iter().copied().collect()).unwrap_or_else(|| vec![0.0; x.len()]);
        compare(&analytic, &numeric, tol).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for &v in &params {
        let name = &g.value(v).name;
        let t = g.static_value(v).unwrap();
        let x: Vec<f32> = t.as_f32().unwrap().iter().copied().collect();
        let mut f = |probe: &[f32]| {
            let mut m = model.clone();
            m.graph.value_mut(v).data = Some(Tensor::from_vec(t.shape(), probe.to_vec()).unwrap());
            loss(&run(&m, feeds, Keep::Outputs).outputs, &r)
        };
        let numeric = numeric_gradient(&mut f, &x, 1e-3);
        let analytic: Vec<f32> =
            grads.get(&v).map(|a| a.iter().copied().collect()).unwrap_or_else(|| vec![0.0; x.len()]);
        compare(&analytic, &numeric, tol).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

fn ints(v: &[i64]) -> Attribute {
    Attribute::Ints(v.to_vec())
}

#[test]
fn elementwise_binary_ops_broadcast() {
    for op in ["Add", "Sub", "Mul", "Div"] {
        let mut c = Case::new();
        let a = c.input("a", &[2, 3, 4]);
        let b = c.input_with("b", Tensor::from_vec(&[3, 1], vec![1.5f32, -2.0, 0.75]).unwrap());
        let y = c.op(op, &[a, b], vec![]);
        c.check(y);
    }
    let mut c = Case::new();
    let a = c.input_with("a", Tensor::from_vec(&[4], vec![0.5f32, 1.2, 2.0, 0.8]).unwrap());
    let b = c.input("b", &[2, 4]);
    let y = c.op("Pow", &[a, b], vec![]);
    c.check(y);
}

#[test]
fn unary_activations() {
    for op in [
        "Relu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Neg",
        "Erf",
        "Exp",
        "Softplus",
        "Abs",
        "LeakyRelu",
        "Elu",
        "Gelu",
    ] {
        let mut c = Case::new();
        c.opset = 20;
        let x = c.input_with(
            "x",
            Tensor::from_vec(&[2, 8], values(16, 7).iter().map(|v| v * 4.0).collect()).unwrap(),
        );
        let y = c.op(op, &[x], vec![]);
        c.check(y);
    }
    for op in ["Log", "Sqrt", "Reciprocal"] {
        let mut c = Case::new();
        let x = c.input_with("x", Tensor::from_vec(&[6], vec![0.5f32, 1.0, 2.0, 3.0, 0.7, 1.9]).unwrap());
        let y = c.op(op, &[x], vec![]);
        c.check(y);
    }
    let mut c = Case::new();
    let x = c.input("x", &[2, 10]);
    let lo = c.scalar("lo", -0.45);
    let hi = c.scalar("hi", 0.55);
    let y = c.op("Clip", &[x, lo, hi], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 2, 2]);
    let s = c.weight("slope", &[3, 1, 1]);
    let y = c.op("PRelu", &[x, s], vec![]);
    c.check(y);
}

#[test]
fn softmax_and_log_softmax() {
    for op in ["Softmax", "LogSoftmax"] {
        for (opset, axis) in [(13, 1), (11, 1), (13, -1)] {
            let mut c = Case::new();
            c.opset = opset;
            let x = c.input("x", &[2, 3, 4]);
            let y = c.op(op, &[x], vec![("axis", Attribute::Int(axis))]);
            c.check(y);
        }
    }
}

#[test]
fn convolutions_dense_grouped_depthwise_and_1d() {
    for (group, cin, cout, pads, strides) in
        [(1, 3, 4, [1, 1, 1, 1], [1, 1]), (2, 4, 6, [0, 1, 1, 0], [2, 1]), (4, 4, 4, [1, 1, 1, 1], [2, 2])]
    {
        let mut c = Case::new();
        let x = c.input("x", &[2, cin, 5, 6]);
        let w = c.weight("w", &[cout, cin / group, 3, 3]);
        let b = c.weight("b", &[cout]);
        let attrs = vec![
            ("group", Attribute::Int(group as i64)),
            ("pads", ints(&pads)),
            ("strides", ints(&strides)),
            ("kernel_shape", ints(&[3, 3])),
        ];
        let y = c.op("Conv", &[x, w, b], attrs);
        c.check(y);
    }
    let mut c = Case::new();
    let x = c.input("x", &[1, 2, 1]);
    let w = c.weight("w", &[3, 2, 5]);
    let y = c.op("Conv", &[x, w], vec![("pads", ints(&[2, 2]))]);
    c.check(y);
}

#[test]
fn transposed_convolutions() {
    for (group, cin, cout, pads, strides, output_padding) in [
        (1, 3, 4, [1, 1, 1, 1], [2, 2], [1, 1]),
        (2, 4, 6, [0, 1, 1, 0], [2, 1], [0, 0]),
        (1, 2, 2, [0, 0, 0, 0], [1, 1], [0, 0]),
    ] {
        let mut c = Case::new();
        let x = c.input("x", &[2, cin, 4, 3]);
        let w = c.weight("w", &[cin, cout / group, 3, 3]);
        let b = c.weight("b", &[cout]);
        let attrs = vec![
            ("group", Attribute::Int(group as i64)),
            ("pads", ints(&pads)),
            ("strides", ints(&strides)),
            ("output_padding", ints(&output_padding)),
        ];
        let y = c.op("ConvTranspose", &[x, w, b], attrs);
        c.check(y);
    }
    let mut c = Case::new();
    let x = c.input("x", &[1, 2, 5]);
    let w = c.weight("w", &[2, 3, 4]);
    let y = c.op("ConvTranspose", &[x, w], vec![("strides", ints(&[2])), ("pads", ints(&[1, 1]))]);
    c.check(y);
}

#[test]
fn gemm_and_matmul() {
    for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let mut c = Case::new();
        let a = c.input("a", if ta == 1 { &[4, 3] } else { &[3, 4] });
        let b = c.weight("b", if tb == 1 { &[5, 4] } else { &[4, 5] });
        let bias = c.weight("c", &[5]);
        let attrs = vec![
            ("transA", Attribute::Int(ta)),
            ("transB", Attribute::Int(tb)),
            ("alpha", Attribute::Float(0.5)),
            ("beta", Attribute::Float(2.0)),
        ];
        let y = c.op("Gemm", &[a, b, bias], attrs);
        c.check(y);
    }
    for (sa, sb) in [
        (vec![2, 3, 4], vec![4, 5]),
        (vec![4], vec![2, 4, 3]),
        (vec![2, 1, 3, 4], vec![3, 4, 2]),
        (vec![3, 4], vec![4]),
    ] {
        let mut c = Case::new();
        let a = c.input("a", &sa);
        let b = c.input("b", &sb);
        let y = c.op("MatMul", &[a, b], vec![]);
        c.check(y);
    }
}

#[test]
fn normalizations() {
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 2, 2]);
    let s = c.weight("scale", &[3]);
    let b = c.weight("bias", &[3]);
    let m = c.weight("mean", &[3]);
    let v = c.g.add_initializer("var", Tensor::from_vec(&[3], vec![0.5f32, 1.5, 2.0]).unwrap());
    let y = c.op("BatchNormalization", &[x, s, b, m, v], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 6]);
    let s = c.weight("scale", &[6]);
    let b = c.weight("bias", &[6]);
    let y = c.op("LayerNormalization", &[x, s, b], vec![("axis", Attribute::Int(-1))]);
    c.check(y);
}

#[test]
fn pooling() {
    for (op, attrs) in [
        ("MaxPool", vec![("kernel_shape", ints(&[2, 2])), ("strides", ints(&[2, 2]))]),
        (
            "MaxPool",
            vec![("kernel_shape", ints(&[3, 3])), ("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
        ),
        ("AveragePool", vec![("kernel_shape", ints(&[3, 3])), ("pads", ints(&[1, 1, 1, 1]))]),
        (
            "AveragePool",
            vec![
                ("kernel_shape", ints(&[3, 2])),
                ("pads", ints(&[1, 0, 1, 1])),
                ("count_include_pad", Attribute::Int(1)),
            ],
        ),
        (
            "AveragePool",
            vec![
                ("kernel_shape", ints(&[2, 2])),
                ("auto_pad", Attribute::String(b"SAME_UPPER".to_vec())),
                ("strides", ints(&[2, 2])),
            ],
        ),
        ("GlobalAveragePool", vec![]),
        ("GlobalMaxPool", vec![]),
    ] {
        let mut c = Case::new();
        let x = c.input("x", &[2, 2, 5, 5]);
        let y = c.op(op, &[x], attrs);
        c.check(y);
    }
}

#[test]
fn reductions_and_movement() {
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 4]);
    let y = c.op("ReduceMean", &[x], vec![("axes", ints(&[1, 2])), ("keepdims", Attribute::Int(0))]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 4]);
    let axes = c.ints("axes", &[-1]);
    let y = c.op("ReduceSum", &[x, axes], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[2, 3, 4]);
    let shape = c.ints("shape", &[4, -1]);
    let r = c.op("Reshape", &[x, shape], vec![]);
    let t = c.op("Transpose", &[r], vec![("perm", ints(&[1, 0]))]);
    let f = c.op("Flatten", &[t], vec![("axis", Attribute::Int(0))]);
    c.check(f);
    let mut c = Case::new();
    let a = c.input("a", &[2, 3]);
    let b = c.input("b", &[2, 2]);
    let y = c.op("Concat", &[a, b, a], vec![("axis", Attribute::Int(1))]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[4, 6]);
    let (s, e, a, st) =
        (c.ints("s", &[1, -1]), c.ints("e", &[4, 0]), c.ints("a", &[0, 1]), c.ints("st", &[2, -2]));
    let y = c.op("Slice", &[x, s, e, a, st], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[5, 3]);
    let idx = c.g.add_initializer("idx", Tensor::from_vec(&[2, 2], vec![0i64, 4, -1, 2]).unwrap());
    let y = c.op("Gather", &[x, idx], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[1, 2, 3, 3]);
    let pads = c.ints("pads", &[0, 0, 1, 2, 0, 0, 2, 1]);
    let y = c.op("Pad", &[x, pads], vec![]);
    c.check(y);
    let mut c = Case::new();
    let x = c.input("x", &[2, 6]);
    let split = c.ints("split", &[2, 4]);
    let node = c.g.add_node(qgraph::NodeSpec {
        name: "split".into(),
        op_type: "Split".into(),
        domain: String::new(),
        attrs: vec![("axis".into(), Attribute::Int(1))],
        inputs: vec![Some(x), Some(split)],
        outputs: vec!["p0".into(), "p1".into()],
    });
    let (p0, p1) = (c.g.node(node).output(0).unwrap(), c.g.node(node).output(1).unwrap());
    let y = c.op("Mul", &[p1, p1], vec![]);
    let z = c.op("ReduceSum", &[y], vec![("keepdims", Attribute::Int(0))]);
    c.g.add_output(p0);
    c.check(z);
}

#[test]
fn an_op_without_a_rule_is_named() {
    let mut c = Case::new();
    let x = c.input("x", &[2, 3]);
    let y = c.op("Round", &[x], vec![]);
    c.g.add_output(y);
    let model = Model::new(c.g, 17);
    let feeds: Vec<(&str, Tensor)> = c.feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let session = Session::new(model.clone(), SessionOptions::threads(1)).unwrap();
    let run = session.run_with(&feeds, RunOptions::default().keep(Keep::All)).unwrap();
    let seed = ArrayD::ones(IxDyn(&[2, 3]));
    let err = backward(&model, &run.kept, vec![(y, seed)], &[x], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("round_0 (Round)"), "{err}");
}

#[test]
fn whole_digits_model() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/digits_cnn.onnx");
    let mut model = qgraph::load_path(std::path::Path::new(path)).unwrap();
    model.graph.value_mut(model.graph.inputs()[0]).shape = Some(Shape::known(&[2, 1, 8, 8]));
    let feeds = vec![("input".to_string(), tensor(&[2, 1, 8, 8], 3))];
    check_model(&model, &feeds, 2e-2, 1);
}

#[test]
fn a_non_finite_gradient_is_named() {
    let mut c = Case::new();
    let x = c.input_with("x", Tensor::from_vec(&[3], vec![0.0f32, 1.0, 4.0]).unwrap());
    let y = c.op("Sqrt", &[x], vec![]);
    c.g.add_output(y);
    let model = Model::new(c.g, 17);
    let feeds: Vec<(&str, Tensor)> = c.feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let session = Session::new(model.clone(), SessionOptions::threads(1)).unwrap();
    let run = session.run_with(&feeds, RunOptions::default().keep(Keep::All)).unwrap();
    let seed = ArrayD::ones(IxDyn(&[3]));
    let err = backward(&model, &run.kept, vec![(y, seed)], &[x], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("sqrt_0 (Sqrt): the gradient by 'x' is NaN or infinite"), "{err}");
}
