//! Session behaviour: the hook sees (and may rewrite) every produced tensor, fusion steps aside
//! for observed tensors, resume recomputes only what changed and equals a full run, results do
//! not depend on the thread count, a batch runs sample by sample with the same values, memory is
//! released, and bad inputs give errors that name the
//! culprit.

mod common;

use common::{f32t, ints};
use qexec::{ExecError, Keep, RunOptions, Session, SessionOptions, TensorEvent, TensorKind, ValueCache};
use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor, ValueId};

fn add_node(
    g: &mut Graph,
    op: &str,
    name: &str,
    inputs: &[ValueId],
    attrs: Vec<(&str, Attribute)>,
) -> ValueId {
    let id = g.add_node(NodeSpec {
        name: name.into(),
        op_type: op.into(),
        domain: String::new(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        inputs: inputs.iter().map(|&v| Some(v)).collect(),
        outputs: vec![format!("{name}_out")],
    });
    g.node(id).outputs()[0].unwrap()
}

/// x[N,2,6,6] → Conv(2→4, 3×3, pad 1) → Relu → Conv(4→4 depthwise) → Clip(0,6) → Add(relu) →
/// GlobalAveragePool → Flatten → Gemm(4→3).
fn small_cnn() -> Model {
    let mut g = Graph::new("cnn");
    let x = g.add_input(
        "x",
        DType::F32,
        Shape(vec![
            qgraph::Dim::Symbol("N".into()),
            qgraph::Dim::Known(2),
            qgraph::Dim::Known(6),
            qgraph::Dim::Known(6),
        ]),
    );
    let w1 = g.add_initializer(
        "w1",
        f32t(&[4, 2, 3, 3], (0..72).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect()),
    );
    let b1 = g.add_initializer("b1", f32t(&[4], vec![0.1, -0.2, 0.3, 0.0]));
    let w2 = g.add_initializer(
        "w2",
        f32t(&[4, 1, 3, 3], (0..36).map(|i| ((i * 5) % 7) as f32 * 0.2 - 0.6).collect()),
    );
    let lo = g.add_initializer("lo", Tensor::scalar(0.0f32));
    let hi = g.add_initializer("hi", Tensor::scalar(6.0f32));
    let wf = g.add_initializer("wf", f32t(&[3, 4], (0..12).map(|i| i as f32 * 0.1 - 0.6).collect()));
    let conv = |g: &mut Graph, name: &str, inputs: &[ValueId], group: i64| {
        add_node(
            g,
            "Conv",
            name,
            inputs,
            vec![("pads", ints(&[1, 1, 1, 1])), ("group", Attribute::Int(group))],
        )
    };
    let c1 = conv(&mut g, "conv1", &[x, w1, b1], 1);
    let r1 = add_node(&mut g, "Relu", "relu1", &[c1], vec![]);
    let c2 = conv(&mut g, "conv2", &[r1, w2], 4);
    let k2 = add_node(&mut g, "Clip", "clip2", &[c2, lo, hi], vec![]);
    let s = add_node(&mut g, "Add", "add", &[k2, r1], vec![]);
    let p = add_node(&mut g, "GlobalAveragePool", "gap", &[s], vec![]);
    let f = add_node(&mut g, "Flatten", "flat", &[p], vec![]);
    let y = add_node(&mut g, "Gemm", "fc", &[f, wf], vec![("transB", Attribute::Int(1))]);
    g.add_output(y);
    Model::new(g, 13)
}

fn input(n: usize) -> Tensor {
    f32t(&[n, 2, 6, 6], (0..n * 72).map(|i| ((i * 13) % 17) as f32 * 0.25 - 2.0).collect())
}

fn output(session: &Session, x: &Tensor) -> Vec<f32> {
    session.run(&[("x", x.clone())]).unwrap()[0].as_f32().unwrap().iter().copied().collect()
}

#[test]
fn hook_sees_every_node_output_in_order_and_fusion_steps_aside() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let mut seen: Vec<(String, TensorKind)> = Vec::new();
    let mut hook = |e: TensorEvent<'_>, _: &mut Tensor| -> Result<(), qexec::HookError> {
        seen.push((e.name.to_string(), e.kind));
        Ok(())
    };
    let mut opts = RunOptions::with_hook(&mut hook);
    opts.hook_inputs = true;
    let plain = output(&session, &input(2));
    let hooked = session.run_with(&[("x", input(2))], opts).unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["x", "conv1_out", "relu1_out", "conv2_out", "clip2_out", "add_out", "gap_out", "flat_out", "fc_out"]
    );
    assert_eq!(seen[0].1, TensorKind::GraphInput);
    // Observing conv outputs disables Conv+Relu fusion; the numbers must not change.
    assert_eq!(hooked.outputs[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), plain);
    assert_eq!(hooked.stats.nodes_run, 8);
}

