//! The post-training techniques on generated models: equalization keeps the float function
//! (through ReLU6 made per-channel, a depthwise triple, a pooled Gemm head) and equal ranges,
//! the placement sees the per-channel clip as the Clip it replaces, high-bias absorption moves
//! `β − 3|γ|`, bias correction adds `(W − Q(W))·E[x]` (empirical and analytical), and BN
//! re-estimation measures the simulated input's moments before folding.

use ndarray::{ArrayD, Axis, IxDyn};
use qcalib::{Feeds, QuantSim, QuantsimConfig, SimOptions};
use qexec::{Session, SessionOptions};
use qgraph::{Attribute, DType, Graph, Model, Shape, Tensor, ValueId};
use qptq::{BiasCorrectionKind, EqualizeOptions, correct_bias, equalize, reestimate_batch_norms};

/// A deterministic pseudo-random f32 in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// A tensor whose slices along axis 0 span very different ranges.
    fn tensor(&mut self, shape: &[usize], spread: bool) -> Tensor {
        let n: usize = shape.iter().product();
        let per = n / shape[0];
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let k = if spread { 0.05 + (i / per % 7) as f32 * 0.9 } else { 1.0 };
                self.next() * k
            })
            .collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap().into_shared())
    }
}

fn scalar(x: f32) -> Tensor {
    Tensor::F32(ArrayD::from_elem(IxDyn(&[]), x).into_shared())
}

fn run(m: &Model, x: &Tensor) -> ArrayD<f32> {
    let s = Session::new(m.clone(), SessionOptions::threads(1)).unwrap();
    s.run(&[("x", x.clone())]).unwrap()[0].as_f32().unwrap().to_owned()
}

/// x[1,3,8,8] → Conv 3→8 (pad 1) → Clip(0,6) → depthwise Conv 8 (pad 1) → Clip(0,6) → Conv 8→4
/// → Relu → GlobalAveragePool → Flatten → Gemm 4→5.
fn mobile_block(seed: u64) -> Model {
    let mut r = Lcg(seed);
    let mut g = Graph::new("block");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 3, 8, 8]));
    let (lo, hi) = (g.add_initializer("zero", scalar(0.0)), g.add_initializer("six", scalar(6.0)));
    let pads = || ("pads", Attribute::Ints(vec![1, 1, 1, 1]));
    let w1 = g.add_initializer("w1", r.tensor(&[8, 3, 3, 3], true));
    let b1 = g.add_initializer("b1", r.tensor(&[8], false));
    let c1 = g.add_op("Conv", "conv1", &[x, w1, b1], vec![pads()]);
    let a1 = g.add_op("Clip", "relu6_1", &[c1, lo, hi], vec![]);
    let w2 = g.add_initializer("w2", r.tensor(&[8, 1, 3, 3], true));
    let b2 = g.add_initializer("b2", r.tensor(&[8], false));
    let c2 = g.add_op("Conv", "dw", &[a1, w2, b2], vec![pads(), ("group", Attribute::Int(8))]);
    let a2 = g.add_op("Clip", "relu6_2", &[c2, lo, hi], vec![]);
    let w3 = g.add_initializer("w3", r.tensor(&[4, 8, 1, 1], true));
    let c3 = g.add_op("Conv", "conv3", &[a2, w3], vec![]);
    let a3 = g.add_op("Relu", "relu3", &[c3], vec![]);
    let p = g.add_op("GlobalAveragePool", "gap", &[a3], vec![]);
    let f = g.add_op("Flatten", "flatten", &[p], vec![]);
    let w4 = g.add_initializer("w4", r.tensor(&[5, 4], true));
    let b4 = g.add_initializer("b4", r.tensor(&[5], false));
    let y = g.add_op("Gemm", "fc", &[f, w4, b4], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    Model::new(g, 13)
}

fn input(seed: u64, shape: &[usize]) -> Tensor {
    let mut r = Lcg(seed);
    let n: usize = shape.iter().product();
    let v = (0..n).map(|_| r.next() * 3.0).collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap().into_shared())
}

fn weight(m: &Model, node: &str) -> ArrayD<f32> {
    let g = &m.graph;
    let n = g.node(g.node_id(node).unwrap());
    g.static_value(n.input(1).unwrap()).unwrap().as_f32().unwrap().to_owned()
}

