//! Signal ops of audio front ends: `DFT` (forward or inverse, real or complex input, zero-padded
//! or truncated to `dft_length`, one-sided), `STFT` (windowed frames through the same DFT), the
//! `HannWindow`/`HammingWindow`/`BlackmanWindow` generators and `MelWeightMatrix` (the ONNX
//! reference's triangular filters). Complex values are a trailing dim of 2; sums run in f64.

use std::f64::consts::PI;

use qgraph::{DType, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, norm_axis, opt_input, tensor_from};
use crate::error::{ExecError, KernelResult, Result};

enum Signal {
    Dft { axis: Option<i64>, inverse: bool, onesided: bool },
    Stft { onesided: bool },
    Window { kind: WindowKind, periodic: bool, dtype: DType },
    Mel { dtype: DType },
}

#[derive(Clone, Copy)]
enum WindowKind {
    Hann,
    Hamming,
    Blackman,
}

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    let int = |name: &str, default: i64| node.int_attr(name, default).map_err(ExecError::from);
    let dtype = || -> Result<DType> {
        let code = int("output_datatype", 1)?;
        i32::try_from(code)
            .ok()
            .and_then(DType::from_onnx)
            .ok_or_else(|| super::invalid(node, format!("output_datatype {code} is not supported")))
    };
    let window = |kind| -> Result<Signal> {
        Ok(Signal::Window { kind, periodic: int("periodic", 1)? != 0, dtype: dtype()? })
    };
    let built = match node.op_type.as_str() {
        "DFT" => (|| {
            Ok(Signal::Dft {
                axis: if opset < 20 { Some(int("axis", 1)?) } else { None },
                inverse: int("inverse", 0)? != 0,
                onesided: int("onesided", 0)? != 0,
            })
        })(),
        "STFT" => int("onesided", 1).map(|o| Signal::Stft { onesided: o != 0 }),
        "HannWindow" => window(WindowKind::Hann),
        "HammingWindow" => window(WindowKind::Hamming),
        "BlackmanWindow" => window(WindowKind::Blackman),
        "MelWeightMatrix" => dtype().map(|dtype| Signal::Mel { dtype }),
        _ => return None,
    };
    Some(built.map(|s| Box::new(s) as Box<dyn Kernel>))
}

/// The DFT of one complex sequence `x` (length ≤ n, zero-padded to n), its first `bins` outputs.
fn dft(x: &[(f64, f64)], n: usize, bins: usize, inverse: bool, out: &mut Vec<(f64, f64)>) {
    let sign = if inverse { 1.0 } else { -1.0 };
    let scale = if inverse { 1.0 / n as f64 } else { 1.0 };
    for k in 0..bins {
        let (mut re, mut im) = (0f64, 0f64);
        for (j, &(a, b)) in x.iter().enumerate().take(n) {
            let angle = sign * 2.0 * PI * ((j * k) % n) as f64 / n as f64;
            let (s, c) = angle.sin_cos();
            re += a * c - b * s;
            im += a * s + b * c;
        }
        out.push((re * scale, im * scale));
    }
}

/// The first element of a scalar integer input.
fn scalar_int(t: &Tensor, what: &str) -> KernelResult<i64> {
    ints_of(t)?.first().copied().ok_or_else(|| format!("{what} is empty"))
}

/// The first element of a scalar input, as f64.
fn scalar_f64(t: &Tensor, what: &str) -> KernelResult<f64> {
    t.to_f64_vec().first().copied().ok_or_else(|| format!("{what} is empty"))
}

fn window(kind: WindowKind, size: usize, periodic: bool) -> Vec<f64> {
    let n = if periodic { size as f64 } else { size as f64 - 1.0 };
    (0..size)
        .map(|i| {
            let t = 2.0 * PI * i as f64 / n;
            match kind {
                WindowKind::Hann => 0.5 - 0.5 * t.cos(),
                WindowKind::Hamming => 25.0 / 46.0 - 21.0 / 46.0 * t.cos(),
                WindowKind::Blackman => 0.42 - 0.5 * t.cos() + 0.08 * (2.0 * t).cos(),
            }
        })
        .collect()
}

