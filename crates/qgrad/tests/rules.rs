//! Every gradient rule against central finite differences, and every forward against the
//! interpreter (`qexec`), on random geometries.

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use qexec::{Session, SessionOptions};
use qgrad::check::{compare, numeric_gradient, sample_values as values};
use qgrad::{Activation, Linear, channel_mse, channel_mse_after};
use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor};

/// A one-node model of `op` with input `x` and static weight (and bias).
fn one_node(
    op: &str,
    attrs: Vec<(String, Attribute)>,
    x_shape: &[usize],
    w: ArrayD<f32>,
    b: Option<Vec<f32>>,
) -> Model {
    let mut g = Graph::new("rule");
    let x = g.add_input("x", DType::F32, Shape::known(x_shape));
    let wv = g.add_initializer("w", Tensor::F32(w.into_shared()));
    let mut inputs = vec![Some(x), Some(wv)];
    if let Some(b) = b {
        let n = b.len();
        inputs.push(Some(g.add_initializer(
            "b",
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n]), b).unwrap().into_shared()),
        )));
    }
    let id = g.add_node(NodeSpec {
        name: "layer".into(),
        op_type: op.into(),
        domain: String::new(),
        attrs,
        inputs,
        outputs: vec!["y".into()],
    });
    let y = g.node(id).output(0).unwrap();
    g.add_output(y);
    Model::new(g, 17)
}

fn run(model: &Model, x: ArrayD<f32>) -> ArrayD<f32> {
    let s = Session::new(model.clone(), SessionOptions::threads(1)).unwrap();
    s.run(&[("x", Tensor::F32(x.into_shared()))]).unwrap()[0].as_f32().unwrap().to_owned()
}

/// Checks forward against qexec, and weight, bias and input gradients against finite
/// differences of `Σ y·r`.
fn check_layer(model: &Model, x: ArrayD<f32>, w: &[f32], bias: Option<&[f32]>, threads: usize) {
    let g = &model.graph;
    let node = g.node(g.node_id("layer").unwrap());
    let w_shape = g.static_value(node.input(1).unwrap()).unwrap().shape().to_vec();
    let layer = Linear::from_node(node, x.shape(), &w_shape).unwrap().with_threads(threads);
    // The products take the weight as rows (a ConvTranspose's reordered), and give it back.
    let rows = layer.weight_rows(w);
    assert_eq!(layer.weight_from_rows(&rows), w);
    let w = rows.as_slice();
    let cols = layer.columns(x.view()).unwrap();
    let m = cols.width();
    let mut y = vec![0.0f32; layer.out_channels() * m];
    layer.forward(w, bias, &cols, &mut y).unwrap();
    let reference = run(model, x.clone());
    let ours = layer.from_channel_major(&y, &cols);
    assert_eq!(ours.shape(), reference.shape());
    for (a, b) in ours.iter().zip(reference.iter()) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "forward {a} vs interpreter {b}");
    }
    let r = values(y.len(), 99);
    let loss_of = |w: &[f32], b: Option<&[f32]>, cols: &qgrad::Columns| -> f64 {
        let mut y = vec![0.0f32; layer.out_channels() * m];
        layer.forward(w, b, cols, &mut y).unwrap();
        y.iter().zip(&r).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
    };
    let mut dw = vec![0.0f32; w.len()];
    layer.weight_grad(&r, &cols, &mut dw).unwrap();
    let num = numeric_gradient(&mut |v: &[f32]| loss_of(v, bias, &cols), w, 0.25);
    compare(&dw, &num, 2e-3).unwrap();
    if let Some(b) = bias {
        let db = layer.bias_grad(&r, m);
        let num = numeric_gradient(&mut |v: &[f32]| loss_of(w, Some(v), &cols), b, 0.25);
        compare(&db, &num, 2e-3).unwrap();
    }
    // The fused reconstruction pass equals forward, loss and weight gradient taken apart.
    let target = values(y.len(), 7);
    for act in [None, Some(Activation::Clip { min: 0.0, max: 0.5 }), Some(Activation::Tanh)] {
        let mut pre = vec![0.0f32; y.len()];
        layer.forward(w, bias, &cols, &mut pre).unwrap();
        let (mut out, mut grad) = (vec![0.0f32; y.len()], vec![0.0f32; y.len()]);
        let loss = channel_mse_after(act.as_ref(), &pre, &target, m, &mut out, &mut grad);
        let mut dw_ref = vec![0.0f32; w.len()];
        layer.weight_grad(&grad, &cols, &mut dw_ref).unwrap();
        let mut dw = vec![0.0f32; w.len()];
        let fused = layer.reconstruction(w, bias, act.as_ref(), &cols, &target, Some(&mut dw)).unwrap();
        assert!((fused - loss).abs() <= 1e-4 * (1.0 + loss), "fused loss {fused} vs {loss}");
        for (a, b) in dw.iter().zip(&dw_ref) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "fused gradient {a} vs {b}");
        }
    }
    check_gram(&layer, &cols, w, bias);
    let dx = layer.input_grad(w, &r, &cols).unwrap();
    let xs = x.iter().copied().collect::<Vec<_>>();
    let shape = x.shape().to_vec();
    let num = numeric_gradient(
        &mut |v: &[f32]| {
            let xv = ArrayD::from_shape_vec(IxDyn(&shape), v.to_vec()).unwrap();
            loss_of(w, bias, &layer.columns(xv.view()).unwrap())
        },
        &xs,
        0.25,
    );
    compare(dx.as_slice().unwrap(), &num, 2e-3).unwrap();
}

