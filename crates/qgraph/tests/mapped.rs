//! Models with external data: saved beside a data file, loaded back read into memory or mapped
//! (lazy weights read on demand), and saved again from the mapped form without reading every
//! weight in at once.

#![allow(dead_code)]
mod common;

use std::path::PathBuf;

use common::*;
use qgraph::{DType, Graph, LoadOptions, Model, Shape, load_path, load_path_with};

/// x[2,256] → MatMul(W[256,128]: 128 KiB) → Add(b[128]) → y.
fn linear() -> Model {
    let mut g = Graph::new("linear");
    let x = g.add_input("x", DType::F32, Shape::known(&[2, 256]));
    let w = g.add_initializer("w", tensor(&[256, 128], 1));
    let b = g.add_initializer("b", tensor(&[128], 2));
    let h = node(&mut g, "MatMul", "mm", &[Some(x), Some(w)], &["h"], vec![]);
    let y = node(&mut g, "Add", "add", &[Some(h[0]), Some(b)], &["y"], vec![]);
    g.set_outputs(vec![y[0]]);
    Model::new(g, 17)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qgraph-mapped-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mapped() -> LoadOptions {
    LoadOptions { map_external_from: 0, ..LoadOptions::default() }
}

#[test]
fn external_data_is_read_in_below_the_threshold_and_mapped_above_it() {
    let dir = scratch("threshold");
    let m = linear();
    let path = dir.join("model.onnx");
    qgraph::save_path_with_external_data(&m, &path).unwrap();
    let data = std::fs::metadata(dir.join("model.onnx.data")).unwrap().len();
    assert!(data >= 256 * 128 * 4, "the weight went to the data file ({data} bytes)");
    assert!(std::fs::metadata(&path).unwrap().len() < 4096, "the model file holds no weight");

    let read = load_path(&path).unwrap();
    assert_eq!(read, m, "read into memory, the model is the one saved");

    let lazy = load_path_with(&path, mapped()).unwrap();
    let (w, b) = (lazy.graph.value_id("w").unwrap(), lazy.graph.value_id("b").unwrap());
    let wv = lazy.graph.value(w);
    assert!(wv.data.is_none() && wv.lazy.is_some(), "the 128 KiB weight is mapped");
    assert!(lazy.graph.value(b).data.is_some(), "a small bias is read in");
    assert!(lazy.graph.is_static(w));
    assert_eq!(lazy.graph.static_shape(w), Some(&[256usize, 128][..]));
    assert_eq!(wv.dtype, Some(DType::F32));
    let original = m.graph.static_value(m.graph.value_id("w").unwrap()).unwrap();
    assert_eq!(&lazy.graph.load_static(w).unwrap().unwrap(), original);
    assert!(!wv.lazy.as_ref().unwrap().is_resident(), "load_static keeps nothing");
    assert_eq!(lazy.graph.static_value(w), Some(original));
    assert!(wv.lazy.as_ref().unwrap().is_resident(), "a borrow keeps it");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_mapped_model_saves_with_external_data_aligned_and_reloads_equal() {
    let dir = scratch("resave");
    let m = linear();
    qgraph::save_path_with_external_data(&m, dir.join("a.onnx")).unwrap();
    let lazy = load_path_with(dir.join("a.onnx"), mapped()).unwrap();
    qgraph::save_path(&lazy, dir.join("b.onnx")).unwrap();
    assert!(dir.join("b.onnx.data").exists(), "lazy weights are written as external data");
    let proto = {
        use onnx_protobuf::Message;
        onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(dir.join("b.onnx")).unwrap()).unwrap()
    };
    let w = proto.graph.initializer.iter().find(|t| t.name == "w").unwrap();
    let offset: u64 = w.external_data.iter().find(|kv| kv.key == "offset").unwrap().value.parse().unwrap();
    assert_eq!(offset % 4096, 0, "a large tensor starts on a page");
    assert_eq!(load_path(dir.join("b.onnx")).unwrap(), m);
    // In memory, as bytes, the lazy weight is read in.
    assert_eq!(qgraph::load_bytes(&qgraph::save_bytes(&lazy).unwrap(), None).unwrap(), m);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_data_file_shorter_than_a_mapped_tensor_is_an_error_naming_it() {
    let dir = scratch("short");
    qgraph::save_path_with_external_data(&linear(), dir.join("model.onnx")).unwrap();
    let data = dir.join("model.onnx.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(len - 4).unwrap();
    let err = load_path_with(dir.join("model.onnx"), mapped()).unwrap_err().to_string();
    assert!(err.contains("'w'") && err.contains("exceeds the file size"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_external_entries_are_errors_naming_the_tensor() {
    use onnx_protobuf::Message;
    let dir = scratch("hostile");
    qgraph::save_path_with_external_data(&linear(), dir.join("model.onnx")).unwrap();
    let proto =
        onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(dir.join("model.onnx")).unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut onnx_protobuf::TensorProto)| {
        let mut p = proto.clone();
        f(p.graph.as_mut().unwrap().initializer.iter_mut().find(|t| t.name == "w").unwrap());
        std::fs::write(dir.join("bad.onnx"), p.write_to_bytes().unwrap()).unwrap();
        load_path_with(dir.join("bad.onnx"), mapped()).unwrap_err().to_string()
    };
    let huge = edit(&|t| t.dims = vec![1 << 40, 1 << 40]);
    assert!(huge.contains("'w'") && huge.contains("overflows"), "{huge}");
    let wrong = edit(&|t| t.dims = vec![256, 129]);
    assert!(wrong.contains("'w'") && wrong.contains("needs"), "{wrong}");
    let outside = edit(&|t| {
        t.external_data.iter_mut().find(|kv| kv.key == "location").unwrap().value =
            "../model.onnx.data".into()
    });
    assert!(outside.contains("'w'") && outside.contains("relative path inside"), "{outside}");
    let offset =
        edit(&|t| t.external_data.iter_mut().find(|kv| kv.key == "offset").unwrap().value = "-1".into());
    assert!(offset.contains("invalid offset"), "{offset}");
    std::fs::remove_dir_all(&dir).unwrap();
}