fn abs_max(w: &ArrayD<f32>, axis: usize) -> Vec<f32> {
    w.axis_iter(Axis(axis)).map(|l| l.iter().fold(0.0f32, |m, x| m.max(x.abs()))).collect()
}

#[test]
fn equalization_keeps_the_function_and_equalizes_ranges() {
    let original = mobile_block(7);
    let mut m = original.clone();
    let report = equalize(&mut m, EqualizeOptions::default()).unwrap();
    // conv1 → dw → conv3 (a triple), then conv3 → fc through Relu, pool and Flatten.
    let shapes: Vec<Vec<String>> = report.sets.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(shapes, vec![vec!["conv1", "dw", "conv3"], vec!["conv3", "fc"]]);
    assert_eq!(report.clips_rewritten, vec!["relu6_1", "relu6_2"]);
    assert!(m.graph.nodes().all(|(_, n)| n.op_type != "Clip"));
    for seed in 0..4 {
        let x = input(100 + seed, &[1, 3, 8, 8]);
        let (a, b) = (run(&original, &x), run(&m, &x));
        let largest = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = (&a - &b).iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(diff <= 1e-5 * largest.max(1.0), "outputs moved by {diff} (largest {largest})");
    }
    // The last pair is equalized: conv3's output ranges equal fc's input ranges.
    let (r3, r4) = (abs_max(&weight(&m, "conv3"), 0), abs_max(&weight(&m, "fc"), 1));
    for (a, b) in r3.iter().zip(&r4) {
        assert!((a - b).abs() <= 1e-5 * a.max(*b), "{a} vs {b}");
    }
}

#[test]
fn the_per_channel_clip_is_quantized_as_the_clip_it_replaces() {
    let original = mobile_block(11);
    let mut m = original.clone();
    equalize(&mut m, EqualizeOptions::default()).unwrap();
    for preset in ["default", "default_per_tensor", "htp_v73"] {
        let config = QuantsimConfig::load(preset).unwrap();
        let count = |m: &Model| {
            let sim = QuantSim::new(m.clone(), config.clone(), SimOptions::default()).unwrap();
            let p = sim.placement();
            let names: Vec<String> = p
                .tensors()
                .iter()
                .filter(|t| {
                    let activation =
                        matches!(t.role, qcalib::TensorRole::Output { .. } | qcalib::TensorRole::GraphInput);
                    activation && p.quantizer(t.quantizer).enabled
                })
                .map(|t| sim.model().graph.value(t.value).name.clone())
                .collect();
            names
        };
        let (before, after) = (count(&original), count(&m));
        // The Clip's scalar bounds (constants) are gone; every activation quantizer stays.
        assert_eq!(before, after, "{preset}: enabled activation quantizers differ");
    }
}

/// x[1,2,4,4] → Conv 2→2 (1×1) → BatchNormalization(γ, β) → Relu → Conv 2→3 (1×1).
fn bn_relu_block(gamma: [f32; 2], beta: [f32; 2]) -> Model {
    let mut g = Graph::new("bn");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 2, 4, 4]));
    let w1 = g.add_initializer("w1", t(&[2, 2, 1, 1], &[0.01, 0.002, -0.003, 0.02]));
    let c1 = g.add_op("Conv", "conv1", &[x, w1], vec![]);
    let (gm, bt) = (g.add_initializer("gamma", t(&[2], &gamma)), g.add_initializer("beta", t(&[2], &beta)));
    let (mu, var) =
        (g.add_initializer("mean", t(&[2], &[0.0, 0.0])), g.add_initializer("var", t(&[2], &[1.0, 1.0])));
    let b = g.add_op(
        "BatchNormalization",
        "bn",
        &[c1, gm, bt, mu, var],
        vec![("epsilon", Attribute::Float(0.0))],
    );
    let r = g.add_op("Relu", "relu", &[b], vec![]);
    let w2 = g.add_initializer("w2", t(&[3, 2, 1, 1], &[0.5, -0.25, 1.0, 0.75, -0.5, 0.125]));
    let b2 = g.add_initializer("b2", t(&[3], &[0.1, 0.2, 0.3]));
    let y = g.add_op("Conv", "conv2", &[r, w2, b2], vec![]);
    g.add_output(y);
    Model::new(g, 13)
}

