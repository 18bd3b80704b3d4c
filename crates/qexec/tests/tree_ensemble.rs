//! `ai.onnx.ml` `TreeEnsembleRegressor` on forests written here (the opset-5 `TreeEnsemble` is
//! checked by the ONNX node tests): every aggregation with base values, the post-transforms,
//! NaN features that track the true branch, and hostile forests (a cycle, a missing node, a
//! feature beyond the input) refused with one-line errors.

use qexec::{Session, SessionOptions};
use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor};

/// Two trees over two features. Tree 0: x0 ≤ 0.5 → leaf 1 (target 0: 1.0) else leaf 2 (target
/// 0: 3.0, target 1: 1.0). Tree 1: x1 < 2 → leaf 1 (target 1: 4.0) else leaf 2 (target 0: 5.0).
fn forest(extra: Vec<(&str, Attribute)>) -> Vec<(String, Attribute)> {
    let ints = |v: &[i64]| Attribute::Ints(v.to_vec());
    let strings = |v: &[&str]| Attribute::Strings(v.iter().map(|s| s.as_bytes().to_vec()).collect());
    let mut attrs = vec![
        ("n_targets", Attribute::Int(2)),
        ("nodes_treeids", ints(&[0, 0, 0, 1, 1, 1])),
        ("nodes_nodeids", ints(&[0, 1, 2, 0, 1, 2])),
        ("nodes_featureids", ints(&[0, 0, 0, 1, 0, 0])),
        ("nodes_modes", strings(&["BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_LT", "LEAF", "LEAF"])),
        ("nodes_values", Attribute::Floats(vec![0.5, 0.0, 0.0, 2.0, 0.0, 0.0])),
        ("nodes_truenodeids", ints(&[1, 0, 0, 1, 0, 0])),
        ("nodes_falsenodeids", ints(&[2, 0, 0, 2, 0, 0])),
        ("target_treeids", ints(&[0, 0, 0, 1, 1])),
        ("target_nodeids", ints(&[1, 2, 2, 1, 2])),
        ("target_ids", ints(&[0, 0, 1, 1, 0])),
        ("target_weights", Attribute::Floats(vec![1.0, 3.0, 1.0, 4.0, 5.0])),
    ];
    for (name, value) in extra {
        attrs.retain(|(n, _)| *n != name);
        attrs.push((name, value));
    }
    attrs.into_iter().map(|(n, a)| (n.to_string(), a)).collect()
}

fn run(attrs: Vec<(String, Attribute)>, x: Vec<f32>) -> Result<Vec<f32>, String> {
    let mut g = Graph::new("forest");
    let rows = x.len() / 2;
    let input = g.add_input("x", DType::F32, Shape::known(&[rows, 2]));
    let node = g.add_node(NodeSpec {
        name: "forest".into(),
        op_type: "TreeEnsembleRegressor".into(),
        domain: "ai.onnx.ml".into(),
        attrs,
        inputs: vec![Some(input)],
        outputs: vec!["y".into()],
    });
    let y = g.node(node).outputs()[0].unwrap();
    g.add_output(y);
    let session = Session::new(Model::new(g, 13), SessionOptions::threads(1)).map_err(|e| e.to_string())?;
    let x = Tensor::from_vec(&[rows, 2], x).unwrap();
    let out = session.run(&[("x", x)]).map_err(|e| e.to_string())?;
    Ok(out[0].as_f32().unwrap().iter().copied().collect())
}

/// Rows: (0, 0) reaches leaves (0.1, 1.1); (1, 3) reaches (0.2, 1.2); (NaN, NaN).
const ROWS: [f32; 6] = [0.0, 0.0, 1.0, 3.0, f32::NAN, f32::NAN];

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} instead of {want:?}");
    }
}

#[test]
fn each_aggregation_adds_the_base_values() {
    let base = || ("base_values", Attribute::Floats(vec![10.0, 20.0]));
    // NaN features fail every comparison: tree 0 goes false (3, 1), tree 1 false (5, 0).
    let sum = run(forest(vec![base()]), ROWS.to_vec()).unwrap();
    close(&sum, &[11.0, 24.0, 18.0, 21.0, 18.0, 21.0]);
    let agg = |name: &str| ("aggregate_function", Attribute::String(name.as_bytes().to_vec()));
    let average = run(forest(vec![base(), agg("AVERAGE")]), ROWS.to_vec()).unwrap();
    close(&average, &[10.5, 22.0, 14.0, 20.5, 14.0, 20.5]);
    // Row (0, 0): target 0 has only tree 0's vote (1.0); target 1 only tree 1's (4.0).
    let min = run(forest(vec![agg("MIN")]), ROWS.to_vec()).unwrap();
    close(&min, &[1.0, 4.0, 3.0, 1.0, 3.0, 1.0]);
    let max = run(forest(vec![agg("MAX")]), ROWS.to_vec()).unwrap();
    close(&max, &[1.0, 4.0, 5.0, 1.0, 5.0, 1.0]);
}

#[test]
fn post_transforms_and_missing_values_tracking_true() {
    let post = |name: &str| ("post_transform", Attribute::String(name.as_bytes().to_vec()));
    let logistic = run(forest(vec![post("LOGISTIC")]), ROWS[..2].to_vec()).unwrap();
    close(&logistic, &[1.0 / (1.0 + (-1.0f32).exp()), 1.0 / (1.0 + (-4.0f32).exp())]);
    let softmax = run(forest(vec![post("SOFTMAX")]), ROWS[..2].to_vec()).unwrap();
    let e = (-3.0f32).exp();
    close(&softmax, &[e / (1.0 + e), 1.0 / (1.0 + e)]);
    let tracks = ("nodes_missing_value_tracks_true", Attribute::Ints(vec![1, 0, 0, 1, 0, 0]));
    let nan = run(forest(vec![tracks]), ROWS[4..].to_vec()).unwrap();
    close(&nan, &[1.0, 4.0]);
}

#[test]
fn hostile_forests_are_one_line_errors() {
    let cases = [
        // Tree 0's root sends its true branch back to itself.
        (vec![("nodes_truenodeids", Attribute::Ints(vec![0, 0, 0, 1, 0, 0]))], "cycle"),
        (vec![("nodes_falsenodeids", Attribute::Ints(vec![7, 0, 0, 2, 0, 0]))], "has no node 7"),
        (vec![("nodes_featureids", Attribute::Ints(vec![5, 0, 0, 1, 0, 0]))], "feature 5"),
        (vec![("target_ids", Attribute::Ints(vec![0, 0, 9, 1, 0]))], "target id 9"),
        (vec![("nodes_nodeids", Attribute::Ints(vec![0, 1, 1, 0, 1, 2]))], "node id 1 twice"),
        (vec![("n_targets", Attribute::Int(0))], "n_targets 0"),
        (vec![("nodes_values", Attribute::Floats(vec![0.5]))], "nodes_values has 1 entries"),
    ];
    for (attrs, expected) in cases {
        let err = run(forest(attrs), ROWS[..2].to_vec()).unwrap_err();
        assert!(err.contains(expected) && !err.contains('\n'), "{err}");
    }
    // Targets beyond the memory limit are refused even for an empty batch.
    let err = run(forest(vec![("n_targets", Attribute::Int(1 << 60))]), Vec::new()).unwrap_err();
    assert!(err.contains("beyond the memory limit"), "{err}");
}
