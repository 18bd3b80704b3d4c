//! The box ops of exported detectors: `NonMaxSuppression` (greedy per batch and class, as
//! onnxruntime orders ties: higher score first, then lower box index) and `RoiAlign` (average or
//! max of bilinear samples on a per-bin grid, onnxruntime's sampling and edge rules).

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, opt_input, tensor_from};
use crate::error::{ExecError, KernelResult, Result};

struct NonMaxSuppression {
    center_point_box: bool,
}

struct RoiAlign {
    half_pixel: bool,
    max: bool,
    out_h: usize,
    out_w: usize,
    sampling_ratio: usize,
    spatial_scale: f32,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    match node.op_type.as_str() {
        "NonMaxSuppression" => Some((|| {
            let center_point_box = node.int_attr("center_point_box", 0)? != 0;
            Ok(Box::new(NonMaxSuppression { center_point_box }) as Box<dyn Kernel>)
        })()),
        "RoiAlign" => Some((|| {
            let size = |name: &str, default: i64| -> Result<usize> {
                let v = node.int_attr(name, default)?;
                usize::try_from(v)
                    .ok()
                    .filter(|&v| v <= 1 << 16)
                    .ok_or_else(|| super::invalid(node, format!("{name} {v} is not in 0..=65536")))
            };
            let half_pixel = match node.string_attr("coordinate_transformation_mode")?.unwrap_or("half_pixel")
            {
                "half_pixel" => true,
                "output_half_pixel" => false,
                other => {
                    return Err(super::invalid(
                        node,
                        format!("unknown coordinate_transformation_mode '{other}'"),
                    ));
                }
            };
            let max = match node.string_attr("mode")?.unwrap_or("avg") {
                "avg" => false,
                "max" => true,
                other => return Err(super::invalid(node, format!("unknown mode '{other}'"))),
            };
            Ok(Box::new(RoiAlign {
                half_pixel,
                max,
                out_h: size("output_height", 1)?.max(1),
                out_w: size("output_width", 1)?.max(1),
                sampling_ratio: size("sampling_ratio", 0)?,
                spatial_scale: node.float_attr("spatial_scale", 1.0).map_err(ExecError::from)?,
            }) as Box<dyn Kernel>)
        })()),
        _ => None,
    }
}

/// A box as (y_min, x_min, y_max, x_max).
fn corners(b: &[f32], center: bool) -> [f32; 4] {
    if center {
        let (xc, yc, w, h) = (b[0], b[1], b[2], b[3]);
        [yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]
    } else {
        [b[0].min(b[2]), b[1].min(b[3]), b[0].max(b[2]), b[1].max(b[3])]
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let (aa, ab) = (area(a), area(b));
    if aa <= 0.0 || ab <= 0.0 {
        return 0.0;
    }
    let h = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let w = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = h * w;
    let union = aa + ab - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// The first element of an optional scalar input.
fn scalar_f32(t: Option<&Tensor>) -> KernelResult<Option<f32>> {
    t.map(|t| f32_data(t).map(|v| v.first().copied())).transpose().map(Option::flatten)
}

impl Kernel for NonMaxSuppression {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tb, ts) = (input(inputs, 0)?, input(inputs, 1)?);
        let (bs, ss) = (tb.shape(), ts.shape());
        if bs.len() != 3 || bs[2] != 4 || ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
            return Err(format!("boxes {bs:?} and scores {ss:?} do not agree"));
        }
        let max_out = opt_input(inputs, 2)
            .map(ints_of)
            .transpose()?
            .and_then(|v| v.first().copied())
            .unwrap_or(0)
            .max(0) as usize;
        let iou_threshold = scalar_f32(opt_input(inputs, 3))?.unwrap_or(0.0);
        let score_threshold = scalar_f32(opt_input(inputs, 4))?;
        let (boxes, scores) = (f32_data(tb)?, f32_data(ts)?);
        let (batches, classes, n) = (ss[0], ss[1], ss[2]);
        let mut selected: Vec<i64> = Vec::new();
        let mut order: Vec<usize> = Vec::with_capacity(n);
        let mut kept: Vec<[f32; 4]> = Vec::new();
        for b in 0..batches {
            let all: Vec<[f32; 4]> =
                (0..n).map(|i| corners(&boxes[(b * n + i) * 4..][..4], self.center_point_box)).collect();
            for c in 0..classes {
                let s = &scores[(b * classes + c) * n..][..n];
                order.clear();
                order.extend((0..n).filter(|&i| score_threshold.is_none_or(|t| s[i] > t)));
                order.sort_by(|&i, &j| s[j].partial_cmp(&s[i]).unwrap_or(std::cmp::Ordering::Equal));
                kept.clear();
                for &i in &order {
                    if kept.len() >= max_out {
                        break;
                    }
                    if kept.iter().all(|k| iou(k, &all[i]) <= iou_threshold) {
                        kept.push(all[i]);
                        selected.extend([b as i64, c as i64, i as i64]);
                    }
                }
            }
        }
        let count = selected.len() / 3;
        Ok(vec![tensor_from(&[count, 3], selected)?])
    }
}

