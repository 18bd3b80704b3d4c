//! `Resize` (opset ≥ 10) and `Upsample`: nearest (all four rounding modes), (multi)linear and
//! cubic interpolation along any axes, one axis at a time, with every coordinate transformation
//! mode of the spec (`tf_crop_and_resize` with its region of interest and extrapolation value),
//! antialiasing (the interpolation kernel stretched by the downscale factor and renormalised),
//! `exclude_outside`, and the `keep_aspect_ratio_policy` of target sizes — the ONNX reference's
//! neighbour and weight rules throughout.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, opt_input};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "Resize" && node.op_type != "Upsample" {
        return None;
    }
    Some((|| {
        let mode = match node.string_attr("mode")?.unwrap_or("nearest") {
            "nearest" => Mode::Nearest,
            "linear" | "bilinear" => Mode::Linear,
            "cubic" | "bicubic" => Mode::Cubic,
            other => return Err(super::invalid(node, format!("Resize mode '{other}' is not supported"))),
        };
        let default_coord = if opset < 11 { "asymmetric" } else { "half_pixel" };
        let coord = node.string_attr("coordinate_transformation_mode")?.unwrap_or(default_coord).to_string();
        let policy = match node.string_attr("keep_aspect_ratio_policy")?.unwrap_or("stretch") {
            "stretch" => Policy::Stretch,
            "not_larger" => Policy::NotLarger,
            "not_smaller" => Policy::NotSmaller,
            other => return Err(super::invalid(node, format!("unknown keep_aspect_ratio_policy '{other}'"))),
        };
        let nearest = if opset < 11 {
            "floor"
        } else {
            node.string_attr("nearest_mode")?.unwrap_or("round_prefer_floor")
        };
        Ok(Box::new(Resize {
            mode,
            coord,
            nearest: nearest.to_string(),
            cubic_a: f64::from(node.float_attr("cubic_coeff_a", -0.75)?),
            exclude_outside: node.int_attr("exclude_outside", 0)? != 0,
            antialias: node.int_attr("antialias", 0)? != 0,
            extrapolation: node.float_attr("extrapolation_value", 0.0)?,
            policy,
            scales_slot: if opset < 11 { 1 } else { 2 },
            roi_slot: (opset >= 11).then_some(1),
            axes: node.ints_attr("axes")?.map(<[i64]>::to_vec),
        }) as Box<dyn Kernel>)
    })())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

/// How target sizes treat the aspect ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    Stretch,
    NotLarger,
    NotSmaller,
}

/// The input taps of one output index along an axis, or the extrapolation value
/// (`tf_crop_and_resize` outside the input).
type Taps = Option<Vec<(usize, f32)>>;

struct Resize {
    mode: Mode,
    coord: String,
    nearest: String,
    cubic_a: f64,
    exclude_outside: bool,
    antialias: bool,
    extrapolation: f32,
    policy: Policy,
    scales_slot: usize,
    roi_slot: Option<usize>,
    axes: Option<Vec<i64>>,
}

