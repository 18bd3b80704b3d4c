//! Load → save → load round trips: graphs, names, Constant nodes, every dtype (raw and typed
//! fields), subgraph attributes with outer-scope reads, external data, and node ordering.

#![allow(dead_code)]
mod common;

use common::*;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, StringStringEntryProto, TensorProto, ValueInfoProto,
};
use qgraph::{Attribute, DType, DimBindings, Tensor, ValueSource, load_bytes, load_path, save_bytes};

fn tensor_proto(name: &str, dims: &[i64], dtype: i32) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.into();
    t.dims = dims.to_vec();
    t.data_type = dtype;
    t
}

fn vi(name: &str, dtype: i32, dims: &[i64]) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    let mut tt = onnx_protobuf::type_proto::Tensor::new();
    tt.elem_type = dtype;
    let mut sh = onnx_protobuf::TensorShapeProto::new();
    for &d in dims {
        let mut dim = onnx_protobuf::tensor_shape_proto::Dimension::new();
        dim.set_dim_value(d);
        sh.dim.push(dim);
    }
    tt.shape = Some(sh).into();
    let mut tp = onnx_protobuf::TypeProto::new();
    tp.set_tensor_type(tt);
    v.type_ = Some(tp).into();
    v
}

#[test]
fn built_model_round_trips_exactly() {
    let m = conv_bn_classifier();
    let again = reload(&m);
    assert_eq!(again, m);
    assert_eq!(reload(&again), m);
    again.graph.validate().unwrap();
}

#[test]
fn shapes_survive_a_round_trip() {
    let mut m = conv_bn_classifier();
    m.infer_shapes(&DimBindings::default()).unwrap();
    let again = reload(&m);
    assert_eq!(again, m);
    let logits = again.graph.value(again.graph.value_id("logits").unwrap());
    assert_eq!(logits.shape.as_ref().unwrap().to_string(), "[batch, 10]");
}

#[test]
fn every_dtype_loads_from_raw_and_typed_fields() {
    let mut g = GraphProto::new();
    g.name = "dtypes".into();
    // Typed fields, as older exporters write them.
    let mut f = tensor_proto("f", &[2], 1);
    f.float_data = vec![1.5, -2.0];
    let mut d = tensor_proto("d", &[2], 11);
    d.double_data = vec![0.25, 3.0];
    let mut h = tensor_proto("h", &[2], 10);
    h.int32_data =
        vec![half::f16::from_f32(0.5).to_bits() as i32, half::f16::from_f32(-1.0).to_bits() as i32];
    let mut bf = tensor_proto("bf", &[1], 16);
    bf.int32_data = vec![half::bf16::from_f32(2.0).to_bits() as i32];
    let mut i8t = tensor_proto("i8", &[3], 3);
    i8t.int32_data = vec![-128, 0, 127];
    let mut u8t = tensor_proto("u8", &[2], 2);
    u8t.int32_data = vec![0, 255];
    let mut i16t = tensor_proto("i16", &[1], 5);
    i16t.int32_data = vec![-300];
    let mut i32t = tensor_proto("i32", &[1], 6);
    i32t.int32_data = vec![70000];
    let mut i64t = tensor_proto("i64", &[2], 7);
    i64t.int64_data = vec![-1, 1 << 40];
    let mut b = tensor_proto("b", &[2], 9);
    b.int32_data = vec![1, 0];
    let mut raw = tensor_proto("raw", &[2, 2], 1);
    raw.raw_data = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut scalar = tensor_proto("scalar", &[], 7);
    scalar.int64_data = vec![42];
    g.initializer = vec![f, d, h, bf, i8t, u8t, i16t, i32t, i64t, b, raw, scalar];
    for t in g.initializer.clone() {
        g.output.push(vi(&t.name, t.data_type, &t.dims));
    }
    let bytes = model_proto(g).write_to_bytes().unwrap();
    let m = load_bytes(&bytes, None).unwrap();
    let get = |n: &str| m.graph.static_value(m.graph.value_id(n).unwrap()).unwrap().clone();
    assert_eq!(get("f"), Tensor::from_vec(&[2], vec![1.5f32, -2.0]).unwrap());
    assert_eq!(get("d").to_f64_vec(), vec![0.25, 3.0]);
    assert_eq!(get("h").to_f64_vec(), vec![0.5, -1.0]);
    assert_eq!(get("bf").to_f64_vec(), vec![2.0]);
    assert_eq!(get("i8").to_i64_vec().unwrap(), vec![-128, 0, 127]);
    assert_eq!(get("u8").to_i64_vec().unwrap(), vec![0, 255]);
    assert_eq!(get("i16").to_i64_vec().unwrap(), vec![-300]);
    assert_eq!(get("i32").to_i64_vec().unwrap(), vec![70000]);
    assert_eq!(get("i64").to_i64_vec().unwrap(), vec![-1, 1 << 40]);
    assert_eq!(get("b").dtype(), DType::Bool);
    assert_eq!(get("raw").shape(), &[2, 2]);
    assert_eq!(get("scalar").shape(), &[] as &[usize]);
    assert_eq!(reload(&m), m);
}

