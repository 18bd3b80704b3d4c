//! Vector-Jacobian rules of pooling (MaxPool, AveragePool, their global forms) over 1 to 3
//! spatial dims: each output's gradient goes back to the input taps of its window — all of them
//! for averages (divided by the count the forward divided by), the first largest for maxima.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use qgraph::Node;

use super::rules::NodeGrad;
use super::unsupported;
use crate::error::{Result, shape_error};

/// A pooling window's geometry, spatial dims padded in front to three.
struct Window {
    kernel: [usize; 3],
    stride: [usize; 3],
    dilation: [usize; 3],
    /// Padding before each spatial dim.
    begin: [usize; 3],
    input: [usize; 3],
    output: [usize; 3],
    /// Padding after each spatial dim (what `count_include_pad` counts).
    end: [usize; 3],
}

fn padded3(v: &[usize], fill: usize) -> [usize; 3] {
    let mut out = [fill; 3];
    out[3 - v.len()..].copy_from_slice(v);
    out
}

impl Window {
    fn of(node: &Node, x: &[usize], y: &[usize]) -> Result<Window> {
        let op = node.name.as_str();
        let rank = x.len().saturating_sub(2);
        if !(1..=3).contains(&rank) || y.len() != x.len() {
            return Err(shape_error(op, format!("input {x:?}, output {y:?}: 1 to 3 spatial dims expected")));
        }
        let ints = |name: &str, default: usize| -> Result<Vec<usize>> {
            match node.ints_attr(name)? {
                Some(v) if v.len() == rank && v.iter().all(|&d| d >= 0) => {
                    Ok(v.iter().map(|&d| d as usize).collect())
                }
                Some(v) => Err(shape_error(op, format!("{name} {v:?} for {rank} spatial dims"))),
                None => Ok(vec![default; rank]),
            }
        };
        let kernel = match node.ints_attr("kernel_shape")? {
            Some(_) => ints("kernel_shape", 1)?,
            None => return Err(shape_error(op, "no kernel_shape")),
        };
        let stride = ints("strides", 1)?;
        let dilation = ints("dilations", 1)?;
        if kernel.iter().chain(&stride).chain(&dilation).any(|&d| d == 0) {
            return Err(shape_error(op, "a zero kernel, stride or dilation"));
        }
        let (xs, ys) = (&x[2..], &y[2..]);
        let auto_pad = node.string_attr("auto_pad")?.unwrap_or("NOTSET");
        let (begin, end): (Vec<usize>, Vec<usize>) = match auto_pad {
            "NOTSET" => {
                let pads = match node.ints_attr("pads")? {
                    Some(p) if p.len() == 2 * rank && p.iter().all(|&d| d >= 0) => {
                        p.iter().map(|&d| d as usize).collect()
                    }
                    Some(p) => return Err(shape_error(op, format!("pads {p:?} for {rank} spatial dims"))),
                    None => vec![0; 2 * rank],
                };
                (pads[..rank].to_vec(), pads[rank..].to_vec())
            }
            "VALID" => (vec![0; rank], vec![0; rank]),
            "SAME_UPPER" | "SAME_LOWER" => (0..rank)
                .map(|i| {
                    let span = (kernel[i] - 1) * dilation[i] + 1;
                    let total = ((ys[i].max(1) - 1) * stride[i] + span).saturating_sub(xs[i]);
                    let small = total / 2;
                    if auto_pad == "SAME_UPPER" { (small, total - small) } else { (total - small, small) }
                })
                .unzip(),
            other => return Err(shape_error(op, format!("auto_pad {other}"))),
        };
        Ok(Window {
            kernel: padded3(&kernel, 1),
            stride: padded3(&stride, 1),
            dilation: padded3(&dilation, 1),
            begin: padded3(&begin, 0),
            end: padded3(&end, 0),
            input: padded3(xs, 1),
            output: padded3(ys, 1),
        })
    }

