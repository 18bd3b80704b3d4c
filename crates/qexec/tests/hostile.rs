//! Data-driven sizes and indices of the index, detection, signal and contraction ops: every
//! hostile value is a one-line error from `run`, never a panic, an abort or a hang.

mod common;

use common::{Src, f32t, one_node};
use qgraph::{Attribute, Tensor};

/// Runs a one-node model and returns its error message (the test fails if it succeeds).
fn error_of(op: &str, inputs: Vec<Src>, attrs: Vec<(&str, Attribute)>, outputs: usize, opset: i64) -> String {
    let (model, feeds) = one_node(op, inputs, attrs, outputs, opset);
    let session = qexec::Session::new(model, qexec::SessionOptions::threads(1)).unwrap();
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    match session.run(&feeds) {
        Ok(_) => panic!("{op} accepted hostile input"),
        Err(e) => e.to_string(),
    }
}

fn i64t(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::from_vec(shape, v).unwrap()
}

#[test]
fn out_of_range_indices_are_errors() {
    let x = f32t(&[2, 3], vec![0.0; 6]);
    let e =
        error_of("GatherND", vec![Src::Fed(x.clone()), Src::Fed(i64t(&[1, 2], vec![5, 0]))], vec![], 1, 13);
    assert!(e.contains("out of range"), "{e}");
    let e = error_of(
        "ScatterND",
        vec![Src::Fed(x.clone()), Src::Fed(i64t(&[1, 1], vec![-3])), Src::Fed(f32t(&[1, 3], vec![1.0; 3]))],
        vec![],
        1,
        13,
    );
    assert!(e.contains("out of range"), "{e}");
    let e = error_of("TopK", vec![Src::Fed(x.clone()), Src::Fed(i64t(&[1], vec![4]))], vec![], 2, 11);
    assert!(e.contains("K 4"), "{e}");
    let e = error_of(
        "MaxUnpool",
        vec![Src::Fed(f32t(&[1, 1, 1, 1], vec![1.0])), Src::Fed(i64t(&[1, 1, 1, 1], vec![1 << 40]))],
        vec![("kernel_shape", Attribute::Ints(vec![2, 2]))],
        1,
        11,
    );
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn sizes_from_data_go_through_the_memory_guard() {
    let e = error_of(
        "OneHot",
        vec![
            Src::Fed(i64t(&[4], vec![0, 1, 2, 3])),
            Src::Fed(i64t(&[], vec![1 << 50])),
            Src::Fed(f32t(&[2], vec![0.0, 1.0])),
        ],
        vec![],
        1,
        11,
    );
    assert!(e.contains("bytes") || e.contains("limit"), "{e}");
    let e = error_of("HannWindow", vec![Src::Fed(i64t(&[], vec![1 << 45]))], vec![], 1, 17);
    assert!(e.contains("bytes") || e.contains("limit"), "{e}");
}

#[test]
fn naive_work_is_bounded_instead_of_hanging() {
    // A DFT of 2^20 points on 2^10 sequences: 2^50 steps, refused at once.
    let x = f32t(&[1024, 1, 1], vec![1.0; 1024]);
    let e = error_of(
        "DFT",
        vec![Src::Fed(x), Src::Fed(i64t(&[], vec![1 << 20]))],
        vec![("axis", Attribute::Int(1))],
        1,
        17,
    );
    assert!(e.contains("steps"), "{e}");
}

#[test]
fn a_huge_contraction_is_refused() {
    // An Einsum whose operands each have 2^12 elements but whose contraction has 2^48 terms.
    let v = || Src::Fed(f32t(&[4096], vec![1.0; 4096]));
    let e = error_of(
        "Einsum",
        vec![v(), v(), v(), v()],
        vec![("equation", Attribute::String(b"a,b,c,d->".to_vec()))],
        1,
        12,
    );
    assert!(e.contains("steps"), "{e}");
}
