//! Kernels against straightforward references on random shapes: convolutions (grouped,
//! depthwise, strided, dilated, padded, with fused activation), transposed convolutions, batched
//! MatMul, Gemm, broadcast arithmetic, pooling, softmax and QDQ rounding.

mod common;

use common::{ConvGeo, Src, assert_close, conv_ref, f32t, ints, one_node, run};
use proptest::prelude::*;
use qgraph::{Attribute, Tensor};

fn data(len: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-2.0f32..2.0, len)
}

#[derive(Debug, Clone)]
struct ConvCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    k: [usize; 2],
    geo: ConvGeo,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..3,
        1usize..4,
        1usize..4,
        4usize..12,
        4usize..12,
        1usize..4,
        1usize..4,
        1usize..3,
        1usize..3,
        1usize..3,
        0usize..3,
    )
        .prop_map(|(n, cg, groups, h, w, mg, kh, stride, dil, kw_extra, pad)| {
            let kw = (kh + kw_extra - 1).min(4);
            ConvCase {
                n,
                c: cg * groups,
                h,
                w,
                m: mg * groups,
                k: [kh, kw],
                geo: ConvGeo {
                    group: groups,
                    stride: [stride, stride],
                    dilation: [dil, 1],
                    pads: [pad, pad, pad.min(1), pad],
                },
            }
        })
        .prop_filter("kernel fits", |c| {
            c.h + c.geo.pads[0] + c.geo.pads[2] > (c.k[0] - 1) * c.geo.dilation[0]
                && c.w + c.geo.pads[1] + c.geo.pads[3] > (c.k[1] - 1) * c.geo.dilation[1]
        })
}