/// The output distances the Gram matrix gives equal those of running both weights (the columns
/// added twice, as two batches), the same on one thread and on two.
fn check_gram(layer: &Linear, cols: &qgrad::Columns, w: &[f32], bias: Option<&[f32]>) {
    let (c, m) = (layer.out_channels(), cols.width());
    let other = values(w.len(), 13);
    let distances = |threads: usize| {
        let layer = layer.clone().with_threads(threads);
        let mut gram = layer.gram();
        layer.add_to_gram(cols, &mut gram).unwrap();
        layer.add_to_gram(cols, &mut gram).unwrap();
        layer.output_distances(&gram, w, &other).unwrap()
    };
    let got = distances(1);
    assert_eq!(got, distances(2), "one thread against two");
    let (mut ya, mut yb) = (vec![0.0f32; c * m], vec![0.0f32; c * m]);
    layer.forward(w, bias, cols, &mut ya).unwrap();
    layer.forward(&other, bias, cols, &mut yb).unwrap();
    for (o, &d) in got.iter().enumerate() {
        let want: f64 = 2.0
            * ya[o * m..(o + 1) * m]
                .iter()
                .zip(&yb[o * m..])
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>();
        assert!((d - want).abs() <= 1e-4 * (1.0 + want), "channel {o}: Gram {d} vs forward {want}");
    }
}