#[test]
fn a_profiled_run_times_every_step_with_its_fused_activation() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let plain = session.run_with(&[("x", input(2))], RunOptions::default()).unwrap();
    assert!(plain.profile.is_empty());
    let run = session.run_with(&[("x", input(2))], RunOptions::default().profile(true)).unwrap();
    assert_eq!(run.outputs[0], plain.outputs[0]);
    let g = &session.model().graph;
    let steps: Vec<(&str, Option<&str>, &[usize])> = run
        .profile
        .iter()
        .map(|s| {
            (g.node(s.node).name.as_str(), s.fused.map(|f| g.node(f).name.as_str()), &s.output_shape[..])
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("conv1", Some("relu1"), &[2, 4, 6, 6][..]),
            ("conv2", Some("clip2"), &[2, 4, 6, 6]),
            ("add", None, &[2, 4, 6, 6]),
            ("gap", None, &[2, 4, 1, 1]),
            ("flat", None, &[2, 4]),
            ("fc", None, &[2, 3]),
        ]
    );
}

#[test]
fn hook_can_rewrite_tensors_and_params() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let g = &session.model().graph;
    let relu = g.value_id("relu1_out").unwrap();
    let mut zero_relu = |e: TensorEvent<'_>, t: &mut Tensor| -> Result<(), qexec::HookError> {
        if e.value == relu {
            *t = Tensor::from_vec(t.shape(), vec![0f32; t.len()]).unwrap();
        }
        Ok(())
    };
    let out = session.run_with(&[("x", input(1))], RunOptions::with_hook(&mut zero_relu)).unwrap();
    // With the Relu output zeroed, everything after it is zero and the logits are Gemm(0) = 0.
    assert!(out.outputs[0].as_f32().unwrap().iter().all(|&v| v == 0.0));

    let wf = g.value_id("wf").unwrap();
    let mut params = Vec::new();
    let mut double_fc = |e: TensorEvent<'_>, t: &mut Tensor| -> Result<(), qexec::HookError> {
        if e.kind == TensorKind::Param {
            params.push(e.name.to_string());
        }
        if e.value == wf {
            *t = Tensor::F32(t.as_f32().unwrap().mapv(|v| v * 2.0).into_shared());
        }
        Ok(())
    };
    let mut opts = RunOptions::with_hook(&mut double_fc);
    opts.hook_params = true;
    let doubled = session.run_with(&[("x", input(1))], opts).unwrap();
    let plain = output(&session, &input(1));
    for (a, b) in doubled.outputs[0].as_f32().unwrap().iter().zip(&plain) {
        assert!((a - 2.0 * b).abs() <= 1e-5 * b.abs().max(1.0));
    }
    assert_eq!(params, ["w1", "b1", "w2", "lo", "hi", "wf"]);
    // The model's own weights are untouched.
    assert_eq!(output(&session, &input(1)), plain);
}

#[test]
fn a_hook_rewriting_a_fed_input_leaves_the_callers_tensor_alone() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let x = input(1);
    let original = x.clone().as_f32().unwrap().to_owned();
    let halved = Tensor::F32(original.mapv(|v| v * 0.5).into_shared());
    let mut halve = |e: TensorEvent<'_>, t: &mut Tensor| -> Result<(), qexec::HookError> {
        if let (TensorKind::GraphInput, Tensor::F32(a)) = (e.kind, t) {
            a.mapv_inplace(|v| v * 0.5);
        }
        Ok(())
    };
    // Twice: the second run's copy of the input comes from the session's recycled buffers.
    for _ in 0..2 {
        let mut opts = RunOptions::with_hook(&mut halve);
        opts.hook_inputs = true;
        let out = session.run_with(&[("x", x.clone())], opts).unwrap();
        assert_eq!(
            out.outputs[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(),
            output(&session, &halved)
        );
    }
    assert_eq!(x.as_f32().unwrap(), original);
}