fn mel_matrix(bins: usize, dft_length: usize, rate: f64, low: f64, high: f64) -> KernelResult<Vec<f64>> {
    let spectrum = dft_length / 2 + 1;
    let mel = |hz: f64| 2595.0 * (1.0 + hz / 700.0).log10();
    let (lo, hi) = (mel(low), mel(high));
    let step = (hi - lo) / (bins + 2) as f64;
    let points: Vec<i64> = (0..bins + 2)
        .map(|i| {
            let hz = 700.0 * (10f64.powf((i as f64 * step + lo) / 2595.0) - 1.0);
            (((dft_length + 1) as f64 * hz) / rate).floor() as i64
        })
        .collect();
    let mut out = vec![0f64; spectrum * bins];
    let mut set = |j: i64, i: usize, v: f64| -> KernelResult<()> {
        let j = usize::try_from(j).ok().filter(|&j| j < spectrum).ok_or_else(|| {
            format!("mel filter {i} reaches frequency bin {j}, beyond the {spectrum} of the spectrum")
        })?;
        out[j * bins + i] = v;
        Ok(())
    };
    for i in 0..bins {
        let (left, center, right) = (points[i], points[i + 1], points[i + 2]);
        if center == left {
            set(center, i, 1.0)?;
        } else {
            for j in left..=center {
                set(j, i, (j - left) as f64 / (center - left) as f64)?;
            }
        }
        if right > center {
            for j in center..right {
                set(j, i, (right - j) as f64 / (right - center) as f64)?;
            }
        }
    }
    Ok(out)
}

/// `values` as a tensor of `dtype` (a float type).
fn float_tensor(shape: &[usize], values: Vec<f64>, dtype: DType) -> KernelResult<Tensor> {
    let t = tensor_from(shape, values)?;
    super::movement::cast(&t, dtype)
}