fn conv_attrs(k: [usize; 2], geo: ConvGeo) -> Vec<(&'static str, Attribute)> {
    vec![
        ("group", Attribute::Int(geo.group as i64)),
        ("kernel_shape", ints(&k)),
        ("strides", ints(&geo.stride)),
        ("dilations", ints(&geo.dilation)),
        ("pads", ints(&geo.pads)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn conv_matches_direct_reference(case in conv_case(), seed in 0u32..1000, threads in 1usize..3) {
        let ConvCase { n, c, h, w, m, k, geo } = case;
        let xs = [n, c, h, w];
        let ws = [m, c / geo.group, k[0], k[1]];
        let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
        let wt: Vec<f32> = (0..ws.iter().product::<usize>()).map(|i| (((i as u32).wrapping_mul(40_503) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
        let b: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 0.2).collect();
        let (want, shape) = conv_ref(&x, xs, &wt, ws, Some(&b), geo);
        let (model, feeds) = one_node(
            "Conv",
            vec![Src::Fed(f32t(&xs, x)), Src::Weight(f32t(&ws, wt)), Src::Weight(f32t(&[m], b))],
            conv_attrs(k, geo),
            1,
            13,
        );
        let got = run(model, &feeds, threads);
        assert_close(&got[0], &want, &shape, 1e-5);
    }

    #[test]
    fn broadcast_arithmetic_matches_index_reference(
        a_shape in proptest::collection::vec(1usize..4, 0..4),
        b_mask in proptest::collection::vec(any::<bool>(), 0..4),
        seed in 0u32..100,
    ) {
        // b takes a's trailing dims, some collapsed to 1 (numpy broadcasting both ways is exercised
        // by swapping operands below).
        let b_shape: Vec<usize> = a_shape.iter().rev().zip(&b_mask).map(|(&d, &keep)| if keep { d } else { 1 }).rev().collect();
        let len = |s: &[usize]| s.iter().product::<usize>();
        let a: Vec<f32> = (0..len(&a_shape)).map(|i| (i as f32 + seed as f32) * 0.37 % 3.0 - 1.5).collect();
        let b: Vec<f32> = (0..len(&b_shape)).map(|i| (i as f32 * 0.71 + 1.0) % 2.0 + 0.25).collect();
        for op in ["Add", "Sub", "Mul", "Div"] {
            for swap in [false, true] {
                let (x, xs, y, ys) = if swap { (&b, &b_shape, &a, &a_shape) } else { (&a, &a_shape, &b, &b_shape) };
                let out_shape = a_shape.clone();
                let at = |s: &[usize], idx: &[usize]| -> usize {
                    let pad = idx.len() - s.len();
                    s.iter().enumerate().fold(0, |off, (i, &d)| off * d + if d == 1 { 0 } else { idx[pad + i] })
                };
                let mut want = Vec::new();
                let mut idx = vec![0usize; out_shape.len()];
                for _ in 0..len(&out_shape) {
                    let (p, q) = (x[at(xs, &idx)], y[at(ys, &idx)]);
                    want.push(match op { "Add" => p + q, "Sub" => p - q, "Mul" => p * q, _ => p / q });
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < out_shape[d] { break; }
                        idx[d] = 0;
                    }
                }
                let (model, feeds) = one_node(op, vec![Src::Fed(f32t(xs, x.clone())), Src::Fed(f32t(ys, y.clone()))], vec![], 1, 13);
                let got = run(model, &feeds, 1);
                prop_assert_eq!(got[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), want, "{} swap {}", op, swap);
            }
        }
    }

    #[test]
    fn matmul_broadcasts_batches(batch_a in 1usize..3, batch_b in 1usize..3, m in 1usize..5, k in 1usize..6, n in 1usize..5, a in data(2 * 4 * 5), b in data(2 * 5 * 4)) {
        let (ba, bb) = (if batch_b > 1 { batch_a.max(1) } else { batch_a }, batch_b);
        let bb = if ba > 1 && bb > 1 { ba } else { bb };
        let batch = ba.max(bb);
        let av: Vec<f32> = a.iter().cycle().take(ba * m * k).copied().collect();
        let bv: Vec<f32> = b.iter().cycle().take(bb * k * n).copied().collect();
        let mut want = vec![0f32; batch * m * n];
        for i in 0..batch {
            for r in 0..m {
                for c in 0..n {
                    let s: f64 = (0..k).map(|j| f64::from(av[(i % ba) * m * k + r * k + j]) * f64::from(bv[(i % bb) * k * n + j * n + c])).sum();
                    want[(i * m + r) * n + c] = s as f32;
                }
            }
        }
        let (model, feeds) = one_node("MatMul", vec![Src::Fed(f32t(&[ba, m, k], av)), Src::Fed(f32t(&[bb, k, n], bv))], vec![], 1, 13);
        for threads in [1, 2] {
            let got = run(model.clone(), &feeds, threads);
            assert_close(&got[0], &want, &[batch, m, n], 1e-5);
        }
    }
}

#[test]
fn wide_convs_split_by_columns_or_rows_equal_one_thread_and_the_reference() {
    // Single images whose outputs are wider (oh·ow) than tall (channels), with at least 512
    // output pixels per thread, are shared out by bands of output rows on two threads, the
    // others by bands of channels; with many input channels
    // the row bands shrink to fit the cache (several per thread, in sequence on one thread).
    // All must equal one thread bit for bit, and the reference.
    let cases = [(8, 20, 6, 1, 1, 1), (6, 19, 10, 3, 2, 1), (4, 9, 40, 3, 1, 1), (3, 17, 5, 1, 1, 1)];
    let more = [(3, 45, 8, 3, 1, 2), (64, 20, 6, 3, 1, 1), (64, 12, 8, 3, 1, 1), (32, 31, 4, 3, 1, 2)];
    // A stem-like stride-2 layer on an odd width: whole 16-column runs of the unrolled rows, a few
    // pairs after them and the last column alone.
    let more = more.into_iter().chain([(3, 40, 16, 3, 1, 2)]);
    // The same shapes wide enough (at least 512 output pixels per thread) to be split by rows.
    let wide = [(8, 36, 6, 1, 1, 1), (6, 34, 10, 3, 2, 1), (3, 33, 5, 1, 1, 1), (3, 70, 8, 3, 1, 2)];
    let more = more.chain(wide).chain([(64, 34, 6, 3, 1, 1), (32, 66, 4, 3, 1, 2), (3, 68, 16, 3, 1, 2)]);
    for (c, h, m, k, group, stride) in cases.into_iter().chain(more) {
        let geo = ConvGeo { group, stride: [stride, stride], dilation: [1, 1], pads: [k / 2; 4] };
        let (xs, ws) = ([1, c, h, h + 3], [m, c / group, k, k]);
        let x: Vec<f32> = (0..xs.iter().product::<usize>()).map(|i| (i % 23) as f32 * 0.09 - 1.0).collect();
        let wt: Vec<f32> = (0..ws.iter().product::<usize>()).map(|i| (i % 13) as f32 * 0.07 - 0.4).collect();
        let b: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 0.2).collect();
        let (want, shape) = conv_ref(&x, xs, &wt, ws, Some(&b), geo);
        let (model, feeds) = one_node(
            "Conv",
            vec![Src::Fed(f32t(&xs, x)), Src::Weight(f32t(&ws, wt)), Src::Weight(f32t(&[m], b))],
            conv_attrs([k, k], geo),
            1,
            13,
        );
        let one = run(model.clone(), &feeds, 1);
        assert_close(&one[0], &want, &shape, 1e-5);
        assert_eq!(run(model, &feeds, 2)[0], one[0], "c {c} h {h} m {m} k {k}");
    }
}

#[test]
fn depthwise_with_fused_clip_matches_reference() {
    // Small planes (channel groups interleaved, 5 channels: one partial group), and planes large
    // enough for the planar kernel (blocks of 16 columns, vectorised stride split; 4 × 8 blocks
    // for narrow rows).
    let c = 5;
    let planes = [(9, 11), (6, 45), (5, 7), (70, 67), (600, 7)];
    for (stride, h, w) in [1, 2].into_iter().flat_map(|s| planes.map(|(h, w)| (s, h, w))) {
        let x: Vec<f32> = (0..2 * c * h * w).map(|i| (i % 17) as f32 * 0.3 - 2.0).collect();
        let wt: Vec<f32> = (0..c * 9).map(|i| (i % 7) as f32 * 0.2 - 0.5).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 * 0.1).collect();
        let geo = ConvGeo { group: c, stride: [stride, stride], dilation: [1, 1], pads: [1, 1, 1, 1] };
        let (conv, shape) = conv_ref(&x, [2, c, h, w], &wt, [c, 1, 3, 3], Some(&b), geo);
        let want: Vec<f32> = conv.iter().map(|v| v.clamp(0.0, 6.0)).collect();
        let mut g = qgraph::Graph::new("dw");
        let xi = g.add_input("x", qgraph::DType::F32, qgraph::Shape::known(&[2, c, h, w]));
        let wi = g.add_initializer("w", f32t(&[c, 1, 3, 3], wt.clone()));
        let bi = g.add_initializer("b", f32t(&[c], b.clone()));
        let lo = g.add_initializer("lo", Tensor::scalar(0.0f32));
        let hi = g.add_initializer("hi", Tensor::scalar(6.0f32));
        let conv_node = g.add_node(qgraph::NodeSpec {
            name: "conv".into(),
            op_type: "Conv".into(),
            domain: String::new(),
            attrs: conv_attrs([3, 3], geo).into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            inputs: vec![Some(xi), Some(wi), Some(bi)],
            outputs: vec!["y".into()],
        });
        let y = g.node(conv_node).outputs()[0];
        let clip = g.add_node(qgraph::NodeSpec {
            name: "clip".into(),
            op_type: "Clip".into(),
            domain: String::new(),
            attrs: vec![],
            inputs: vec![y, Some(lo), Some(hi)],
            outputs: vec!["z".into()],
        });
        let z = g.node(clip).outputs()[0].unwrap();
        g.add_output(z);
        let feeds = vec![("x".to_string(), f32t(&[2, c, h, w], x))];
        for threads in [1, 2] {
            let got = run(qgraph::Model::new(g.clone(), 13), &feeds, threads);
            assert_close(&got[0], &want, &shape, 1e-5);
        }
    }
}

#[test]
fn conv_transpose_matches_scatter_reference() {
    let (n, c, h, w, m, k, s) = (1, 2, 3, 4, 3, 3, 2);
    let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32 * 0.1 - 1.0).collect();
    let wt: Vec<f32> = (0..c * m * k * k).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
    let (oh, ow) = ((h - 1) * s + k - 2, (w - 1) * s + k - 2);
    let mut want = vec![0f32; m * oh * ow];
    for ci in 0..c {
        for mi in 0..m {
            for iy in 0..h {
                for ix in 0..w {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (oy, ox) = ((iy * s + ky) as isize - 1, (ix * s + kx) as isize - 1);
                            if oy >= 0 && ox >= 0 && (oy as usize) < oh && (ox as usize) < ow {
                                want[(mi * oh + oy as usize) * ow + ox as usize] +=
                                    x[(ci * h + iy) * w + ix] * wt[((ci * m + mi) * k + ky) * k + kx];
                            }
                        }
                    }
                }
            }
        }
    }
    let (model, feeds) = one_node(
        "ConvTranspose",
        vec![Src::Fed(f32t(&[n, c, h, w], x)), Src::Weight(f32t(&[c, m, k, k], wt))],
        vec![("strides", ints(&[s, s])), ("pads", ints(&[1, 1, 1, 1]))],
        1,
        13,
    );
    let got = run(model, &feeds, 1);
    assert_close(&got[0], &want, &[n, m, oh, ow], 1e-5);
}