#[test]
fn resume_recomputes_only_downstream_and_matches_a_full_run() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let g = &session.model().graph;
    let full = session.run_with(&[("x", input(2))], RunOptions::default().keep(Keep::All)).unwrap();
    assert!(full.kept.len() >= 9);
    // Change the depthwise weight: conv1 and relu1 must not run again.
    let w2 = g.value_id("w2").unwrap();
    let new_w2 = f32t(&[4, 1, 3, 3], (0..36).map(|i| (i % 5) as f32 * 0.1).collect());
    let mut cache: ValueCache = full.kept.clone();
    cache.insert(w2, new_w2.clone());
    let resumed = session.resume(&cache, &[w2], RunOptions::default()).unwrap();
    // conv2(+clip2, fused), add, gap, flat, fc.
    assert_eq!(resumed.stats.nodes_run, 5);
    // Same as a full run of a model carrying the new weight.
    let mut changed = small_cnn();
    changed.graph.value_mut(changed.graph.value_id("w2").unwrap()).data = Some(new_w2);
    let reference = Session::new(changed, SessionOptions::threads(1)).unwrap();
    assert_eq!(
        resumed.outputs[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(),
        output(&reference, &input(2))
    );
    // A cache without the values the suffix reads is an error naming the value.
    let err = session.resume(&ValueCache::new(), &[w2], RunOptions::default()).unwrap_err();
    assert!(matches!(err, ExecError::MissingValue { ref name, .. } if name == "relu1_out"), "{err}");
}

#[test]
fn a_model_run_node_set_by_node_set_equals_a_full_run() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let g = &session.model().graph;
    let x = g.value_id("x").unwrap();
    let full = session.run_with(&[("x", input(2))], RunOptions::default().keep(Keep::All)).unwrap();
    // First the nodes up to relu1, keeping its output; then the rest from it.
    let order = g.topological_order().unwrap();
    let cut = order.iter().position(|&n| g.node(n).name == "relu1").unwrap() + 1;
    let relu1 = g.value_id("relu1_out").unwrap();
    let mut cache = ValueCache::new();
    cache.insert(x, input(2));
    let first =
        session.run_nodes(&cache, &order[..cut], RunOptions::default().keep(Keep::Values(vec![relu1])));
    let first = first.unwrap();
    assert_eq!(first.kept.get(relu1), full.kept.get(relu1));
    let rest = session.run_nodes(&first.kept, &order[cut..], RunOptions::default()).unwrap();
    assert_eq!(rest.outputs, full.outputs);
    // Graph inputs in the cache are checked as fed ones are.
    let mut bad = ValueCache::new();
    bad.insert(x, f32t(&[1, 3], vec![0.0; 3]));
    let err = session.run_nodes(&bad, &order, RunOptions::default()).unwrap_err();
    assert!(matches!(err, ExecError::InputMismatch { ref name, .. } if name == "x"), "{err}");
}

#[test]
fn results_are_identical_on_one_and_two_threads() {
    let one = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let two = Session::new(small_cnn(), SessionOptions::threads(2)).unwrap();
    for n in [1, 3] {
        assert_eq!(output(&one, &input(n)), output(&two, &input(n)));
    }
}

#[test]
fn a_batch_runs_sample_by_sample_with_the_batchs_values() {
    let session = Session::new(small_cnn(), SessionOptions::threads(2)).unwrap();
    assert!(session.keeps_samples_apart());
    let feeds = [("x", input(5))];
    let apart = session.run_with(&feeds, RunOptions::default()).unwrap();
    let whole = session.run_with(&feeds, RunOptions::default().serial(true)).unwrap();
    assert_eq!(apart.outputs, whole.outputs);
    assert_eq!(apart.outputs[0].shape(), [5, 3]);
    assert_eq!(apart.stats.nodes_run, whole.stats.nodes_run);
    assert!(apart.stats.peak_bytes < whole.stats.peak_bytes, "{:?} vs {:?}", apart.stats, whole.stats);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let counted = |f: &[(&str, Tensor)]| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(f[0].1.shape()[0], 1);
        session.run_with(f, RunOptions::default().serial(true))
    };
    let run = session.run_per_sample(&feeds, counted).unwrap().unwrap();
    assert_eq!((run.outputs, calls.into_inner()), (whole.outputs, 5));
    // One sample, or a bad feed: nothing to split, or the feed's error.
    assert!(session.run_per_sample(&[("x", input(1))], |_| unreachable!()).unwrap().is_none());
    assert!(matches!(
        session.run_per_sample(&[("y", input(2))], |_| unreachable!()),
        Err(ExecError::UnknownInput { .. })
    ));
}