impl Resize {
    /// Input coordinate of output index `o` along an axis of `len` resized by `scale` (the
    /// spec's resized length is `len · scale`, not rounded).
    fn source(&self, o: usize, len: usize, scale: f64, roi: (f64, f64)) -> f64 {
        let o = o as f64;
        let resized = len as f64 * scale;
        match self.coord.as_str() {
            "tf_crop_and_resize" => {
                let span = (roi.1 - roi.0) * (len as f64 - 1.0);
                let x = if resized > 1.0 { o * span / (resized - 1.0) } else { span / 2.0 };
                x + roi.0 * (len as f64 - 1.0)
            }
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

    /// The interpolation kernel at distance `t` (in input pixels, scaled when antialiasing).
    fn kernel(&self, t: f64) -> f64 {
        let t = t.abs();
        match self.mode {
            Mode::Cubic => {
                let a = self.cubic_a;
                if t <= 1.0 {
                    ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
                } else if t < 2.0 {
                    ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
                } else {
                    0.0
                }
            }
            _ => (1.0 - t).max(0.0),
        }
    }

    /// For one axis: per output index, the (input index, weight) taps.
    fn taps(&self, len: usize, out: usize, scale: f64, roi: (f64, f64)) -> Vec<Taps> {
        let last = len as f64 - 1.0;
        (0..out)
            .map(|o| {
                let x = self.source(o, len, scale, roi);
                if self.coord == "tf_crop_and_resize" && !(0.0..=last).contains(&x) {
                    return None;
                }
                if self.mode == Mode::Nearest {
                    return Some(vec![(self.round(x).clamp(0.0, last) as usize, 1.0)]);
                }
                // The reference's neighbours: the pixel left of x (x itself counts as the right
                // one when whole), `n` taps from `start` around it, edge-padded.
                let (base, ratio) =
                    if x.fract() == 0.0 { (x - 1.0, 1.0) } else { (x.floor(), x - x.floor()) };
                let radius = if self.mode == Mode::Cubic { 2.0 } else { 1.0 };
                let stretch = if self.antialias { scale.min(1.0) } else { 1.0 };
                let start = (-radius / stretch).floor() as i64 + 1;
                let n = (2 - 2 * start) as usize;
                let mut taps: Vec<(i64, f64)> = (0..n as i64)
                    .map(|k| {
                        let i = start + k;
                        (base as i64 + i, self.kernel((i as f64 - ratio) * stretch))
                    })
                    .collect();
                if self.exclude_outside {
                    taps.iter_mut().filter(|(i, _)| *i < 0 || *i > last as i64).for_each(|t| t.1 = 0.0);
                }
                let sum: f64 = taps.iter().map(|t| t.1).sum();
                let norm = if (self.antialias || self.exclude_outside) && sum != 0.0 { sum } else { 1.0 };
                Some(
                    taps.into_iter()
                        .map(|(i, w)| (i.clamp(0, last as i64) as usize, (w / norm) as f32))
                        .collect(),
                )
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
        let roi = self
            .roi_slot
            .and_then(|s| opt_input(inputs, s))
            .filter(|t| !t.is_empty())
            .map(Tensor::to_f64_vec);
        let mut axis_roi = vec![(0f64, 1f64); rank];
        if let Some(r) = roi.filter(|_| self.coord == "tf_crop_and_resize") {
            let n = r.len() / 2;
            if r.len() != 2 * n || (n != rank && n != axes.len()) {
                return Err(format!("roi has {} values for {} axes", r.len(), axes.len()));
            }
            let targets: Vec<usize> = if n == rank { (0..rank).collect() } else { axes.clone() };
            for (k, &a) in targets.iter().enumerate() {
                axis_roi[a] = (r[k], r[k + n]);
            }
        }
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
            (None, Some(z)) if z.len() == axes.len() && self.policy != Policy::Stretch => {
                let ratios = axes.iter().zip(&z).map(|(&a, &t)| t as f64 / shape[a] as f64);
                let scale = if self.policy == Policy::NotLarger {
                    ratios.fold(f64::INFINITY, f64::min)
                } else {
                    ratios.fold(0.0, f64::max)
                };
                for &a in &axes {
                    axis_scale[a] = scale;
                    out_shape[a] = crate::memory::count_from_f64(
                        (shape[a] as f64 * scale + 0.5).floor(),
                        &format!("size on axis {a}"),
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
            if out_shape[a] == cur[a] && axis_scale[a] == 1.0 && self.coord != "tf_crop_and_resize" {
                continue;
            }
            if cur[a] == 0 {
                return Err("Resize of an empty axis".into());
            }
            let taps = self.taps(cur[a], out_shape[a], axis_scale[a], axis_roi[a]);
            let outer: usize = cur[..a].iter().product();
            let inner: usize = cur[a + 1..].iter().product();
            let mut next = vec![0f32; outer * out_shape[a] * inner];
            for o in 0..outer {
                for (j, tap) in taps.iter().enumerate() {
                    let dst = &mut next[(o * out_shape[a] + j) * inner..][..inner];
                    let Some(tap) = tap else {
                        dst.iter_mut().for_each(|d| *d = self.extrapolation);
                        continue;
                    };
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
