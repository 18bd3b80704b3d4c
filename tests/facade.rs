//! Workspace-level test: the facade crate exposes the member crates, and a model built through it
//! survives a save/load round trip with its shapes and MACs.

use quantkit::qgraph::{Attribute, DType, DimBindings, Graph, Model, NodeSpec, Shape, Tensor};

#[test]
fn facade_builds_saves_and_inspects_a_model() {
    let mut g = Graph::new("facade");
    let x = g.add_input("x", DType::F32, Shape::known(&[1, 2, 5, 5]));
    let w = g.add_initializer("w", Tensor::from_vec(&[3, 2, 3, 3], vec![0.5f32; 54]).unwrap());
    let conv = g.add_node(NodeSpec {
        name: "conv".into(),
        op_type: "Conv".into(),
        inputs: vec![Some(x), Some(w)],
        outputs: vec!["y".into()],
        attrs: vec![("pads".into(), Attribute::Ints(vec![1, 1, 1, 1]))],
        ..NodeSpec::default()
    });
    let y = g.node(conv).output(0).unwrap();
    g.add_output(y);
    let mut m = Model::new(g, 13);
    m.infer_shapes(&DimBindings::all(1)).unwrap();
    let again = quantkit::qgraph::load_bytes(&quantkit::qgraph::save_bytes(&m).unwrap(), None).unwrap();
    assert_eq!(again, m);
    let s = again.summary();
    assert_eq!(s.total_macs, 3 * 5 * 5 * 2 * 9);
    assert_eq!(s.float_params, 54);
}