#[test]
fn constant_nodes_hold_static_weights() {
    let mut g = GraphProto::new();
    g.input.push(vi("x", 1, &[1, 2, 4, 4]));
    let mut c = nproto("Constant", "w_const", &[], &["w"]);
    let mut a = AttributeProto::new();
    a.name = "value".into();
    a.type_ = onnx_protobuf::attribute_proto::AttributeType::TENSOR.into();
    let mut t = tensor_proto("", &[3, 2, 1, 1], 1);
    t.float_data = vec![1.0; 6];
    a.t = Some(t).into();
    c.attribute.push(a);
    let mut ci = nproto("Constant", "k_const", &[], &["k"]);
    let mut ai = AttributeProto::new();
    ai.name = "value_ints".into();
    ai.type_ = onnx_protobuf::attribute_proto::AttributeType::INTS.into();
    ai.ints = vec![1, 2];
    ci.attribute.push(ai);
    g.node = vec![c, ci, nproto("Conv", "conv", &["x", "w"], &["y"])];
    g.output.push(vi("y", 1, &[1, 3, 4, 4]));
    g.output.push(vi("k", 7, &[2]));
    let m = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap();
    let conv = m.graph.node_id("conv").unwrap();
    let params = m.graph.node_params(conv).unwrap();
    assert_eq!(params.len(), 1);
    assert_eq!(m.graph.value(params[0].root).name, "w");
    assert!(matches!(m.graph.value(params[0].root).source(), ValueSource::Node(_)));
    assert_eq!(
        m.graph.static_value(m.graph.value_id("k").unwrap()).unwrap().to_i64_vec().unwrap(),
        vec![1, 2]
    );
    assert_eq!(reload(&m), m);
}

#[test]
fn missing_node_names_are_filled_like_aimet() {
    let mut g = GraphProto::new();
    g.input.push(vi("x", 1, &[4]));
    g.node = vec![
        nproto("Relu", "", &["x"], &["a"]),
        nproto("Relu", "", &["a"], &["b"]),
        nproto("Neg", "", &["b"], &["c"]),
    ];
    g.output.push(vi("c", 1, &[4]));
    let m = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap();
    let names: Vec<&str> = m.graph.nodes().map(|(_, n)| n.name.as_str()).collect();
    assert_eq!(names, ["/Relu", "/Relu_1", "/Neg"]);
}

