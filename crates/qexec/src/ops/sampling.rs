//! Sampling at computed coordinates: `GridSample` (nearest, linear and cubic, with zeros, border
//! or reflection padding, over any number of spatial dims) and `AffineGrid`, which builds the
//! grids spatial-transformer models feed it. Coordinates follow the ONNX reference: normalised
//! −1…1 mapped to pixel positions by `align_corners`, out-of-range positions clamped or
//! reflected before interpolation, and every tap read through the padding mode.

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, input, ints_of, strides_of, tensor_from};
use crate::error::{ExecError, KernelResult, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Padding {
    Zeros,
    Border,
    Reflection,
}

struct GridSample {
    mode: Mode,
    padding: Padding,
    align_corners: bool,
}

struct AffineGrid {
    align_corners: bool,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let align = || node.int_attr("align_corners", 0).map(|v| v != 0).map_err(ExecError::from);
    match node.op_type.as_str() {
        "GridSample" => Some((|| {
            let mode = match node.string_attr("mode")?.unwrap_or("linear") {
                "nearest" => Mode::Nearest,
                "linear" | "bilinear" => Mode::Linear,
                "cubic" | "bicubic" => Mode::Cubic,
                other => return Err(super::invalid(node, format!("unknown mode '{other}'"))),
            };
            let padding = match node.string_attr("padding_mode")?.unwrap_or("zeros") {
                "zeros" => Padding::Zeros,
                "border" => Padding::Border,
                "reflection" => Padding::Reflection,
                other => return Err(super::invalid(node, format!("unknown padding_mode '{other}'"))),
            };
            Ok(Box::new(GridSample { mode, padding, align_corners: align()? }) as Box<dyn Kernel>)
        })()),
        "AffineGrid" => {
            Some(align().map(|align_corners| Box::new(AffineGrid { align_corners }) as Box<dyn Kernel>))
        }
        _ => None,
    }
}

/// `x` folded into `[lo, hi]` by reflecting at the bounds (repeatedly, for far-out positions).
fn reflect(x: f32, lo: f32, hi: f32) -> f32 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    let fold = |d: f32| {
        let n = (d / range).floor();
        (d - n * range, n as i64 % 2 == 0)
    };
    if x < lo {
        let (r, even) = fold(lo - x);
        if even { lo + r } else { hi - r }
    } else if x > hi {
        let (r, even) = fold(x - hi);
        if even { hi - r } else { lo + r }
    } else {
        x
    }
}

/// The cubic convolution weights (A = −0.75) of the four taps around a fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

impl GridSample {
    /// The lowest and highest pixel position of a dim of `len`.
    fn bounds(&self, len: usize) -> (f32, f32) {
        if self.align_corners { (0.0, len as f32 - 1.0) } else { (-0.5, len as f32 - 0.5) }
    }

    /// The pixel position of normalised coordinate `g` on a dim of `len`, after padding.
    fn position(&self, g: f32, len: usize) -> f32 {
        let n = len as f32;
        let x = if self.align_corners { (g + 1.0) / 2.0 * (n - 1.0) } else { ((g + 1.0) * n - 1.0) / 2.0 };
        let (lo, hi) = self.bounds(len);
        if x >= lo && x <= hi {
            return x;
        }
        match self.padding {
            Padding::Zeros => x,
            Padding::Border => x.clamp(0.0, n - 1.0),
            Padding::Reflection => reflect(x, lo, hi),
        }
    }

    /// The index a tap at integer position `i` reads on a dim of `len`, or None (a zero).
    fn tap(&self, i: i64, len: usize) -> Option<usize> {
        let last = len as i64 - 1;
        let i = match self.padding {
            _ if (0..=last).contains(&i) => i,
            Padding::Zeros => return None,
            Padding::Border => i.clamp(0, last),
            Padding::Reflection => {
                let (lo, hi) = self.bounds(len);
                (reflect(i as f32, lo, hi) as i64).clamp(0, last)
            }
        };
        Some(i as usize)
    }
}