#[test]
fn gemm_transposes_and_scales() {
    let a = f32t(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f32t(&[4, 3], (0..12).map(|i| i as f32).collect());
    let c = f32t(&[4], vec![1.0, -1.0, 0.5, 0.0]);
    let (model, feeds) = one_node(
        "Gemm",
        vec![Src::Fed(a), Src::Weight(b), Src::Weight(c)],
        vec![
            ("transA", Attribute::Int(1)),
            ("transB", Attribute::Int(1)),
            ("alpha", Attribute::Float(2.0)),
            ("beta", Attribute::Float(0.5)),
        ],
        1,
        13,
    );
    // A' = [[1,3,5],[2,4,6]], B' = B^T; Y = 2·A'·B' + 0.5·c.
    let at = [[1.0f32, 3.0, 5.0], [2.0, 4.0, 6.0]];
    let bm: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let cv = [1.0f32, -1.0, 0.5, 0.0];
    let want: Vec<f32> = (0..2)
        .flat_map(|r| (0..4).map(move |col| (r, col)))
        .map(|(r, col)| 2.0 * (0..3).map(|j| at[r][j] * bm[col * 3 + j]).sum::<f32>() + 0.5 * cv[col])
        .collect();
    assert_close(&run(model, &feeds, 1)[0], &want, &[2, 4], 1e-6);
}

#[test]
fn pools_follow_onnx_padding_rules() {
    let x = f32t(&[1, 1, 3, 3], (1..=9).map(|v| v as f32).collect());
    let attrs = |count_pad: i64| {
        vec![
            ("kernel_shape", ints(&[2, 2])),
            ("pads", ints(&[1, 1, 0, 0])),
            ("count_include_pad", Attribute::Int(count_pad)),
        ]
    };
    let (m, f) = one_node("AveragePool", vec![Src::Fed(x.clone())], attrs(0), 1, 13);
    assert_close(&run(m, &f, 1)[0], &[1.0, 1.5, 2.5, 2.5, 3.0, 4.0, 5.5, 6.0, 7.0], &[1, 1, 3, 3], 1e-6);
    let (m, f) = one_node("AveragePool", vec![Src::Fed(x.clone())], attrs(1), 1, 13);
    assert_close(&run(m, &f, 1)[0], &[0.25, 0.75, 1.25, 1.25, 3.0, 4.0, 2.75, 6.0, 7.0], &[1, 1, 3, 3], 1e-6);
    let (m, f) = one_node(
        "MaxPool",
        vec![Src::Fed(x)],
        vec![("kernel_shape", ints(&[2, 2])), ("strides", ints(&[2, 2])), ("ceil_mode", Attribute::Int(1))],
        1,
        13,
    );
    assert_close(&run(m, &f, 1)[0], &[5.0, 6.0, 8.0, 9.0], &[1, 1, 2, 2], 0.0);
}

#[test]
fn softmax_rows_sum_to_one_and_handle_large_logits() {
    let x = f32t(&[2, 3], vec![1000.0, 1001.0, 1002.0, -1.0, 0.0, 1.0]);
    let (m, f) = one_node("Softmax", vec![Src::Fed(x)], vec![], 1, 13);
    let e = [(-2f32).exp(), (-1f32).exp(), 1.0];
    let s: f32 = e.iter().sum();
    let row: Vec<f32> = e.iter().map(|v| v / s).collect();
    let want: Vec<f32> = row.iter().chain(row.iter()).copied().collect();
    assert_close(&run(m, &f, 1)[0], &want, &[2, 3], 1e-6);
}

#[test]
fn quantize_linear_rounds_half_to_even_and_saturates() {
    let x = f32t(&[6], vec![0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0]);
    let (m, f) = one_node(
        "QuantizeLinear",
        vec![Src::Fed(x), Src::Weight(Tensor::scalar(1.0f32)), Src::Weight(Tensor::scalar(0i8))],
        vec![],
        1,
        13,
    );
    let got = run(m, &f, 1);
    assert_eq!(got[0].to_i64_vec().unwrap(), vec![0, 2, 2, 0, 127, -128]);
    let q = Tensor::from_vec(&[2, 2], vec![0u8, 255, 10, 20]).unwrap();
    let (m, f) = one_node(
        "DequantizeLinear",
        vec![
            Src::Fed(q),
            Src::Weight(f32t(&[2], vec![0.5, 2.0])),
            Src::Weight(Tensor::from_vec(&[2], vec![128u8, 10]).unwrap()),
        ],
        vec![("axis", Attribute::Int(0))],
        1,
        13,
    );
    assert_close(&run(m, &f, 1)[0], &[-64.0, 63.5, 0.0, 20.0], &[2, 2], 0.0);
}

#[test]
fn short_wide_matmul_shares_columns_across_threads_bit_identically() {
    // A batch-1 transformer's tokens against a wide weight: split by columns on two threads.
    let (m, k, n) = (10, 24, 200);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.125 - 0.6).collect();
    let mut want = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            want[r * n + c] =
                (0..k).map(|j| f64::from(a[r * k + j]) * f64::from(b[j * n + c])).sum::<f64>() as f32;
        }
    }
    let (model, feeds) =
        one_node("MatMul", vec![Src::Fed(f32t(&[1, m, k], a)), Src::Fed(f32t(&[k, n], b))], vec![], 1, 13);
    let one = run(model.clone(), &feeds, 1);
    let two = run(model, &feeds, 2);
    assert_close(&two[0], &want, &[1, m, n], 1e-5);
    assert_eq!(one[0].as_f32(), two[0].as_f32());
}