#[test]
fn nodes_out_of_order_are_sorted_topologically() {
    let mut g = GraphProto::new();
    g.input.push(vi("x", 1, &[4]));
    g.node = vec![nproto("Neg", "second", &["a"], &["b"]), nproto("Relu", "first", &["x"], &["a"])];
    g.output.push(vi("b", 1, &[4]));
    let m = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap();
    let names: Vec<&str> = m.graph.nodes().map(|(_, n)| n.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    m.graph.validate().unwrap();
}

#[test]
fn subgraphs_are_kept_with_their_outer_scope_reads() {
    let mut then_g = GraphProto::new();
    then_g.name = "then".into();
    then_g.node.push(nproto("Relu", "inner", &["outer_val"], &["t_out"]));
    then_g.output.push(vi("t_out", 1, &[4]));
    let mut else_g = GraphProto::new();
    else_g.name = "else".into();
    else_g.node.push(nproto("Identity", "inner2", &["x"], &["e_out"]));
    else_g.output.push(vi("e_out", 1, &[4]));

    let mut g = GraphProto::new();
    g.input.push(vi("x", 1, &[4]));
    g.input.push(vi("cond", 9, &[]));
    let mut iff = nproto("If", "branch", &["cond"], &["y"]);
    for (name, body) in [("then_branch", then_g), ("else_branch", else_g)] {
        let mut a = AttributeProto::new();
        a.name = name.into();
        a.type_ = onnx_protobuf::attribute_proto::AttributeType::GRAPH.into();
        a.g = Some(body).into();
        iff.attribute.push(a);
    }
    g.node = vec![nproto("Neg", "producer", &["x"], &["outer_val"]), iff];
    g.output.push(vi("y", 1, &[4]));
    let mut m = load_bytes(&model_proto(g).write_to_bytes().unwrap(), None).unwrap();
    let branch = m.graph.node_id("branch").unwrap();
    let implicit: Vec<&str> =
        m.graph.node(branch).implicit_inputs().iter().map(|&v| m.graph.value(v).name.as_str()).collect();
    assert_eq!(implicit, ["outer_val", "x"]);
    assert!(matches!(m.graph.node(branch).attr("then_branch"), Some(Attribute::Graph(_))));
    // The producer is read only by the subgraph: dead-node elimination must keep it.
    assert_eq!(qgraph::passes::eliminate_dead_nodes(&mut m.graph).unwrap(), 0);
    assert_eq!(reload(&m), m);
}

#[test]
fn external_data_is_read_relative_to_the_model() {
    let dir = std::env::temp_dir().join(format!("qgraph-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = [9.0f32, 1.0, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("weights.bin"), &payload).unwrap();
    let ext = |name: &str, offset: &str, length: &str, location: &str| {
        let mut t = tensor_proto(name, &[2, 2], 1);
        t.data_location = DataLocation::EXTERNAL.into();
        for (k, v) in [("location", location), ("offset", offset), ("length", length)] {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v.into();
            t.external_data.push(e);
        }
        t
    };
    let with = |t: TensorProto| {
        let mut g = GraphProto::new();
        g.output.push(vi(&t.name, 1, &[2, 2]));
        g.initializer.push(t);
        model_proto(g).write_to_bytes().unwrap()
    };
    let path = dir.join("model.onnx");
    std::fs::write(&path, with(ext("w", "4", "16", "weights.bin"))).unwrap();
    let m = load_path(&path).unwrap();
    let w = m.graph.static_value(m.graph.value_id("w").unwrap()).unwrap();
    assert_eq!(w.to_f64_vec(), vec![1.0, 2.0, 3.0, 4.0]);

    let fails = |bytes: Vec<u8>| {
        std::fs::write(&path, bytes).unwrap();
        load_path(&path).unwrap_err().to_string()
    };
    assert!(fails(with(ext("w", "8", "16", "weights.bin"))).contains("exceeds the file size"));
    assert!(fails(with(ext("w", "0", "16", "../weights.bin"))).contains("relative path inside"));
    assert!(fails(with(ext("w", "0", "16", "missing.bin"))).contains("missing.bin"));
    let from_bytes = load_bytes(&with(ext("w", "4", "16", "weights.bin")), None).unwrap_err().to_string();
    assert!(from_bytes.contains("without a base directory"), "{from_bytes}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn saving_is_atomic_and_loadable() {
    let dir = std::env::temp_dir().join(format!("qgraph-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.onnx");
    let m = conv_bn_classifier();
    qgraph::save_path(&m, &path).unwrap();
    assert_eq!(load_path(&path).unwrap(), m);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temp file left behind: {leftovers:?}");
    assert_eq!(save_bytes(&m).unwrap(), std::fs::read(&path).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_output_set_cleans_up_only_after_dead_processes_of_its_own_host() {
    let dir = std::env::temp_dir().join(format!("qgraph-leftovers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (host, _) = qgraph::process_tag().rsplit_once('-').unwrap();
    // PIDs above the kernel's limit (2^22) never run.
    let ours_dead = format!(".staging-{host}-4999999");
    let other_host = ".staging-elsewhere_node7-4999999".to_string();
    let ours_tmp = format!(".m.onnx.{host}-4999999.tmp");
    for name in [&ours_dead, &other_host] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
    }
    std::fs::write(dir.join(&ours_tmp), b"partial").unwrap();
    let set = qgraph::OutputSet::begin(&dir).unwrap();
    assert!(!dir.join(&ours_dead).exists() && !dir.join(&ours_tmp).exists());
    assert!(dir.join(&other_host).exists(), "another host's staging folder is not ours to remove");
    assert!(set.staging_dir().ends_with(format!(".staging-{}", qgraph::process_tag())));
    drop(set);
    std::fs::remove_dir_all(&dir).unwrap();
}