impl Kernel for GridSample {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tx, tg) = (input(inputs, 0)?, input(inputs, 1)?);
        let (xs, gs) = (tx.shape().to_vec(), tg.shape().to_vec());
        let r = xs.len().saturating_sub(2);
        if r == 0 || gs.len() != xs.len() || gs[0] != xs[0] || gs[gs.len() - 1] != r {
            return Err(format!("grid {gs:?} does not fit input {xs:?}"));
        }
        if r > 8 {
            return Err(format!("{r} spatial dims, more than GridSample's 8"));
        }
        if xs[2..].contains(&0) {
            return Err(format!("input {xs:?} has an empty spatial dim to sample from"));
        }
        let (x, grid) = (f32_data(tx)?, f32_data(tg)?);
        let (n, c) = (xs[0], xs[1]);
        let spatial = &xs[2..];
        let out_dims = &gs[1..gs.len() - 1];
        let mut shape = vec![n, c];
        shape.extend_from_slice(out_dims);
        let total = ctx.checked_len(&shape, 4)?;
        let cells: usize = out_dims.iter().product();
        let plane: usize = spatial.iter().product();
        let strides = strides_of(spatial);
        let taps_per_dim: usize = match self.mode {
            Mode::Nearest => 1,
            Mode::Linear => 2,
            Mode::Cubic => 4,
        };
        let combos = taps_per_dim.pow(r as u32);
        super::bounded_steps(total as u128 * combos as u128, "the sampling")?;
        let mut out = vec![0f32; total];
        // Per dim: (first tap position, weights of the taps).
        let mut per_dim: Vec<(i64, [f32; 4])> = vec![(0, [0.0; 4]); r];
        for img in 0..n {
            for cell in 0..cells {
                let g = &grid[(img * cells + cell) * r..][..r];
                for d in 0..r {
                    // The grid lists x (the last dim) first.
                    let p = self.position(g[r - 1 - d], spatial[d]);
                    per_dim[d] = match self.mode {
                        Mode::Nearest => (p.round_ties_even() as i64, [1.0, 0.0, 0.0, 0.0]),
                        Mode::Linear => {
                            let f = p.floor();
                            (f as i64, [1.0 - (p - f), p - f, 0.0, 0.0])
                        }
                        Mode::Cubic => {
                            let f = p.floor();
                            (f as i64 - 1, cubic_weights(p - f))
                        }
                    };
                }
                for ch in 0..c {
                    let src = &x[(img * c + ch) * plane..][..plane];
                    let mut acc = 0f32;
                    for combo in 0..combos {
                        let (mut at, mut weight, mut rest) = (0usize, 1f32, combo);
                        for d in (0..r).rev() {
                            let k = rest % taps_per_dim;
                            rest /= taps_per_dim;
                            let (first, w) = per_dim[d];
                            match self.tap(first + k as i64, spatial[d]) {
                                Some(i) => {
                                    at += i * strides[d];
                                    weight *= w[k];
                                }
                                None => weight = 0.0,
                            }
                        }
                        if weight != 0.0 {
                            acc += weight * src[at];
                        }
                    }
                    out[(img * c + ch) * cells + cell] = acc;
                }
            }
        }
        Ok(vec![tensor_from(&shape, out)?])
    }
}

impl Kernel for AffineGrid {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (tt, size) = (input(inputs, 0)?, input(inputs, 1)?);
        let size = ints_of(size)?;
        let r = size.len().saturating_sub(2);
        let ts = tt.shape();
        if !(r == 2 || r == 3) || ts != [size[0].max(0) as usize, r, r + 1] {
            return Err(format!("theta {ts:?} does not fit size {size:?}"));
        }
        let dims = ctx.checked_shape(&size[2..], 4)?;
        let n = ts[0];
        let mut shape = vec![n];
        shape.extend(&dims);
        shape.push(r);
        ctx.checked_len(&shape, 4)?;
        let theta = f32_data(tt)?;
        let base = |i: usize, len: usize| -> f32 {
            if self.align_corners {
                if len > 1 { i as f32 * 2.0 / (len as f32 - 1.0) - 1.0 } else { 0.0 }
            } else {
                (2.0 * i as f32 + 1.0) / len as f32 - 1.0
            }
        };
        let cells: usize = dims.iter().product();
        let strides = strides_of(&dims);
        let mut out: Vec<f32> = Vec::with_capacity(n * cells * r);
        let mut point = vec![0f32; r + 1];
        for img in 0..n {
            let th = &theta[img * r * (r + 1)..][..r * (r + 1)];
            for cell in 0..cells {
                // Homogeneous point (x, y[, z], 1): x runs over the last dim.
                for d in 0..r {
                    point[r - 1 - d] = base((cell / strides[d]) % dims[d], dims[d]);
                }
                point[r] = 1.0;
                for row in 0..r {
                    out.push((0..=r).map(|k| th[row * (r + 1) + k] * point[k]).sum());
                }
            }
        }
        Ok(vec![tensor_from(&shape, out)?])
    }
}