#[test]
fn transpose_matches_ndarray_for_every_permutation() {
    let shape = [2usize, 1, 3, 4];
    let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let reference = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values.clone()).unwrap();
    let mut perms = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = [a, b, c, d];
                    if (0..4).all(|x| p.contains(&x)) {
                        perms.push(p);
                    }
                }
            }
        }
    }
    assert_eq!(perms.len(), 24);
    for p in perms {
        let (m, f) = one_node(
            "Transpose",
            vec![Src::Fed(f32t(&shape, values.clone()))],
            vec![("perm", ints(&p))],
            1,
            13,
        );
        let want = reference.view().permuted_axes(ndarray::IxDyn(&p));
        let want_shape: Vec<usize> = want.shape().to_vec();
        let want: Vec<f32> = want.iter().copied().collect();
        assert_close(&run(m, &f, 1)[0], &want, &want_shape, 0.0);
    }
}

#[test]
fn prelu_before_opset_7_applies_a_channel_slope_per_channel() {
    let x: Vec<f32> = (0..24).map(|i| i as f32 - 12.0).collect();
    let slope = vec![0.1f32, 0.2, 0.3];
    let want: Vec<f32> =
        x.iter().enumerate().map(|(i, &v)| if v < 0.0 { v * slope[i / 8] } else { v }).collect();
    let (model, feeds) = one_node(
        "PRelu",
        vec![Src::Fed(f32t(&[1, 3, 2, 4], x)), Src::Weight(f32t(&[3], slope))],
        vec![],
        1,
        6,
    );
    assert_close(&run(model, &feeds, 1)[0], &want, &[1, 3, 2, 4], 0.0);
}