    /// Calls `f(output position, taps)` with the in-range input positions (flat, per plane) of
    /// every output's window, and how many taps the window has inside the padded input.
    fn for_each(&self, mut f: impl FnMut(usize, &[usize], usize)) {
        let [od, oh, ow] = self.output;
        let [_, ih, iw] = self.input;
        let mut taps = Vec::with_capacity(self.kernel.iter().product());
        for z in 0..od {
            for y in 0..oh {
                for x in 0..ow {
                    taps.clear();
                    let mut padded = 1usize;
                    let out_pos = [z, y, x];
                    let mut ranges: [Vec<usize>; 3] = Default::default();
                    for d in 0..3 {
                        let inside_padding = self.input[d] + self.begin[d] + self.end[d];
                        let mut count = 0;
                        for k in 0..self.kernel[d] {
                            let at = out_pos[d] * self.stride[d] + k * self.dilation[d];
                            if at < inside_padding {
                                count += 1;
                            }
                            if at >= self.begin[d] && at - self.begin[d] < self.input[d] {
                                ranges[d].push(at - self.begin[d]);
                            }
                        }
                        padded *= count;
                    }
                    for &a in &ranges[0] {
                        for &b in &ranges[1] {
                            for &c in &ranges[2] {
                                taps.push((a * ih + b) * iw + c);
                            }
                        }
                    }
                    f((z * oh + y) * ow + x, &taps, padded);
                }
            }
        }
    }
}

/// The input gradient of MaxPool or AveragePool.
pub(super) fn pool(ctx: &NodeGrad<'_>, max: bool) -> Result<ArrayD<f32>> {
    let node = ctx.node;
    if node.int_attr("storage_order", 0)? != 0 {
        return Err(unsupported(&node.name, &node.op_type, "storage_order 1"));
    }
    let x = ctx.x(0)?;
    let dy = ctx.dy(0)?;
    let w = Window::of(node, x.shape(), dy.shape())?;
    let count_pad = node.int_attr("count_include_pad", 0)? != 0;
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let dy = dy.as_standard_layout();
    let dys = dy.as_slice().expect("standard layout");
    let plane_in: usize = w.input.iter().product();
    let plane_out: usize = w.output.iter().product();
    let mut dx = vec![0.0f32; xs.len()];
    for ((xp, dxp), dyp) in
        xs.chunks(plane_in.max(1)).zip(dx.chunks_mut(plane_in.max(1))).zip(dys.chunks(plane_out.max(1)))
    {
        w.for_each(|o, taps, padded| {
            if max {
                let best = taps.iter().copied().fold(None, |best: Option<usize>, t| match best {
                    Some(b) if xp[b] >= xp[t] || xp[t].is_nan() => Some(b),
                    _ => Some(t),
                });
                if let Some(b) = best {
                    dxp[b] += dyp[o];
                }
            } else {
                let divisor = if count_pad { padded } else { taps.len() };
                if divisor > 0 {
                    let share = dyp[o] / divisor as f32;
                    taps.iter().for_each(|&t| dxp[t] += share);
                }
            }
        });
    }
    Ok(ArrayD::from_shape_vec(IxDyn(x.shape()), dx).expect("sizes agree"))
}

/// The input gradient of GlobalAveragePool or GlobalMaxPool.
pub(super) fn global_pool(ctx: &NodeGrad<'_>, max: bool) -> Result<ArrayD<f32>> {
    let x: ArrayViewD<'_, f32> = ctx.x(0)?;
    let dy = ctx.dy(0)?;
    let op = ctx.node.name.as_str();
    if x.ndim() < 2 || dy.len() != x.shape()[0] * x.shape()[1] {
        return Err(shape_error(op, format!("input {:?}, output gradient {:?}", x.shape(), dy.shape())));
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let plane: usize = x.shape()[2..].iter().product();
    let mut dx = vec![0.0f32; xs.len()];
    for ((xp, dxp), &g) in xs.chunks(plane.max(1)).zip(dx.chunks_mut(plane.max(1))).zip(dy.iter()) {
        if max {
            let best = (0..xp.len()).fold(0, |b, t| if xp[t] > xp[b] { t } else { b });
            if let Some(d) = dxp.get_mut(best) {
                *d += g;
            }
        } else {
            let share = g / plane.max(1) as f32;
            dxp.iter_mut().for_each(|d| *d = share);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(x.shape()), dx).expect("sizes agree"))
}