impl Kernel for Signal {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        match self {
            Signal::Dft { axis, inverse, onesided } => {
                let x = input(inputs, 0)?;
                let shape = x.shape().to_vec();
                let r = shape.len();
                if r < 2 || !(shape[r - 1] == 1 || shape[r - 1] == 2) {
                    return Err(format!("the signal must end in a dim of 1 or 2, got {shape:?}"));
                }
                let axis = match axis {
                    Some(a) => *a,
                    None => opt_input(inputs, 2).map(|t| scalar_int(t, "axis")).transpose()?.unwrap_or(-2),
                };
                let axis = norm_axis(axis, r)?;
                if axis == r - 1 {
                    return Err("the DFT axis cannot be the complex dim".into());
                }
                let len = shape[axis];
                let n = match opt_input(inputs, 1).filter(|t| !t.is_empty()) {
                    Some(t) => {
                        let n = scalar_int(t, "dft_length")?;
                        usize::try_from(n)
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| format!("dft_length {n} is not positive"))?
                    }
                    None => len,
                };
                let bins = if *onesided { n / 2 + 1 } else { n };
                let mut out_shape = shape.clone();
                out_shape[axis] = bins;
                out_shape[r - 1] = 2;
                let total = ctx.checked_len(&out_shape, 4)?;
                super::bounded_steps((total / 2) as u128 * n as u128, "the DFT")?;
                let complex = shape[r - 1] == 2;
                let v = f32_data(x)?;
                let (outer, inner) = (
                    shape[..axis].iter().product::<usize>(),
                    shape[axis + 1..r - 1].iter().product::<usize>(),
                );
                let cw = shape[r - 1];
                let mut out = vec![0f64; total];
                let (mut seq, mut res) = (Vec::with_capacity(n), Vec::with_capacity(bins));
                for o in 0..outer {
                    for i in 0..inner {
                        seq.clear();
                        for j in 0..len.min(n) {
                            let at = ((o * len + j) * inner + i) * cw;
                            seq.push((f64::from(v[at]), if complex { f64::from(v[at + 1]) } else { 0.0 }));
                        }
                        res.clear();
                        dft(&seq, n, bins, *inverse, &mut res);
                        for (k, &(re, im)) in res.iter().enumerate() {
                            let at = ((o * bins + k) * inner + i) * 2;
                            out[at] = re;
                            out[at + 1] = im;
                        }
                    }
                }
                Ok(vec![float_tensor(&out_shape, out, DType::F32)?])
            }
            Signal::Stft { onesided } => {
                let x = input(inputs, 0)?;
                let shape = x.shape().to_vec();
                if shape.len() != 3 || !(shape[2] == 1 || shape[2] == 2) {
                    return Err(format!("the signal must be [batch, length, 1 or 2], got {shape:?}"));
                }
                let step = scalar_int(input(inputs, 1)?, "frame_step")?;
                let step = usize::try_from(step)
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("frame_step {step} is not positive"))?;
                let win = opt_input(inputs, 2).filter(|t| !t.is_empty()).map(f32_data).transpose()?;
                let frame = match opt_input(inputs, 3).filter(|t| !t.is_empty()) {
                    Some(t) => {
                        let f = scalar_int(t, "frame_length")?;
                        usize::try_from(f)
                            .ok()
                            .filter(|&f| f > 0)
                            .ok_or_else(|| format!("frame_length {f} is not positive"))?
                    }
                    None => win.as_ref().map_or(shape[1], |w| w.len()),
                };
                if win.as_ref().is_some_and(|w| w.len() != frame) || frame > shape[1] {
                    return Err(format!(
                        "frame length {frame} does not fit the window or a signal of {}",
                        shape[1]
                    ));
                }
                let frames = 1 + (shape[1] - frame) / step;
                let bins = if *onesided { frame / 2 + 1 } else { frame };
                let out_shape = [shape[0], frames, bins, 2];
                let total = ctx.checked_len(&out_shape, 4)?;
                super::bounded_steps((total / 2) as u128 * frame as u128, "the STFT")?;
                let (v, cw) = (f32_data(x)?, shape[2]);
                let mut out = Vec::with_capacity(total);
                let (mut seq, mut res) = (Vec::with_capacity(frame), Vec::with_capacity(bins));
                for b in 0..shape[0] {
                    for f in 0..frames {
                        seq.clear();
                        for j in 0..frame {
                            let at = (b * shape[1] + f * step + j) * cw;
                            let w = win.as_ref().map_or(1.0, |w| f64::from(w[j]));
                            let im = if cw == 2 { f64::from(v[at + 1]) } else { 0.0 };
                            seq.push((f64::from(v[at]) * w, im * w));
                        }
                        res.clear();
                        dft(&seq, frame, bins, false, &mut res);
                        out.extend(res.iter().flat_map(|&(re, im)| [re, im]));
                    }
                }
                Ok(vec![float_tensor(&out_shape, out, DType::F32)?])
            }
            Signal::Window { kind, periodic, dtype } => {
                let size = scalar_int(input(inputs, 0)?, "size")?;
                let size = ctx.checked_shape(&[size], dtype.size_of())?[0];
                Ok(vec![float_tensor(&[size], window(*kind, size, *periodic), *dtype)?])
            }
            Signal::Mel { dtype } => {
                let bins = scalar_int(input(inputs, 0)?, "num_mel_bins")?;
                let dft_length = scalar_int(input(inputs, 1)?, "dft_length")?;
                let [bins, dft_length] = ctx.checked_shape(&[bins, dft_length], 8)?[..] else {
                    return Err("internal: mel sizes".into());
                };
                ctx.checked_len(&[dft_length / 2 + 1, bins], 8)?;
                let rate = scalar_f64(input(inputs, 2)?, "sample_rate")?;
                let (low, high) = (
                    scalar_f64(input(inputs, 3)?, "lower_edge_hertz")?,
                    scalar_f64(input(inputs, 4)?, "upper_edge_hertz")?,
                );
                if !(rate > 0.0 && low.is_finite() && high.is_finite()) {
                    return Err(format!("sample rate {rate} or edges {low}…{high} are not usable"));
                }
                let m = mel_matrix(bins, dft_length, rate, low, high)?;
                Ok(vec![float_tensor(&[dft_length / 2 + 1, bins], m, *dtype)?])
            }
        }
    }
}