#[test]
fn float16_tensors_run_through_f32_kernels_and_stay_float16() {
    // Conv with float16 input and weight: the f32 result rounded to float16, float16 out.
    let x: Vec<f32> = (0..2 * 5 * 5).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.25).collect();
    let w: Vec<f32> = (0..3 * 2 * 3 * 3).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.125).collect();
    let half = |v: &[f32], shape: &[usize]| {
        Tensor::from_vec(shape, v.iter().map(|&a| half::f16::from_f32(a)).collect::<Vec<_>>()).unwrap()
    };
    let (m16, feeds16) = one_node(
        "Conv",
        vec![Src::Fed(half(&x, &[1, 2, 5, 5])), Src::Weight(half(&w, &[3, 2, 3, 3]))],
        vec![("pads", ints(&[1, 1, 1, 1]))],
        1,
        13,
    );
    let (m32, feeds32) = one_node(
        "Conv",
        vec![Src::Fed(f32t(&[1, 2, 5, 5], x.clone())), Src::Weight(f32t(&[3, 2, 3, 3], w.clone()))],
        vec![("pads", ints(&[1, 1, 1, 1]))],
        1,
        13,
    );
    let got = run(m16, &feeds16, 1).remove(0);
    let want = run(m32, &feeds32, 1).remove(0);
    let Tensor::F16(got) = got else { panic!("expected a float16 output, got {}", got.dtype()) };
    for (g, w) in got.iter().zip(want.as_f32().unwrap().iter()) {
        assert_eq!(*g, half::f16::from_f32(*w));
    }
}