fn t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap().into_shared())
}

fn bias(m: &Model, node: &str) -> Vec<f32> {
    let g = &m.graph;
    let n = g.node(g.node_id(node).unwrap());
    g.static_value(n.input(2).unwrap()).unwrap().as_f32().unwrap().iter().copied().collect()
}

#[test]
fn high_biases_move_into_the_next_layer() {
    // β = 10, γ = 0.5: the ReLU always passes, c = β − 3|γ| = 8.5 moves (scaled by the CLE factor).
    let original = bn_relu_block([0.5, 1.0], [10.0, 1.0]);
    let mut m = original.clone();
    let report = equalize(&mut m, EqualizeOptions::default()).unwrap();
    assert_eq!(report.bn_folded.len(), 1);
    assert_eq!(report.high_bias.len(), 1, "{report:?}");
    let s = &report.sets[0].scales[0];
    let h = &report.high_bias[0];
    assert_eq!(h.channels, 1, "channel 1 (β − 3γ < 0) keeps its bias");
    assert!((h.max_shift - 8.5 / s[0]).abs() < 1e-4, "{} vs {}", h.max_shift, 8.5 / s[0]);
    // conv1's bias for channel 0 is (10 − 8.5)/s; the function is unchanged where the ReLU passes.
    assert!((bias(&m, "conv1")[0] - 1.5 / s[0]).abs() < 1e-4);
    let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[1, 2, 4, 4]), 1.0).into_shared());
    let (a, b) = (run(&original, &x), run(&m, &x));
    assert!((&a - &b).iter().all(|d| d.abs() < 1e-4), "{a:?} vs {b:?}");
}

fn constant_batches(x: &Tensor, n: usize) -> Vec<Feeds> {
    (0..n).map(|_| vec![("x".to_string(), x.clone())]).collect()
}

/// x[N,2] → Gemm (W 3×2, transB) + b.
fn gemm_model(w: &[f32]) -> Model {
    let mut g = Graph::new("gemm");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 2]));
    let wv = g.add_initializer("w", t(&[3, 2], w));
    let b = g.add_initializer("b", t(&[3], &[0.5, -0.5, 0.0]));
    let y = g.add_op("Gemm", "fc", &[x, wv, b], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    Model::new(g, 13)
}

fn quantized_weight(m: &Model, config: &QuantsimConfig, name: &str) -> ArrayD<f32> {
    let mut sim = QuantSim::new(m.clone(), config.clone(), SimOptions::default()).unwrap();
    let q = sim.weight_quantized_model().unwrap();
    let v: ValueId = q.graph.value_id(name).unwrap();
    q.graph.static_value(v).unwrap().as_f32().unwrap().to_owned()
}

#[test]
fn empirical_bias_correction_adds_the_weight_error_times_the_input_mean() {
    let w = [0.1234, -0.9876, 0.3333, 0.0101, -0.7777, 0.5555];
    let original = gemm_model(&w);
    let config = QuantsimConfig::load("default_per_tensor").unwrap();
    let qw = quantized_weight(&original, &config, "w");
    // Two batches whose mean input is [1, 2].
    let batches = vec![
        vec![("x".to_string(), t(&[2, 2], &[0.0, 1.0, 2.0, 3.0]))],
        vec![("x".to_string(), t(&[2, 2], &[1.0, 2.0, 1.0, 2.0]))],
    ];
    let mut m = original.clone();
    let report =
        correct_bias(&mut m, &config, SimOptions::default(), &batches, BiasCorrectionKind::Empirical)
            .unwrap();
    assert_eq!(report.corrected.len(), 1);
    let b = bias(&m, "fc");
    for (o, base) in [0.5f32, -0.5, 0.0].iter().enumerate() {
        let shift = (w[2 * o] - qw[[o, 0]]) * 1.0 + (w[2 * o + 1] - qw[[o, 1]]) * 2.0;
        assert!((b[o] - (base + shift)).abs() < 1e-6, "channel {o}: {} vs {}", b[o], base + shift);
    }
}