#[test]
fn a_session_taking_over_anothers_buffers_runs_the_same() {
    let first = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let expected = output(&first, &input(3));
    let mut second = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    second.reuse_buffers(first);
    assert_eq!(output(&second, &input(3)), expected);
}

#[test]
fn intermediates_are_freed_after_their_last_reader() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let run = session.run_with(&[("x", input(4))], RunOptions::default()).unwrap();
    let all = session.run_with(&[("x", input(4))], RunOptions::default().keep(Keep::All)).unwrap();
    assert!(run.stats.peak_bytes > 0);
    assert!(run.stats.peak_bytes < all.kept.bytes(), "{} vs {}", run.stats.peak_bytes, all.kept.bytes());
    assert!(run.kept.is_empty());
}

#[test]
fn unsupported_op_is_reported_before_running() {
    let mut g = Graph::new("bad");
    let x = g.add_input("x", DType::F32, Shape::known(&[2]));
    let y = add_node(&mut g, "FancyNewOp", "mystery", &[x], vec![]);
    g.add_output(y);
    let err = Session::new(Model::new(g, 17), SessionOptions::threads(1)).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, ExecError::UnsupportedOp { .. }));
    assert!(text.contains("FancyNewOp") && text.contains("mystery") && text.contains("17"), "{text}");
}

#[test]
fn bad_feeds_name_the_input() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let wrong_shape = f32t(&[1, 3, 6, 6], vec![0.0; 108]);
    let err = session.run(&[("x", wrong_shape)]).unwrap_err();
    assert!(matches!(err, ExecError::InputMismatch { ref name, .. } if name == "x"), "{err}");
    let wrong_dtype = Tensor::from_vec(&[1, 2, 6, 6], vec![0i64; 72]).unwrap();
    assert!(matches!(session.run(&[("x", wrong_dtype)]).unwrap_err(), ExecError::InputMismatch { .. }));
    let err = session.run(&[("y", input(1))]).unwrap_err();
    assert!(err.to_string().contains("'y' is not an input") && err.to_string().contains("x"), "{err}");
    assert!(matches!(session.run(&[]).unwrap_err(), ExecError::MissingInput { ref name } if name == "x"));
}

#[test]
fn kernel_errors_name_node_and_op() {
    let mut g = Graph::new("mismatch");
    let a = g.add_input("a", DType::F32, Shape(vec![qgraph::Dim::Symbol("n".into())]));
    let b = g.add_input("b", DType::F32, Shape(vec![qgraph::Dim::Symbol("m".into())]));
    let y = add_node(&mut g, "Add", "adder", &[a, b], vec![]);
    g.add_output(y);
    let session = Session::new(Model::new(g, 13), SessionOptions::threads(1)).unwrap();
    let err = session.run(&[("a", f32t(&[3], vec![0.0; 3])), ("b", f32t(&[2], vec![0.0; 2]))]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("adder") && text.contains("Add") && text.contains("broadcast"), "{text}");
}

#[test]
fn a_failing_hook_stops_the_run_with_the_tensor_name() {
    let session = Session::new(small_cnn(), SessionOptions::threads(1)).unwrap();
    let mut refuse = |e: TensorEvent<'_>, _: &mut Tensor| -> Result<(), qexec::HookError> {
        if e.name == "add_out" { Err("NaN found".into()) } else { Ok(()) }
    };
    let err = session.run_with(&[("x", input(1))], RunOptions::with_hook(&mut refuse)).unwrap_err();
    assert!(matches!(err, ExecError::Hook { ref name, .. } if name == "add_out"), "{err}");
}

/// Rounds every observed value to a multiple of 1/8, either in `on_tensor` or as an epilogue.
struct Rounding {
    values: Vec<ValueId>,
    as_epilogue: bool,
    on_tensor_calls: Vec<ValueId>,
}