#[test]
fn three_d_pools_and_convs_match_their_reference() {
    // AveragePool 2×2×2, stride 2, over a [1, 1, 4, 4, 4] ramp: each output is its cube's mean.
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let (m, feeds) = one_node(
        "AveragePool",
        vec![Src::Fed(f32t(&[1, 1, 4, 4, 4], x.clone()))],
        vec![("kernel_shape", ints(&[2, 2, 2])), ("strides", ints(&[2, 2, 2]))],
        1,
        13,
    );
    let got = run(m, &feeds, 1).remove(0);
    let mean = |z: usize, y: usize, xx: usize| {
        let mut s = 0.0;
        for (dz, dy, dx) in (0..8).map(|k| (k / 4, k / 2 % 2, k % 2)) {
            s += x[(2 * z + dz) * 16 + (2 * y + dy) * 4 + 2 * xx + dx];
        }
        s / 8.0
    };
    let want: Vec<f32> = (0..8).map(|k| mean(k / 4, k / 2 % 2, k % 2)).collect();
    assert_close(&got, &want, &[1, 1, 2, 2, 2], 1e-6);
    // A 3-D Conv with a 1×1×1 kernel is a per-voxel channel mix; with pads 1 and a 3×3×3 kernel
    // of ones, the centre voxel of a 3×3×3 input of ones sums all 27.
    let ones = f32t(&[1, 1, 3, 3, 3], vec![1.0; 27]);
    let (m, feeds) = one_node(
        "Conv",
        vec![Src::Fed(ones), Src::Weight(f32t(&[1, 1, 3, 3, 3], vec![1.0; 27]))],
        vec![("pads", ints(&[1, 1, 1, 1, 1, 1]))],
        1,
        13,
    );
    let got = run(m, &feeds, 1).remove(0);
    let got = got.as_f32().unwrap();
    assert_eq!(got.shape(), &[1, 1, 3, 3, 3]);
    assert_eq!(got[[0, 0, 1, 1, 1]], 27.0);
    assert_eq!(got[[0, 0, 0, 0, 0]], 8.0);
}