#[test]
fn analytical_bias_correction_uses_the_relu_of_the_bn_distribution() {
    let original = bn_relu_block([1.0, 2.0], [0.5, -1.0]);
    let config = QuantsimConfig::load("default_per_tensor").unwrap();
    let qw = quantized_weight(&original, &config, "w2");
    let w2 = weight(&original, "conv2");
    let mut m = original.clone();
    let report = correct_bias(&mut m, &config, SimOptions::default(), &[], BiasCorrectionKind::Analytical);
    // conv1 has no BN before it: it needs data, and none was given.
    assert!(report.is_err());
    let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[1, 2, 4, 4]), 1.0).into_shared());
    let report = correct_bias(
        &mut m,
        &config,
        SimOptions::default(),
        &constant_batches(&x, 1),
        BiasCorrectionKind::Analytical,
    )
    .unwrap();
    let methods: Vec<(&str, &str)> = report.corrected.iter().map(|c| (c.layer.as_str(), c.method)).collect();
    assert_eq!(methods, vec![("conv1", "empirical"), ("conv2", "analytical")]);
    // E[relu(N(μ, σ²))] = μ·Φ(μ/σ) + σ·φ(μ/σ), for (μ, σ) = (0.5, 1) and (−1, 2).
    let phi = |z: f64| (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let big_phi = |z: f64| 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
    let mean = |mu: f64, s: f64| mu * big_phi(mu / s) + s * phi(mu / s);
    let e = [mean(0.5, 1.0), mean(-1.0, 2.0)];
    let b = bias(&m, "conv2");
    for (o, base) in [0.1f64, 0.2, 0.3].iter().enumerate() {
        let shift: f64 = (0..2).map(|c| f64::from(w2[[o, c, 0, 0]] - qw[[o, c, 0, 0]]) * e[c]).sum();
        assert!((f64::from(b[o]) - (base + shift)).abs() < 1e-5, "channel {o}: {} vs {}", b[o], base + shift);
    }
}

