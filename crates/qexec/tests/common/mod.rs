//! Shared helpers of the qexec integration tests: one-node models built with the qgraph API, and
//! straightforward reference implementations (f64 accumulation, no tricks) to judge kernels by.

#![allow(dead_code)]

use qgraph::{Attribute, DType, Graph, Model, NodeSpec, Shape, Tensor};

/// An f32 tensor from a shape and data.
pub fn f32t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape, data).unwrap()
}

/// Where a node input comes from in a one-node model.
pub enum Src {
    /// A graph input fed at run time.
    Fed(Tensor),
    /// An initializer.
    Weight(Tensor),
    /// An omitted optional input.
    Absent,
}

/// A model with one `op` node reading `inputs` and producing `outputs` graph outputs.
pub fn one_node(
    op: &str,
    inputs: Vec<Src>,
    attrs: Vec<(&str, Attribute)>,
    outputs: usize,
    opset: i64,
) -> (Model, Vec<(String, Tensor)>) {
    let mut g = Graph::new(op);
    let mut feeds = Vec::new();
    let mut ids = Vec::new();
    for (i, src) in inputs.into_iter().enumerate() {
        match src {
            Src::Fed(t) => {
                let name = format!("in{i}");
                ids.push(Some(g.add_input(&name, t.dtype(), Shape::known(t.shape()))));
                feeds.push((name, t));
            }
            Src::Weight(t) => ids.push(Some(g.add_initializer(&format!("w{i}"), t))),
            Src::Absent => ids.push(None),
        }
    }
    let node = g.add_node(NodeSpec {
        name: format!("{op}_0"),
        op_type: op.into(),
        domain: String::new(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        inputs: ids,
        outputs: (0..outputs).map(|k| format!("out{k}")).collect(),
    });
    for v in g.node(node).outputs().to_vec().into_iter().flatten() {
        g.add_output(v);
    }
    (Model::new(g, opset), feeds)
}

/// Runs a model on named feeds with `threads` threads.
pub fn run(model: Model, feeds: &[(String, Tensor)], threads: usize) -> Vec<Tensor> {
    let session = qexec::Session::new(model, qexec::SessionOptions::threads(threads)).unwrap();
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    session.run(&feeds).unwrap()
}

/// Asserts two f32 tensors agree within `tol` relative to the largest reference magnitude.
pub fn assert_close(got: &Tensor, want: &[f32], shape: &[usize], tol: f32) {
    assert_eq!(got.shape(), shape, "shape");
    assert_eq!(got.dtype(), DType::F32);
    let g = got.as_f32().unwrap();
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "element {i}: {a} vs {b}");
    }
}

/// Convolution geometry for the reference.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeo {
    pub group: usize,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
}

/// Direct NCHW convolution: x [n,c,h,w], w [m,c/g,kh,kw].
pub fn conv_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: Option<&[f32]>,
    geo: ConvGeo,
) -> (Vec<f32>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [m, cg, kh, kw] = ws;
    let span = |k: usize, d: usize| (k - 1) * d + 1;
    let oh = (h + geo.pads[0] + geo.pads[2] - span(kh, geo.dilation[0])) / geo.stride[0] + 1;
    let ow = (wd + geo.pads[1] + geo.pads[3] - span(kw, geo.dilation[1])) / geo.stride[1] + 1;
    let mg = m / geo.group;
    let mut out = vec![0f32; n * m * oh * ow];
    for ni in 0..n {
        for mi in 0..m {
            let g = mi / mg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b.map_or(0.0, |b| f64::from(b[mi]));
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * geo.stride[0] + ky * geo.dilation[0]) as isize
                                    - geo.pads[0] as isize;
                                let ix = (ox * geo.stride[1] + kx * geo.dilation[1]) as isize
                                    - geo.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((ni * c + g * cg + ci) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((mi * cg + ci) * kh + ky) * kw + kx];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    out[((ni * m + mi) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    (out, [n, m, oh, ow])
}

/// Integers as an `Ints` attribute.
pub fn ints(v: &[usize]) -> Attribute {
    Attribute::Ints(v.iter().map(|&x| x as i64).collect())
}