/// One bilinear sample: the four cells it reads and their weights (all zero outside the map).
fn bilinear(y: f32, x: f32, h: usize, w: usize) -> ([usize; 4], [f32; 4]) {
    let (hf, wf) = (h as f32, w as f32);
    if y < -1.0 || y > hf || x < -1.0 || x > wf {
        return ([0; 4], [0.0; 4]);
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut yl, mut xl) = (y as usize, x as usize);
    let yh = if yl >= h - 1 {
        yl = h - 1;
        y = yl as f32;
        yl
    } else {
        yl + 1
    };
    let xh = if xl >= w - 1 {
        xl = w - 1;
        x = xl as f32;
        xl
    } else {
        xl + 1
    };
    let (ly, lx) = (y - yl as f32, x - xl as f32);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    ([yl * w + xl, yl * w + xh, yh * w + xl, yh * w + xh], [hy * hx, hy * lx, ly * hx, ly * lx])
}

impl Kernel for RoiAlign {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, tr, tb) = (input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?);
        let xs = tx.shape();
        let [n, c, h, w] = *xs else { return Err(format!("input must be 4-D, got {xs:?}")) };
        let r = tr.shape().first().copied().unwrap_or(0);
        if tr.shape() != [r, 4] || tb.shape() != [r] {
            return Err(format!("rois {:?} and batch indices {:?} do not agree", tr.shape(), tb.shape()));
        }
        let (oh, ow) = (self.out_h, self.out_w);
        let shape = [r, c, oh, ow];
        let total = ctx.checked_len(&shape, 4)?;
        let (x, rois, batch) = (f32_data(tx)?, f32_data(tr)?, ints_of(tb)?);
        let mut out = vec![0f32; total];
        if h == 0 || w == 0 {
            return Ok(vec![tensor_from(&shape, out)?]);
        }
        let offset = if self.half_pixel { 0.5 } else { 0.0 };
        for ri in 0..r {
            let img = usize::try_from(batch[ri])
                .ok()
                .filter(|&b| b < n)
                .ok_or_else(|| format!("batch index {} is out of range for a batch of {n}", batch[ri]))?;
            let roi = &rois[ri * 4..][..4];
            let (x0, y0) = (roi[0] * self.spatial_scale - offset, roi[1] * self.spatial_scale - offset);
            let (x1, y1) = (roi[2] * self.spatial_scale - offset, roi[3] * self.spatial_scale - offset);
            let (mut rw, mut rh) = (x1 - x0, y1 - y0);
            if !self.half_pixel {
                rw = rw.max(1.0);
                rh = rh.max(1.0);
            }
            let (bin_h, bin_w) = (rh / oh as f32, rw / ow as f32);
            let grid = |extent: f32, bins: usize| -> usize {
                if self.sampling_ratio > 0 {
                    self.sampling_ratio
                } else {
                    ((extent / bins as f32).ceil().max(0.0) as usize).min(1 << 16)
                }
            };
            let (gh, gw) = (grid(rh, oh), grid(rw, ow));
            super::bounded_steps((gh * gw) as u128 * (oh * ow * c) as u128, "the RoI sampling")?;
            let count = (gh * gw).max(1) as f32;
            for ph in 0..oh {
                for pw in 0..ow {
                    let samples: Vec<([usize; 4], [f32; 4])> = (0..gh)
                        .flat_map(|iy| {
                            let y = y0 + ph as f32 * bin_h + (iy as f32 + 0.5) * bin_h / gh as f32;
                            (0..gw).map(move |ix| {
                                let xx = x0 + pw as f32 * bin_w + (ix as f32 + 0.5) * bin_w / gw as f32;
                                bilinear(y, xx, h, w)
                            })
                        })
                        .collect();
                    for ch in 0..c {
                        let plane = &x[(img * c + ch) * h * w..][..h * w];
                        let v = if samples.is_empty() {
                            0.0
                        } else if self.max {
                            samples.iter().fold(f32::NEG_INFINITY, |m, (at, wt)| {
                                (0..4).fold(m, |m, k| m.max(wt[k] * plane[at[k]]))
                            })
                        } else {
                            samples
                                .iter()
                                .map(|(at, wt)| (0..4).map(|k| wt[k] * plane[at[k]]).sum::<f32>())
                                .sum::<f32>()
                                / count
                        };
                        out[((ri * c + ch) * oh + ph) * ow + pw] = v;
                    }
                }
            }
        }
        Ok(vec![tensor_from(&shape, out)?])
    }
}