/// erf by its series (enough terms for |z| < 3).
fn erf(z: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = z;
    for n in 0..60 {
        sum += term / f64::from(2 * n + 1);
        term *= -z * z / f64::from(n + 1);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn bn_reestimation_measures_the_simulated_input_then_folds() {
    // x[N,2,1,1] → Conv (identity 1×1) → BN(mean 0, var 1) → y. Channel 0 holds 0 and 3 in
    // equal numbers (mean 1.5, variance 2.25), channel 1 holds 1 and 3 (mean 2, variance 1) —
    // all on the int8 grid of [0, 3], so the simulated input is the data itself.
    let mut g = Graph::new("bn");
    let x = g.add_input("x", DType::F32, Shape::known(&[4, 2, 1, 1]));
    let w = g.add_initializer("w", t(&[2, 2, 1, 1], &[1.0, 0.0, 0.0, 1.0]));
    let c = g.add_op("Conv", "conv", &[x, w], vec![]);
    let (gm, bt) =
        (g.add_initializer("gamma", t(&[2], &[1.0, 1.0])), g.add_initializer("beta", t(&[2], &[0.0, 0.0])));
    let (mu, var) =
        (g.add_initializer("mean", t(&[2], &[0.0, 0.0])), g.add_initializer("var", t(&[2], &[1.0, 1.0])));
    let y =
        g.add_op("BatchNormalization", "bn", &[c, gm, bt, mu, var], vec![("epsilon", Attribute::Float(0.0))]);
    g.add_output(y);
    let mut m = Model::new(g, 13);
    let data = t(&[4, 2, 1, 1], &[0.0, 1.0, 3.0, 3.0, 0.0, 1.0, 3.0, 3.0]);
    let config = QuantsimConfig::load("default_per_tensor").unwrap();
    let report =
        reestimate_batch_norms(&mut m, &config, SimOptions::default(), &constant_batches(&data, 2)).unwrap();
    assert_eq!(report.reestimated.len(), 1);
    assert_eq!(report.folded.len(), 1);
    assert!((report.reestimated[0].max_mean_change - 2.0).abs() < 1e-5);
    // Folded: channel 0 becomes (x − 1.5)/1.5, channel 1 x − 2.
    assert!(m.graph.nodes().all(|(_, n)| n.op_type != "BatchNormalization"));
    let wf = weight(&m, "conv");
    let bf = bias(&m, "conv");
    assert!((wf[[0, 0, 0, 0]] - 1.0 / 1.5).abs() < 1e-5 && (bf[0] + 1.0).abs() < 1e-5, "{wf:?} {bf:?}");
    assert!((wf[[1, 1, 0, 0]] - 1.0).abs() < 1e-5 && (bf[1] + 2.0).abs() < 1e-5, "{wf:?} {bf:?}");
}

/// The integers of `node`'s weight on its quantizer's per-channel grid in `sim`.
fn weight_integers(sim: &QuantSim, node: &str) -> Vec<i64> {
    let g = &sim.model().graph;
    let v = g.node(g.node_id(node).unwrap()).input(1).unwrap();
    let p = sim.placement();
    let encodings = p.quantizer(p.quantizer_of(v).unwrap()).encodings.clone().unwrap();
    let w = g.static_value(v).unwrap().as_f32().unwrap().to_owned();
    let per = w.len() / encodings.len();
    w.iter().enumerate().map(|(i, &x)| (f64::from(x) / encodings[i / per].delta).round() as i64).collect()
}

#[test]
fn a_trained_simulation_folds_its_batch_norms_to_scale_and_keeps_its_encodings() {
    // x[1,3,8,8] → Conv 3→4 → BN (γ of both signs, stale statistics) → Relu → y, W8A8 per channel.
    let mut r = Lcg(7);
    let mut g = Graph::new("conv_bn");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 3, 8, 8]));
    let w = g.add_initializer("w", r.tensor(&[4, 3, 3, 3], true));
    let c = g.add_op("Conv", "conv", &[x, w], vec![]);
    let bn_inputs = [
        g.add_initializer("gamma", t(&[4], &[1.5, -0.5, 2.0, 0.25])),
        g.add_initializer("beta", t(&[4], &[0.1, 0.2, -0.3, 0.0])),
        g.add_initializer("mean", t(&[4], &[0.5, -0.5, 0.0, 1.0])),
        g.add_initializer("var", t(&[4], &[4.0, 0.5, 1.0, 2.0])),
    ];
    let b = g.add_op(
        "BatchNormalization",
        "bn",
        &[c, bn_inputs[0], bn_inputs[1], bn_inputs[2], bn_inputs[3]],
        vec![],
    );
    let y = g.add_op("Relu", "relu", &[b], vec![]);
    g.add_output(y);
    let model = Model::new(g, 13);
    let batches = block_batches(4);
    let mut sim =
        QuantSim::new(model, QuantsimConfig::load("default").unwrap(), SimOptions::default()).unwrap();
    sim.calibrate(batches.iter().cloned(), &mut |_| {}).unwrap();
    let output = sim.model().graph.outputs()[0];
    let output_name = sim.model().graph.value(output).name.clone();
    let learned = {
        let p = sim.placement_mut();
        let q = p.quantizer_of(output).unwrap();
        let e = p.quantizer(q).encodings.clone().unwrap();
        // As range learning leaves it: not what calibration would compute again.
        let moved: Vec<_> = e
            .iter()
            .map(|e| qkernels::Encoding::from_scale_offset(e.delta * 1.25, e.offset, e.bitwidth, e.steps))
            .collect();
        p.quantizer_mut(q).encodings = Some(moved.clone());
        moved
    };
    sim.refresh().unwrap();
    let before = weight_integers(&sim, "conv");
    let report = qptq::fold_batch_norms_of_simulation(&mut sim, &batches).unwrap();
    assert_eq!(report.reestimated.len(), 1);
    assert_eq!(report.folded, vec![("bn".to_string(), "conv".to_string())]);
    let g = &sim.model().graph;
    assert!(g.nodes().all(|(_, n)| n.op_type != "BatchNormalization"));
    // Each weight keeps its integer, negated where γ is negative (channel 1).
    let signed: Vec<i64> =
        before.iter().enumerate().map(|(i, &q)| if i / 27 == 1 { -q } else { q }).collect();
    assert_eq!(weight_integers(&sim, "conv"), signed);
    let p = sim.placement();
    let v = g.value_id(&output_name).unwrap();
    assert_eq!(p.quantizer(p.quantizer_of(v).unwrap()).encodings.as_ref(), Some(&learned));
    assert!(!p.quantizer(p.quantizer_of(v).unwrap()).frozen);
    let out = sim.run(&[("x", batches[0][0].1.clone())]).unwrap();
    assert!(out[0].as_f32().unwrap().iter().all(|v| v.is_finite()));
}