fn ints(name: &str, v: &[i64]) -> (String, Attribute) {
    (name.into(), Attribute::Ints(v.to_vec()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn conv_rules(
        n in 1usize..3, cin_g in 1usize..4, cout_g in 1usize..4, group in 1usize..4,
        h in 1usize..7, w in 1usize..7, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..3, sw in 1usize..3, dh in 1usize..3, dw in 1usize..3,
        pads in proptest::array::uniform4(0usize..3), one_d in any::<bool>(), with_bias in any::<bool>(),
        depthwise in any::<bool>(), threads in 1usize..3, seed in 0u64..1000,
    ) {
        let (cin_g, group) = if depthwise { (1, group + 1) } else { (cin_g, group) };
        let (cin, cout) = (cin_g * group, cout_g * group);
        let (h, kh, sh, dh) = if one_d { (1, 1, 1, 1) } else { (h, kh, sh, dh) };
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let (pt, pb) = if one_d { (0, 0) } else { (pads[0], pads[2]) };
        prop_assume!(h + pt + pb >= span(kh, dh) && w + pads[1] + pads[3] >= span(kw, dw));
        let mut attrs = vec![("group".to_string(), Attribute::Int(group as i64))];
        let (x_shape, w_shape) = if one_d {
            attrs.push(ints("strides", &[sw as i64]));
            attrs.push(ints("dilations", &[dw as i64]));
            attrs.push(ints("pads", &[pads[1] as i64, pads[3] as i64]));
            (vec![n, cin, w], vec![cout, cin_g, kw])
        } else {
            attrs.push(ints("strides", &[sh as i64, sw as i64]));
            attrs.push(ints("dilations", &[dh as i64, dw as i64]));
            attrs.push(ints("pads", &[pt as i64, pads[1] as i64, pb as i64, pads[3] as i64]));
            (vec![n, cin, h, w], vec![cout, cin_g, kh, kw])
        };
        let wn: usize = w_shape.iter().product();
        let wv = values(wn, seed);
        let bias = with_bias.then(|| values(cout, seed + 1));
        let model = one_node("Conv", attrs, &x_shape, ArrayD::from_shape_vec(IxDyn(&w_shape), wv.clone()).unwrap(), bias.clone());
        let xn: usize = x_shape.iter().product();
        let x = ArrayD::from_shape_vec(IxDyn(&x_shape), values(xn, seed + 2)).unwrap();
        check_layer(&model, x, &wv, bias.as_deref(), threads);
    }

    #[test]
    fn conv_transpose_rules(
        n in 1usize..3, cin_g in 1usize..4, cout_g in 1usize..4, group in 1usize..3,
        h in 1usize..5, w in 1usize..5, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..3, sw in 1usize..3, dh in 1usize..3, dw in 1usize..3,
        pads in proptest::array::uniform4(0usize..2), extra in proptest::array::uniform2(0usize..2),
        one_d in any::<bool>(), with_bias in any::<bool>(), seed in 0u64..1000,
    ) {
        let (cin, cout) = (cin_g * group, cout_g * group);
        let (h, kh, sh, dh) = if one_d { (1, 1, 1, 1) } else { (h, kh, sh, dh) };
        // output_padding must stay below the stride or the dilation.
        let (eh, ew) = (extra[0].min(sh.max(dh) - 1), extra[1].min(sw.max(dw) - 1));
        let full = |i: usize, s: usize, d: usize, k: usize, e: usize| (i - 1) * s + d * (k - 1) + 1 + e;
        let (pt, pb) = if one_d { (0, 0) } else { (pads[0], pads[2]) };
        prop_assume!(full(h, sh, dh, kh, eh) > pt + pb && full(w, sw, dw, kw, ew) > pads[1] + pads[3]);
        let mut attrs = vec![("group".to_string(), Attribute::Int(group as i64))];
        let (x_shape, w_shape) = if one_d {
            attrs.push(ints("strides", &[sw as i64]));
            attrs.push(ints("dilations", &[dw as i64]));
            attrs.push(ints("pads", &[pads[1] as i64, pads[3] as i64]));
            attrs.push(ints("output_padding", &[ew as i64]));
            (vec![n, cin, w], vec![cin, cout_g, kw])
        } else {
            attrs.push(ints("strides", &[sh as i64, sw as i64]));
            attrs.push(ints("dilations", &[dh as i64, dw as i64]));
            attrs.push(ints("pads", &[pt as i64, pads[1] as i64, pb as i64, pads[3] as i64]));
            attrs.push(ints("output_padding", &[eh as i64, ew as i64]));
            (vec![n, cin, h, w], vec![cin, cout_g, kh, kw])
        };
        let wn: usize = w_shape.iter().product();
        let wv = values(wn, seed);
        let bias = with_bias.then(|| values(cout, seed + 1));
        let model = one_node("ConvTranspose", attrs, &x_shape, ArrayD::from_shape_vec(IxDyn(&w_shape), wv.clone()).unwrap(), bias.clone());
        let xn: usize = x_shape.iter().product();
        let x = ArrayD::from_shape_vec(IxDyn(&x_shape), values(xn, seed + 2)).unwrap();
        check_layer(&model, x, &wv, bias.as_deref(), 1);
    }

    #[test]
    fn dense_rules(rows in 1usize..6, k in 1usize..7, out in 1usize..7, matmul in any::<bool>(), trans_b in any::<bool>(), seed in 0u64..1000) {
        let (op, trans_b) = if matmul { ("MatMul", false) } else { ("Gemm", trans_b) };
        let w_shape = if trans_b { vec![out, k] } else { vec![k, out] };
        let wv = values(k * out, seed);
        let attrs = if matmul { vec![] } else { vec![("transB".to_string(), Attribute::Int(i64::from(trans_b)))] };
        let bias = (!matmul).then(|| values(out, seed + 1));
        let x_shape = if matmul { vec![2, rows, k] } else { vec![rows, k] };
        let model = one_node(op, attrs, &x_shape, ArrayD::from_shape_vec(IxDyn(&w_shape), wv.clone()).unwrap(), bias.clone());
        let xn: usize = x_shape.iter().product();
        let x = ArrayD::from_shape_vec(IxDyn(&x_shape), values(xn, seed + 2)).unwrap();
        check_layer(&model, x, &wv, bias.as_deref(), 1);
    }

    #[test]
    fn activation_rules(which in 0usize..9, channels in 1usize..4, m in 1usize..6, seed in 0u64..1000) {
        let act = match which {
            0 => Activation::Relu,
            1 => Activation::Clip { min: -0.3, max: 0.4 },
            2 => Activation::LeakyRelu { alpha: 0.1 },
            3 => Activation::PRelu { slope: values(channels, seed + 5) },
            4 => Activation::Sigmoid,
            5 => Activation::Tanh,
            6 => Activation::HardSigmoid { alpha: 0.7, beta: 0.5 },
            7 => Activation::HardSwish,
            _ => Activation::Softmax,
        };
        // Inputs kept away from the kinks, where finite differences straddle two pieces.
        let kinks = [0.0f32, -0.3, 0.4, -3.0, 3.0, -0.5 / 0.7, 0.5 / 0.7];
        let pre: Vec<f32> = values(channels * m, seed).iter().map(|v| v * 4.0).map(|v| {
            if kinks.iter().any(|k| (v - k).abs() < 0.02) { v + 0.05 } else { v }
        }).collect();
        let r = values(pre.len(), seed + 9);
        let loss = |p: &[f32]| -> f64 {
            let mut out = vec![0.0f32; p.len()];
            act.forward(p, &mut out, m);
            out.iter().zip(&r).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
        };
        let mut out = vec![0.0f32; pre.len()];
        act.forward(&pre, &mut out, m);
        let mut grad = r.clone();
        act.backward(&pre, &out, &mut grad, m);
        let num = numeric_gradient(&mut |p: &[f32]| loss(p), &pre, 1e-3);
        compare(&grad, &num, 5e-3).unwrap();
    }

    #[test]
    fn fused_loss_matches_activation_then_loss(which in 0usize..4, channels in 1usize..4, m in 1usize..40, seed in 0u64..1000) {
        let act = match which {
            0 => None,
            1 => Some(Activation::Relu),
            2 => Some(Activation::Clip { min: 0.0, max: 0.5 }),
            _ => Some(Activation::Tanh),
        };
        let pre = values(channels * m, seed);
        let target = values(channels * m, seed + 1);
        let (mut out, mut grad) = (vec![0.0f32; pre.len()], vec![0.0f32; pre.len()]);
        let loss = channel_mse_after(act.as_ref(), &pre, &target, m, &mut out, &mut grad);
        let mut out2 = pre.clone();
        if let Some(a) = &act {
            a.forward(&pre, &mut out2, m);
        }
        let mut grad2 = vec![0.0f32; pre.len()];
        let loss2 = channel_mse(&out2, &target, m, &mut grad2);
        if let Some(a) = &act {
            a.backward(&pre, &out2, &mut grad2, m);
        }
        prop_assert!((loss - loss2).abs() <= 1e-5 * (1.0 + loss2.abs()));
        prop_assert_eq!(out, out2);
        for (a, b) in grad.iter().zip(&grad2) {
            prop_assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()));
        }
    }

    #[test]
    fn channel_mse_rule(len in 1usize..40, m in 1usize..8, seed in 0u64..1000) {
        let out = values(len, seed);
        let target = values(len, seed + 1);
        let mut grad = vec![0.0f32; len];
        channel_mse(&out, &target, m, &mut grad);
        let mut scratch = vec![0.0f32; len];
        let num = numeric_gradient(&mut |o: &[f32]| channel_mse(o, &target, m, &mut scratch), &out, 1e-2);
        compare(&grad, &num, 1e-3).unwrap();
    }
}

