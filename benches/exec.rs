//! Criterion bench: the interpreter's hot kernels on MobileNetV2 and MiniLM layer shapes, each a
//! one-node model run through a single-threaded `qexec::Session` — pointwise (1×1) Conv (wide
//! and shallow at 112×112, deep and small at 7×7), the
//! strided 3×3 stem Conv, depthwise 3×3 Conv at stride 1 and 2 on 56×56 and 112×112 planes (with
//! fused Clip), and MatMul.
//! Throughput is reported in MACs so the numbers compare across shapes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qexec::{Session, SessionOptions};
use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor};

fn filled(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect()).unwrap()
}

/// A session running `op` on a fed input `x` of `x_shape` with weight `w_shape` (and a Clip to
/// [0, 6] after it when `clip`).
fn session(
    op: &str,
    x_shape: &[usize],
    w_shape: &[usize],
    attrs: Vec<(&str, Attribute)>,
    clip: bool,
) -> Session {
    let mut g = Graph::new(op);
    let x = g.add_input("x", DType::F32, Shape::known(x_shape));
    let w = g.add_initializer("w", filled(w_shape));
    let node = g.add_node(NodeSpec {
        name: op.into(),
        op_type: op.into(),
        domain: String::new(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        inputs: vec![Some(x), Some(w)],
        outputs: vec!["y".into()],
    });
    let mut y = g.node(node).outputs()[0].unwrap();
    if clip {
        let lo = g.add_initializer("lo", Tensor::scalar(0.0f32));
        let hi = g.add_initializer("hi", Tensor::scalar(6.0f32));
        let c = g.add_node(NodeSpec {
            name: "clip".into(),
            op_type: "Clip".into(),
            domain: String::new(),
            attrs: vec![],
            inputs: vec![Some(y), Some(lo), Some(hi)],
            outputs: vec!["z".into()],
        });
        y = g.node(c).outputs()[0].unwrap();
    }
    g.add_output(y);
    Session::new(Model::new(g, 13), SessionOptions::threads(1)).unwrap()
}

fn ints(v: &[i64]) -> Attribute {
    Attribute::Ints(v.to_vec())
}

/// Name, input shape, weight shape, attributes, whether a Clip follows, MACs per run.
type Case = (&'static str, Vec<usize>, Vec<usize>, Vec<(&'static str, Attribute)>, bool, u64);

fn kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("qexec");
    group.sample_size(20);
    let cases: Vec<Case> = vec![
        ("conv1x1_96to24_56x56", vec![1, 96, 56, 56], vec![24, 96, 1, 1], vec![], false, 24 * 96 * 56 * 56),
        (
            "conv1x1_16to96_112x112",
            vec![1, 16, 112, 112],
            vec![96, 16, 1, 1],
            vec![],
            true,
            96 * 16 * 112 * 112,
        ),
        ("conv1x1_160to960_7x7", vec![1, 160, 7, 7], vec![960, 160, 1, 1], vec![], true, 960 * 160 * 7 * 7),
        (
            "conv3x3s2_stem_3to32_224",
            vec![1, 3, 224, 224],
            vec![32, 3, 3, 3],
            vec![("strides", ints(&[2, 2])), ("pads", ints(&[0, 0, 1, 1]))],
            true,
            32 * 27 * 112 * 112,
        ),
        (
            "depthwise3x3s1_144_56x56",
            vec![1, 144, 56, 56],
            vec![144, 1, 3, 3],
            vec![("group", Attribute::Int(144)), ("pads", ints(&[1, 1, 1, 1]))],
            true,
            144 * 9 * 56 * 56,
        ),
        (
            "depthwise3x3s2_144_56x56",
            vec![1, 144, 56, 56],
            vec![144, 1, 3, 3],
            vec![("group", Attribute::Int(144)), ("strides", ints(&[2, 2])), ("pads", ints(&[0, 0, 1, 1]))],
            true,
            144 * 9 * 28 * 28,
        ),
        (
            "depthwise3x3s1_32_112x112",
            vec![1, 32, 112, 112],
            vec![32, 1, 3, 3],
            vec![("group", Attribute::Int(32)), ("pads", ints(&[1, 1, 1, 1]))],
            true,
            32 * 9 * 112 * 112,
        ),
        (
            "depthwise3x3s2_96_112x112",
            vec![1, 96, 112, 112],
            vec![96, 1, 3, 3],
            vec![("group", Attribute::Int(96)), ("strides", ints(&[2, 2])), ("pads", ints(&[0, 0, 1, 1]))],
            true,
            96 * 9 * 56 * 56,
        ),
        ("matmul_48x384x1536", vec![1, 48, 384], vec![384, 1536], vec![], false, 48 * 384 * 1536),
    ];
    for (name, xs, ws, attrs, clip, macs) in cases {
        let op = if name.starts_with("matmul") { "MatMul" } else { "Conv" };
        let s = session(op, &xs, &ws, attrs, clip);
        let x = filled(&xs);
        group.throughput(Throughput::Elements(macs));
        group.bench_function(BenchmarkId::new("kernel", name), |b| {
            b.iter(|| s.run(&[("x", x.clone())]).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