/// Batches of one random sample each for `mobile_block`.
fn block_batches(n: usize) -> Vec<Feeds> {
    (0..n).map(|i| vec![("x".to_string(), input(100 + i as u64, &[1, 3, 8, 8]))]).collect()
}

fn w4(config: &str) -> (QuantsimConfig, SimOptions) {
    let options = SimOptions {
        precision: qcalib::DefaultPrecision {
            param: qcalib::Precision::Int(4),
            activation: qcalib::Precision::Int(8),
        },
        ..SimOptions::default()
    };
    (QuantsimConfig::load(config).unwrap(), options)
}

/// A simulation of `model` with `frozen` weight encodings, calibrated on `batches`.
fn calibrated(
    model: &Model,
    config: &QuantsimConfig,
    options: SimOptions,
    frozen: &std::collections::HashMap<String, qcalib::LoadedEncoding>,
    batches: &[Feeds],
) -> QuantSim {
    let mut sim = QuantSim::new(model.clone(), config.clone(), options).unwrap();
    assert_eq!(qcalib::freeze_encodings(&mut sim, frozen), frozen.len());
    sim.calibrate(batches.iter().cloned(), &mut |_| {}).unwrap();
    sim
}

#[test]
fn adaround_learns_a_rounding_that_beats_nearest() {
    let model = mobile_block(7);
    let batches = block_batches(24);
    let (config, options) = w4("default_per_tensor");
    let settings = qptq::AdaroundOptions { iterations: 3000, ..Default::default() };
    let r = qptq::adaround(&model, &config, options, &batches, &settings, &mut |_, _| {}).unwrap();
    assert_eq!(r.report.layers.len(), 4, "{:?}", r.report);
    let total = |f: fn(&qptq::RoundedLayer) -> f64| r.report.layers.iter().map(f).sum::<f64>();
    assert!(total(|l| l.loss_adaround) < total(|l| l.loss_nearest), "{:?}", r.report);
    assert!(r.report.layers.iter().all(|l| l.flipped > 0), "{:?}", r.report);
    // The rounded weights lie on their grids: fake-quant with the frozen encodings keeps them.
    for (name, l) in &r.encodings {
        let v = r.model.graph.value_id(name).unwrap();
        let mut w: Vec<f32> =
            r.model.graph.static_value(v).unwrap().as_f32().unwrap().iter().copied().collect();
        let before = w.clone();
        qkernels::fake_quant(&mut w, &l.encodings[0]);
        assert_eq!(w, before, "{name}");
    }
    // With float activations the whole model is closer to FP32 than with nearest rounding.
    let nearest =
        QuantSim::new(model.clone(), config.clone(), options).unwrap().weight_quantized_model().unwrap();
    let error = |m: &Model| -> f64 {
        let err = |b: &Feeds| {
            let (a, f) = (run(m, &b[0].1), run(&model, &b[0].1));
            a.iter().zip(f.iter()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>()
        };
        batches.iter().map(err).sum()
    };
    let (e_ada, e_near) = (error(&r.model), error(&nearest));
    assert!(e_ada < e_near, "AdaRound {e_ada} vs nearest {e_near}");
    // The simulation keeps the frozen encodings through calibration.
    let sim = calibrated(&r.model, &config, options, &r.encodings, &batches);
    for (name, l) in &r.encodings {
        let v = sim.model().graph.value_id(name).unwrap();
        let q = sim.placement().quantizer(sim.placement().quantizer_of(v).unwrap());
        assert_eq!(q.encodings.as_deref(), Some(&l.encodings[..]), "{name}");
    }
}

/// x[1,4,4,4] → Conv 4→6 (3×3, pad 1) → Relu → ConvTranspose 6→3 (3×3, stride 2, pad 1,
/// output_padding 1) → y[1,3,8,8]: a decoder's upsampling step.
fn upsampling_block(seed: u64) -> Model {
    let mut r = Lcg(seed);
    let mut g = Graph::new("up");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 4, 4, 4]));
    let w1 = g.add_initializer("w1", r.tensor(&[6, 4, 3, 3], true));
    let c = g.add_op("Conv", "conv", &[x, w1], vec![("pads", Attribute::Ints(vec![1, 1, 1, 1]))]);
    let a = g.add_op("Relu", "relu", &[c], vec![]);
    let w2 = g.add_initializer("w2", r.tensor(&[6, 3, 3, 3], false));
    let b2 = g.add_initializer("b2", r.tensor(&[3], false));
    let attrs = vec![
        ("strides", Attribute::Ints(vec![2, 2])),
        ("pads", Attribute::Ints(vec![1, 1, 1, 1])),
        ("output_padding", Attribute::Ints(vec![1, 1])),
    ];
    let y = g.add_op("ConvTranspose", "up", &[a, w2, b2], attrs);
    g.add_output(y);
    Model::new(g, 13)
}