fn round_eighths(s: &mut [f32]) {
    s.iter_mut().for_each(|v| *v = (*v * 8.0).round() / 8.0);
}

impl qexec::Hook for Rounding {
    fn observes(&self, value: ValueId) -> bool {
        self.values.contains(&value)
    }

    fn on_tensor(&mut self, e: TensorEvent<'_>, t: &mut Tensor) -> Result<(), qexec::HookError> {
        self.on_tensor_calls.push(e.value);
        let Tensor::F32(a) = t else { return Ok(()) };
        round_eighths(a.as_slice_mut().unwrap());
        Ok(())
    }

    fn epilogue(&self, value: ValueId) -> Option<qexec::Epilogue<'_>> {
        (self.as_epilogue && self.values.contains(&value)).then_some(&round_eighths as qexec::Epilogue<'_>)
    }
}

#[test]
fn epilogues_equal_on_tensor_and_replace_it_where_kernels_apply_them() {
    for threads in [1, 2] {
        let session = Session::new(small_cnn(), SessionOptions::threads(threads)).unwrap();
        let g = &session.model().graph;
        let values: Vec<ValueId> = ["relu1_out", "conv2_out", "clip2_out", "add_out"]
            .iter()
            .map(|n| g.value_id(n).unwrap())
            .collect();
        let mut results = Vec::new();
        let mut calls = Vec::new();
        let mut nodes_run = Vec::new();
        for as_epilogue in [false, true] {
            let mut hook = Rounding { values: values.clone(), as_epilogue, on_tensor_calls: Vec::new() };
            let out = session.run_with(&[("x", input(3))], RunOptions::with_hook(&mut hook)).unwrap();
            results.push(out.outputs[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>());
            calls.push(hook.on_tensor_calls);
            nodes_run.push(out.stats.nodes_run);
        }
        assert_eq!(results[0], results[1], "{threads} thread(s)");
        assert_eq!(calls[0], values);
        // Conv+Relu fused, the depthwise Conv, the Clip and the Add all apply the epilogue.
        assert!(calls[1].is_empty(), "{:?}", calls[1]);
        // With epilogues the depthwise Conv also runs the Clip between its epilogue and the
        // Clip's: one step fewer.
        assert_eq!(nodes_run[1] + 1, nodes_run[0]);
    }
}

#[test]
fn if_runs_the_branch_its_condition_picks_reading_outer_values() {
    use onnx_protobuf::{GraphProto, NodeProto, ValueInfoProto};
    // then: y = x + x; else: y = x · x — both read `x` from the enclosing graph.
    let branch = |op: &str| GraphProto {
        name: op.into(),
        node: vec![NodeProto {
            op_type: op.into(),
            input: vec!["x".into(), "x".into()],
            output: vec!["y".into()],
            ..Default::default()
        }],
        output: vec![ValueInfoProto { name: "y".into(), ..Default::default() }],
        ..Default::default()
    };
    let mut g = qgraph::Graph::new("if");
    g.add_input("x", qgraph::DType::F32, qgraph::Shape::known(&[3]));
    let c = g.add_input("c", qgraph::DType::Bool, qgraph::Shape::known(&[]));
    let out = g.add_node(qgraph::NodeSpec {
        name: "if".into(),
        op_type: "If".into(),
        inputs: vec![Some(c)],
        outputs: vec!["out".into()],
        attrs: vec![
            ("then_branch".into(), qgraph::Attribute::Graph(Box::new(branch("Add")))),
            ("else_branch".into(), qgraph::Attribute::Graph(Box::new(branch("Mul")))),
        ],
        ..Default::default()
    });
    let y = g.node(out).output(0).unwrap();
    g.add_output(y);
    // Through bytes, so the loader works out what the branches read from outside.
    let model = qgraph::load_bytes(&qgraph::save_bytes(&qgraph::Model::new(g, 13)).unwrap(), None).unwrap();
    let session = Session::new(model, SessionOptions::threads(1)).unwrap();
    let xs = f32t(&[3], vec![1.0, 2.0, 3.0]);
    for (cond, want) in [(true, [2.0, 4.0, 6.0]), (false, [1.0, 4.0, 9.0])] {
        let c = qgraph::Tensor::from_vec(&[], vec![cond]).unwrap();
        let got = session.run(&[("x", xs.clone()), ("c", c)]).unwrap();
        assert_eq!(got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), want, "cond {cond}");
    }
}