#[test]
fn kernels_wider_than_their_padded_input_read_only_the_centre() {
    // Width 1, kernel 5, pads 2 (pytorch-converted test_Conv1d_pad2size1): only tap 2 sees data.
    let x = vec![0.5f32, -2.0];
    let w: Vec<f32> = (0..3 * 2 * 5).map(|i| i as f32 * 0.1).collect();
    let (m, feeds) = one_node(
        "Conv",
        vec![Src::Fed(f32t(&[1, 2, 1], x.clone())), Src::Weight(f32t(&[3, 2, 5], w.clone()))],
        vec![("pads", ints(&[2, 2]))],
        1,
        13,
    );
    let got = run(m, &feeds, 1).remove(0);
    let want: Vec<f32> = (0..3).map(|o| (0..2).map(|c| x[c] * w[(o * 2 + c) * 5 + 2]).sum()).collect();
    assert_close(&got, &want, &[1, 3, 1], 1e-6);
}

#[test]
fn einsum_as_one_product_equals_the_general_walk() {
    // Each equation once as two operands (the batched-product path) and once with a third
    // operand of a single 1 under a fresh label (the general path).
    let cases: [(&str, &[usize], &[usize]); 5] = [
        ("bhid,bhjd->bhij", &[2, 3, 4, 5], &[2, 3, 6, 5]),
        ("ij,jk->ik", &[3, 4], &[4, 5]),
        ("ij,kj->ki", &[3, 4], &[5, 4]),
        ("bij,bjk->bki", &[2, 3, 4], &[2, 4, 5]),
        ("i,i->", &[7], &[7]),
    ];
    for (eq, sa, sb) in cases {
        let fill = |shape: &[usize], seed: usize| -> Tensor {
            let n: usize = shape.iter().product();
            f32t(shape, (0..n).map(|i| ((i * 7 + seed) % 11) as f32 * 0.25 - 1.0).collect())
        };
        let (a, b) = (fill(sa, 1), fill(sb, 5));
        let string = |s: &str| Attribute::String(s.as_bytes().to_vec());
        let (m2, f2) = one_node(
            "Einsum",
            vec![Src::Fed(a.clone()), Src::Fed(b.clone())],
            vec![("equation", string(eq))],
            1,
            12,
        );
        let (lhs, rhs) = eq.split_once("->").unwrap();
        let three = format!("{lhs},z->{rhs}");
        let (m3, f3) = one_node(
            "Einsum",
            vec![Src::Fed(a), Src::Fed(b), Src::Fed(f32t(&[1], vec![1.0]))],
            vec![("equation", string(&three))],
            1,
            12,
        );
        let (fast, walk) = (run(m2, &f2, 1).remove(0), run(m3, &f3, 1).remove(0));
        let want: Vec<f32> = walk.as_f32().unwrap().iter().copied().collect();
        assert_close(&fast, &want, walk.shape(), 1e-5);
    }
}