/// The fused pass over many blocks on two threads (regular and depthwise convolutions, strides
/// 1 and 2) against the pass taken apart.
#[test]
fn fused_reconstruction_and_gram_over_many_blocks_and_threads() {
    for (cin, cout, group, stride) in [(3, 8, 1, 2), (16, 16, 16, 1), (16, 32, 16, 2), (8, 8, 2, 1)] {
        let x_shape = [16, cin, 24, 24];
        let w_shape = [cout, cin / group, 3, 3];
        let attrs = vec![
            ("group".to_string(), Attribute::Int(group as i64)),
            ints("pads", &[1, 1, 1, 1]),
            ints("strides", &[stride, stride]),
        ];
        let wn: usize = w_shape.iter().product();
        let wv = values(wn, 3);
        let bias = values(cout, 4);
        let model = one_node(
            "Conv",
            attrs,
            &x_shape,
            ArrayD::from_shape_vec(IxDyn(&w_shape), wv.clone()).unwrap(),
            Some(bias.clone()),
        );
        let g = &model.graph;
        let node = g.node(g.node_id("layer").unwrap());
        let xn: usize = x_shape.iter().product();
        let x = ArrayD::from_shape_vec(IxDyn(&x_shape), values(xn, 5)).unwrap();
        let layer = Linear::from_node(node, &x_shape, &w_shape).unwrap().with_threads(2);
        let cols = layer.columns(x.view()).unwrap();
        let m = cols.width();
        let len = cout * m;
        let target = values(len, 6);
        let act = Some(Activation::Clip { min: 0.0, max: 0.6 });
        let mut pre = vec![0.0f32; len];
        layer.forward(&wv, Some(&bias), &cols, &mut pre).unwrap();
        let (mut out, mut grad) = (vec![0.0f32; len], vec![0.0f32; len]);
        let loss = channel_mse_after(act.as_ref(), &pre, &target, m, &mut out, &mut grad);
        let mut dw_ref = vec![0.0f32; wn];
        layer.weight_grad(&grad, &cols, &mut dw_ref).unwrap();
        let mut dw = vec![0.0f32; wn];
        let fused =
            layer.reconstruction(&wv, Some(&bias), act.as_ref(), &cols, &target, Some(&mut dw)).unwrap();
        assert!((fused - loss).abs() <= 1e-4 * (1.0 + loss), "fused loss {fused} vs {loss}");
        for (a, b) in dw.iter().zip(&dw_ref) {
            assert!(
                (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                "fused gradient {a} vs {b} ({cin}->{cout}/{group})"
            );
        }
        check_gram(&layer, &cols, &wv, Some(&bias));
    }
}