#[test]
fn an_if_whose_condition_shapes_decide_is_inlined_and_computes_the_same() {
    use onnx_protobuf::{AttributeProto, GraphProto, NodeProto, ValueInfoProto};
    let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let graph = |name: &str, node: Vec<NodeProto>, output: &str| GraphProto {
        name: name.into(),
        node,
        output: vec![ValueInfoProto { name: output.into(), ..Default::default() }],
        ..Default::default()
    };
    // then: t = x · [1, 2, 3] (a Constant), then a nested If on the input `c` that reads `t`
    // by name (Relu or Neg of it); else: −x.
    let mut weights = node("Constant", &[], "w");
    weights.attribute.push(AttributeProto {
        name: "value".into(),
        type_: onnx_protobuf::attribute_proto::AttributeType::TENSOR.into(),
        t: Some(onnx_protobuf::TensorProto {
            dims: vec![3],
            data_type: 1,
            float_data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    });
    let mut nested = node("If", &["c"], "y");
    for (name, op) in [("then_branch", "Relu"), ("else_branch", "Neg")] {
        nested.attribute.push(AttributeProto {
            name: name.into(),
            type_: onnx_protobuf::attribute_proto::AttributeType::GRAPH.into(),
            g: Some(graph(op, vec![node(op, &["t"], &format!("{op}_out"))], &format!("{op}_out"))).into(),
            ..Default::default()
        });
    }
    let then_branch = graph("then", vec![weights, node("Mul", &["x", "w"], "t"), nested], "y");
    let else_branch = graph("else", vec![node("Neg", &["x"], "n")], "n");
    let mut g = qgraph::Graph::new("inline");
    let x = g.add_input(
        "x",
        qgraph::DType::F32,
        qgraph::Shape(vec![qgraph::Dim::Symbol("batch".into()), qgraph::Dim::Known(3)]),
    );
    g.add_input("c", qgraph::DType::Bool, qgraph::Shape::known(&[]));
    let shape = g.add_op("Shape", "shape", &[x], vec![]);
    let one = g.add_initializer("one", qgraph::Tensor::from_vec(&[1], vec![1i64]).unwrap());
    let width = g.add_op("Gather", "width", &[shape, one], vec![]);
    let three = g.add_initializer("three", qgraph::Tensor::from_vec(&[1], vec![3i64]).unwrap());
    let cond = g.add_op("Equal", "is_three", &[width, three], vec![]);
    let node_id = g.add_node(qgraph::NodeSpec {
        name: "if".into(),
        op_type: "If".into(),
        inputs: vec![Some(cond)],
        outputs: vec!["out".into()],
        attrs: vec![
            ("then_branch".into(), qgraph::Attribute::Graph(Box::new(then_branch))),
            ("else_branch".into(), qgraph::Attribute::Graph(Box::new(else_branch))),
        ],
        ..Default::default()
    });
    let out = g.node(node_id).output(0).unwrap();
    g.add_output(out);
    let model = qgraph::load_bytes(&qgraph::save_bytes(&qgraph::Model::new(g, 13)).unwrap(), None).unwrap();

    let mut inlined = model.clone();
    let count = qgraph::passes::inline_static_ifs(&mut inlined, &qgraph::DimBindings::default()).unwrap();
    assert_eq!(count, 1, "the nested If's condition is an input: it stays");
    let ig = &inlined.graph;
    let ops: Vec<&str> = ig.nodes().map(|(_, n)| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Mul", "If"], "the branch replaced the If and the shape check is gone");
    assert_eq!(ig.value(ig.outputs()[0]).name, "out");
    // Saved and loaded again: the nested If still finds `t` by name.
    let inlined = qgraph::load_bytes(&qgraph::save_bytes(&inlined).unwrap(), None).unwrap();

    let original = Session::new(model, SessionOptions::threads(1)).unwrap();
    let inlined = Session::new(inlined, SessionOptions::threads(1)).unwrap();
    let xs = f32t(&[2, 3], vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0]);
    for c in [true, false] {
        let feeds = [("x", xs.clone()), ("c", qgraph::Tensor::from_vec(&[], vec![c]).unwrap())];
        let want = original.run(&feeds).unwrap();
        assert_eq!(inlined.run(&feeds).unwrap()[0], want[0], "c {c}");
    }
}
