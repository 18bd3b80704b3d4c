//! `Resize` (opset ≥ 10) and `Upsample`: nearest (all four rounding modes) and (multi)linear
//! interpolation along any axes, with every coordinate transformation mode of the spec except
//! `tf_crop_and_resize`. Cubic mode is reported as unsupported when planning.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, opt_input};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "Resize" && node.op_type != "Upsample" {
        return None;
    }
    Some((|| {
        let mode = node.string_attr("mode")?.unwrap_or("nearest").to_string();
        let linear = match mode.as_str() {
            "nearest" => false,
            "linear" | "bilinear" => true,
            other => return Err(super::invalid(node, format!("Resize mode '{other}' is not supported"))),
        };
        let default_coord = if opset < 11 { "asymmetric" } else { "half_pixel" };
        let coord = node.string_attr("coordinate_transformation_mode")?.unwrap_or(default_coord).to_string();
        if coord == "tf_crop_and_resize" {
            return Err(super::invalid(
                node,
                "coordinate_transformation_mode tf_crop_and_resize is not supported",
            ));
        }
        if node.int_attr("antialias", 0)? != 0 {
            return Err(super::invalid(node, "antialiased Resize is not supported"));
        }
        if node.string_attr("keep_aspect_ratio_policy")?.is_some_and(|p| p != "stretch") {
            return Err(super::invalid(
                node,
                "keep_aspect_ratio_policy other than 'stretch' is not supported",
            ));
        }
        let nearest = if opset < 11 {
            "floor"
        } else {
            node.string_attr("nearest_mode")?.unwrap_or("round_prefer_floor")
        };
        Ok(Box::new(Resize {
            linear,
            coord,
            nearest: nearest.to_string(),
            scales_slot: if opset < 11 { 1 } else { 2 },
            axes: node.ints_attr("axes")?.map(<[i64]>::to_vec),
        }) as Box<dyn Kernel>)
    })())
}

struct Resize {
    linear: bool,
    coord: String,
    nearest: String,
    scales_slot: usize,
    axes: Option<Vec<i64>>,
}

impl Resize {
    /// Input coordinate of output index `o` along an axis of `len` resized by `scale` (the
    /// spec's resized length is `len · scale`, not rounded).
    fn source(&self, o: usize, len: usize, scale: f64) -> f64 {
        let o = o as f64;
        let resized = len as f64 * scale;
        match self.coord.as_str() {
            "asymmetric" => o / scale,
            "align_corners" if resized > 1.0 => o * (len as f64 - 1.0) / (resized - 1.0),
            "align_corners" => 0.0,
            "pytorch_half_pixel" if resized > 1.0 => (o + 0.5) / scale - 0.5,
            "pytorch_half_pixel" => 0.0,
            "tf_half_pixel_for_nn" => (o + 0.5) / scale,
            "half_pixel_symmetric" => {
                let adj = resized.floor() / resized;
                let center = len as f64 / 2.0;
                center * (1.0 - adj) + (o + 0.5) / scale - 0.5
            }
            _ => (o + 0.5) / scale - 0.5,
        }
    }

    fn round(&self, x: f64) -> f64 {
        match self.nearest.as_str() {
            "floor" => x.floor(),
            "ceil" => x.ceil(),
            "round_prefer_ceil" => (x + 0.5).floor(),
            _ => {
                if x.fract() == 0.5 || x.fract() == -0.5 {
                    x.floor()
                } else {
                    x.round()
                }
            }
        }
    }

    /// For one axis: per output index, the (input index, weight) taps.
    fn taps(&self, len: usize, out: usize, scale: f64) -> Vec<Vec<(usize, f32)>> {
        let last = len as f64 - 1.0;
        (0..out)
            .map(|o| {
                let x = self.source(o, len, scale);
                if self.linear {
                    let x = x.clamp(0.0, last);
                    let i0 = x.floor();
                    let f = (x - i0) as f32;
                    let i1 = (i0 + 1.0).min(last);
                    vec![(i0 as usize, 1.0 - f), (i1 as usize, f)]
                } else {
                    vec![(self.round(x).clamp(0.0, last) as usize, 1.0)]
                }
            })
            .collect()
    }
}

impl Kernel for Resize {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let shape = x.shape().to_vec();
        let rank = shape.len();
        let axes: Vec<usize> = match &self.axes {
            Some(a) => a.iter().map(|&v| super::norm_axis(v, rank)).collect::<KernelResult<_>>()?,
            None => (0..rank).collect(),
        };
        let scales =
            opt_input(inputs, self.scales_slot).filter(|t| !t.is_empty()).map(f32_data).transpose()?;
        let sizes = opt_input(inputs, 3).filter(|t| !t.is_empty()).map(ints_of).transpose()?;
        let mut out_shape = shape.clone();
        let mut axis_scale = vec![1f64; rank];
        match (scales, sizes) {
            (Some(s), _) if s.len() == axes.len() => {
                for (k, &a) in axes.iter().enumerate() {
                    axis_scale[a] = f64::from(s[k]);
                    out_shape[a] = crate::memory::count_from_f64(
                        (shape[a] as f64 * f64::from(s[k])).floor(),
                        &format!("scale {} on axis {a}", s[k]),
                    )?;
                }
            }
            (None, Some(z)) if z.len() == axes.len() => {
                for (k, &a) in axes.iter().enumerate() {
                    out_shape[a] = z[k].max(0) as usize;
                    axis_scale[a] = out_shape[a] as f64 / shape[a] as f64;
                }
            }
            _ => return Err("Resize needs scales or sizes with one value per axis".into()),
        }
        ctx.checked_len(&out_shape, 4)?;
        let mut data: Vec<f32> = f32_data(x)?.into_owned();
        let mut cur = shape.clone();
        for a in 0..rank {
            if out_shape[a] == cur[a] && axis_scale[a] == 1.0 {
                continue;
            }
            if cur[a] == 0 {
                return Err("Resize of an empty axis".into());
            }
            let taps = self.taps(cur[a], out_shape[a], axis_scale[a]);
            let outer: usize = cur[..a].iter().product();
            let inner: usize = cur[a + 1..].iter().product();
            let mut next = vec![0f32; outer * out_shape[a] * inner];
            for o in 0..outer {
                for (j, tap) in taps.iter().enumerate() {
                    let dst = &mut next[(o * out_shape[a] + j) * inner..][..inner];
                    for &(i, w) in tap {
                        let src = &data[(o * cur[a] + i) * inner..][..inner];
                        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += w * s);
                    }
                }
            }
            data = next;
            cur[a] = out_shape[a];
        }
        Ok(vec![super::tensor_from(&out_shape, data)?])
    }
}