#[test]
fn adaround_and_seq_mse_round_conv_transpose_weights_per_channel() {
    let model = upsampling_block(5);
    let batches: Vec<Feeds> =
        (0..8).map(|i| vec![("x".to_string(), input(300 + i as u64, &[1, 4, 4, 4]))]).collect();
    let (config, options) = w4("default");
    let settings = qptq::AdaroundOptions { iterations: 2000, ..Default::default() };
    let r = qptq::adaround(&model, &config, options, &batches, &settings, &mut |_, _| {}).unwrap();
    let up = r.report.layers.iter().find(|l| l.layer == "up").unwrap_or_else(|| panic!("{:?}", r.report));
    assert!(up.loss_adaround < up.loss_nearest && up.flipped > 0, "{up:?}");
    // Per channel along axis 1 (the output channels of `[C_in, C_out, k, k]`): every rounded
    // weight lies on its channel's grid.
    let l = &r.encodings["w2"];
    assert_eq!(l.encodings.len(), 3);
    let w = r
        .model
        .graph
        .static_value(r.model.graph.value_id("w2").unwrap())
        .unwrap()
        .as_f32()
        .unwrap()
        .to_owned();
    for ((_, o, _, _), &x) in w.indexed_iter().map(|(i, x)| ((i[0], i[1], i[2], i[3]), x)) {
        let mut v = [x];
        qkernels::fake_quant(&mut v, &l.encodings[o]);
        assert_eq!(v[0], x, "channel {o}");
    }
    let s =
        qptq::seq_mse(&model, &config, options, &batches, &qptq::SeqMseOptions::default(), &mut |_, _| {})
            .unwrap();
    let up = s.report.layers.iter().find(|l| l.layer == "up").unwrap_or_else(|| panic!("{:?}", s.report));
    assert!(up.error_chosen <= up.error_min_max * (1.0 + 1e-6), "{up:?}");
}

#[test]
fn seq_mse_keeps_its_picks_and_per_channel_picks_are_no_worse() {
    let model = mobile_block(11);
    let batches = block_batches(4);
    for name in ["default", "default_per_tensor"] {
        let (config, options) = w4(name);
        let r = qptq::seq_mse(
            &model,
            &config,
            options,
            &batches,
            &qptq::SeqMseOptions::default(),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(r.report.layers.len(), 4, "{:?}", r.report);
        for l in &r.report.layers {
            assert!(l.picked.0 >= 1 && l.picked.1 <= 20);
            // Each channel's own pick is never worse than min-max; a per-tensor encoding is
            // rebuilt from all channels' picks (AIMET's rule), which can be.
            if name == "default" {
                assert!(l.error_chosen <= l.error_min_max * (1.0 + 1e-6), "{l:?}");
            }
        }
        let sim = calibrated(&model, &config, options, &r.encodings, &batches);
        for (name, l) in &r.encodings {
            let v = sim.model().graph.value_id(name).unwrap();
            let q = sim.placement().quantizer(sim.placement().quantizer_of(v).unwrap());
            assert_eq!(q.encodings.as_deref(), Some(&l.encodings[..]), "{name} kept its chosen encodings");
        }
    }
}
