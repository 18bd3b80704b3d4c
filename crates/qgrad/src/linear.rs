//! Weighted layers — Conv (1-D and 2-D, grouped and depthwise), ConvTranspose (1-D and 2-D,
//! read as a gather: each output position takes the inputs whose scatter reaches it), Gemm, and
//! MatMul with a 2-D weight — in channel-major form: per group, `Y[o, m] = Σ_k W[o, k]·X[k, m] +
//! b[o]`, where `m` runs over samples × output positions. The forward product and the vector-Jacobian rules for
//! the weight, the bias and the input. [`Columns`] is an input prepared once (im2col, or padded
//! planes for depthwise convolutions) for the many passes an optimisation makes over it.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use qexec::{MatRef, Parallelism, sgemm};
use qgraph::Node;
use rayon::prelude::*;

use crate::error::{GradError, Result, shape_error};

mod gram;
mod reconstruction;

pub use gram::Gram;

/// The spatial geometry of a 1-D or 2-D convolution (1-D as height 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Groups.
    pub group: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Strides.
    pub stride: [usize; 2],
    /// Dilations.
    pub dilation: [usize; 2],
    /// Padding: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Output height and width.
    pub out_hw: [usize; 2],
    /// 1 or 2.
    pub spatial_rank: usize,
    /// A ConvTranspose: output position `o` reads input `(o + pad − k·dilation) / stride` where
    /// that divides (a Conv reads `o·stride + k·dilation − pad`).
    pub transposed: bool,
}

fn attr_pair(node: &Node, name: &str, rank: usize, default: usize) -> Result<[usize; 2]> {
    let Some(v) = node.ints_attr(name)? else { return Ok([default; 2]) };
    if v.len() != rank || v.iter().any(|&x| x < 1) {
        return Err(shape_error(&node.name, format!("{name} {v:?} for {rank} spatial dims")));
    }
    let v: Vec<usize> = v.iter().map(|&x| x as usize).collect();
    Ok(if rank == 1 { [1, v[0]] } else { [v[0], v[1]] })
}

/// Kernel, strides and dilations of a convolution-like `node` of `rank` spatial dims whose
/// weight has `weight_shape` (1-D as height 1).
fn window(node: &Node, rank: usize, weight_shape: &[usize]) -> Result<[[usize; 2]; 3]> {
    let kernel = if rank == 1 { [1, weight_shape[2]] } else { [weight_shape[2], weight_shape[3]] };
    Ok([kernel, attr_pair(node, "strides", rank, 1)?, attr_pair(node, "dilations", rank, 1)?])
}

/// The explicit `pads` of `node` as top, left, bottom, right (zeros when absent).
fn explicit_pads(node: &Node, rank: usize) -> Result<[usize; 4]> {
    let Some(p) = node.ints_attr("pads")? else { return Ok([0; 4]) };
    if p.len() != 2 * rank || p.iter().any(|&x| x < 0) {
        return Err(shape_error(&node.name, format!("pads {p:?} for {rank} spatial dims")));
    }
    let p: Vec<usize> = p.iter().map(|&x| x as usize).collect();
    Ok(if rank == 1 { [0, p[0], 0, p[1]] } else { [p[0], p[1], p[2], p[3]] })
}

impl ConvGeometry {
    /// The geometry of Conv `node` on an input of `input_shape` (`[N, C, L]` or `[N, C, H, W]`)
    /// with a weight of `weight_shape`.
    pub fn from_node(node: &Node, input_shape: &[usize], weight_shape: &[usize]) -> Result<ConvGeometry> {
        let op = node.name.as_str();
        let rank = input_shape.len().saturating_sub(2);
        if !(1..=2).contains(&rank) || weight_shape.len() != input_shape.len() {
            return Err(GradError::Unsupported {
                op: op.into(),
                detail: format!("input {input_shape:?}, weight {weight_shape:?} (1-D and 2-D convolutions)"),
            });
        }
        let group = usize::try_from(node.int_attr("group", 1)?).unwrap_or(0);
        let (cin, cout) = (input_shape[1], weight_shape[0]);
        if group == 0 || cin % group != 0 || cout % group != 0 || weight_shape[1] * group != cin {
            return Err(shape_error(
                op,
                format!("group {group}: input {input_shape:?}, weight {weight_shape:?}"),
            ));
        }
        let [kernel, stride, dilation] = window(node, rank, weight_shape)?;
        let in_hw = if rank == 1 { [1, input_shape[2]] } else { [input_shape[2], input_shape[3]] };
        let auto_pad = node.string_attr("auto_pad")?.unwrap_or("NOTSET");
        let mut pads = [0usize; 4];
        match auto_pad {
            "NOTSET" => pads = explicit_pads(node, rank)?,
            "VALID" => {}
            "SAME_UPPER" | "SAME_LOWER" => {
                for a in 0..2 {
                    let out = in_hw[a].div_ceil(stride[a]);
                    let span = dilation[a] * (kernel[a] - 1) + 1;
                    let total = ((out.max(1) - 1) * stride[a] + span).saturating_sub(in_hw[a]);
                    let small = total / 2;
                    let (begin, end) = if auto_pad == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    pads[a] = begin;
                    pads[a + 2] = end;
                }
            }
            other => return Err(shape_error(op, format!("auto_pad '{other}'"))),
        }
        let mut out_hw = [0usize; 2];
        for a in 0..2 {
            let span = dilation[a].checked_mul(kernel[a].saturating_sub(1)).and_then(|s| s.checked_add(1));
            let padded = in_hw[a].checked_add(pads[a]).and_then(|s| s.checked_add(pads[a + 2]));
            match (span, padded) {
                (Some(s), Some(p)) if kernel[a] >= 1 && p >= s => out_hw[a] = (p - s) / stride[a] + 1,
                _ => {
                    return Err(shape_error(
                        op,
                        format!("kernel {kernel:?} does not fit input {in_hw:?} with pads {pads:?}"),
                    ));
                }
            }
        }
        Ok(ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            group,
            kernel,
            stride,
            dilation,
            pads,
            in_hw,
            out_hw,
            spatial_rank: rank,
            transposed: false,
        })
    }

    /// The geometry of ConvTranspose `node` on an input of `input_shape` with a weight of
    /// `weight_shape` (`[C_in, C_out/group, k…]`), explicit pads and `output_padding`.
    pub fn transposed_from_node(
        node: &Node,
        input_shape: &[usize],
        weight_shape: &[usize],
    ) -> Result<ConvGeometry> {
        let op = node.name.as_str();
        let rank = input_shape.len().saturating_sub(2);
        let unsupported =
            |detail: String| GradError::Unsupported { op: format!("{op} (ConvTranspose)"), detail };
        if !(1..=2).contains(&rank) || weight_shape.len() != input_shape.len() {
            return Err(unsupported(format!("input {input_shape:?}, weight {weight_shape:?} (1-D and 2-D)")));
        }
        if node.string_attr("auto_pad")?.is_some_and(|a| a != "NOTSET") || node.attr("output_shape").is_some()
        {
            return Err(unsupported("auto_pad or output_shape (explicit pads only)".into()));
        }
        let group = usize::try_from(node.int_attr("group", 1)?).unwrap_or(0);
        let cin = input_shape[1];
        if group == 0 || weight_shape[0] != cin || cin % group != 0 {
            return Err(shape_error(
                op,
                format!("group {group}: input {input_shape:?}, weight {weight_shape:?}"),
            ));
        }
        let cout = weight_shape[1]
            .checked_mul(group)
            .ok_or_else(|| shape_error(op, format!("weight {weight_shape:?} with group {group}")))?;
        let [kernel, stride, dilation] = window(node, rank, weight_shape)?;
        let pads = explicit_pads(node, rank)?;
        let extra = match node.ints_attr("output_padding")? {
            None => [0, 0],
            Some(v) if v.len() == rank && v.iter().all(|&x| x >= 0) => {
                let v: Vec<usize> = v.iter().map(|&x| x as usize).collect();
                if rank == 1 { [0, v[0]] } else { [v[0], v[1]] }
            }
            Some(v) => return Err(shape_error(op, format!("output_padding {v:?} for {rank} spatial dims"))),
        };
        let in_hw = if rank == 1 { [1, input_shape[2]] } else { [input_shape[2], input_shape[3]] };
        let mut out_hw = [0usize; 2];
        for a in 0..2 {
            let full = in_hw[a]
                .checked_sub(1)
                .and_then(|i| i.checked_mul(stride[a]))
                .and_then(|i| i.checked_add(dilation[a].checked_mul(kernel[a].checked_sub(1)?)?))
                .and_then(|i| i.checked_add(1 + extra[a]));
            match full.and_then(|f| f.checked_sub(pads[a] + pads[a + 2])) {
                Some(o) if o > 0 => out_hw[a] = o,
                _ => {
                    return Err(shape_error(
                        op,
                        format!("input {in_hw:?} gives no output with pads {pads:?}"),
                    ));
                }
            }
        }
        Ok(ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            group,
            kernel,
            stride,
            dilation,
            pads,
            in_hw,
            out_hw,
            spatial_rank: rank,
            transposed: true,
        })
    }

    /// The convolution whose adjoint ConvTranspose `node` is: from the ConvTranspose's output
    /// (`y_shape`) back to its input (`x_shape`), with its weight (`[C_in, C_out/group, k…]`, a
    /// Conv weight of `C_in` outputs) and its strides, dilations and pads. Its forward is the
    /// ConvTranspose's input gradient; its weight gradient, taken with the ConvTranspose's input
    /// as output gradient, is the ConvTranspose's weight gradient.
    pub fn adjoint_of_transpose(
        node: &Node,
        x_shape: &[usize],
        weight_shape: &[usize],
        y_shape: &[usize],
    ) -> Result<ConvGeometry> {
        let t = ConvGeometry::transposed_from_node(node, x_shape, weight_shape)?;
        if t.output_shape(x_shape[0]) != y_shape {
            return Err(shape_error(
                &node.name,
                format!("output {y_shape:?} does not map back onto input {x_shape:?}"),
            ));
        }
        Ok(ConvGeometry {
            in_channels: t.out_channels,
            out_channels: t.in_channels,
            in_hw: t.out_hw,
            out_hw: t.in_hw,
            transposed: false,
            ..t
        })
    }

    fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    fn positions(&self) -> usize {
        self.out_hw[0] * self.out_hw[1]
    }

    /// The input index along one axis of output position `o` and kernel tap `k`, if not padding.
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        if self.transposed {
            let at = (o + self.pads[axis]).checked_sub(k * self.dilation[axis])?;
            let s = self.stride[axis];
            return (at % s == 0).then_some(at / s).filter(|&i| i < self.in_hw[axis]);
        }
        (o * self.stride[axis] + k * self.dilation[axis])
            .checked_sub(self.pads[axis])
            .filter(|&i| i < self.in_hw[axis])
    }

    fn output_shape(&self, samples: usize) -> Vec<usize> {
        let mut s = vec![samples, self.out_channels];
        if self.spatial_rank == 2 {
            s.push(self.out_hw[0]);
        }
        s.push(self.out_hw[1]);
        s
    }

    fn input_shape(&self, samples: usize) -> Vec<usize> {
        let mut s = vec![samples, self.in_channels];
        if self.spatial_rank == 2 {
            s.push(self.in_hw[0]);
        }
        s.push(self.in_hw[1]);
        s
    }
}

/// The shape of a layer's computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinearKind {
    /// A convolution.
    Conv(ConvGeometry),
    /// A dense product over the last axis of the input (`in_features` long).
    Dense {
        /// Length of the input's last axis.
        in_features: usize,
    },
}

/// A weighted layer in channel-major form (see the module doc).
#[derive(Debug, Clone)]
pub struct Linear {
    op: String,
    kind: LinearKind,
    out_channels: usize,
    /// Reduction length per group.
    k: usize,
    groups: usize,
    /// Element `(o, k)` of a group's weight lies at `o·w_rs + k·w_cs` (groups follow each other).
    w_rs: usize,
    w_cs: usize,
    threads: usize,
    /// Per-thread buffers of the fused reconstruction pass, kept between calls.
    scratch: std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>,
}

/// An input prepared for a layer: `[groups, k, m]` columns, or for depthwise convolutions the
/// zero-padded input planes (see [`PlaneLayout`]).
#[derive(Debug, Clone)]
pub struct Columns {
    data: Vec<f32>,
    m: usize,
    samples: usize,
    /// Leading shape of a dense input (all axes but the last).
    leading: Vec<usize>,
}

impl Columns {
    /// Output columns (samples × positions).
    pub fn width(&self) -> usize {
        self.m
    }

    /// Samples in the batch.
    pub fn samples(&self) -> usize {
        self.samples
    }
}

fn product_error(op: &str) -> impl Fn(String) -> GradError + '_ {
    move |e| GradError::Product(format!("{op}: {e}"))
}

impl Linear {
    /// A convolution of `geometry`.
    pub fn conv(op: &str, geometry: ConvGeometry) -> Linear {
        let k = geometry.in_channels / geometry.group * geometry.taps();
        Linear {
            op: op.into(),
            out_channels: geometry.out_channels,
            k,
            groups: geometry.group,
            w_rs: k,
            w_cs: 1,
            kind: LinearKind::Conv(geometry),
            threads: 1,
            scratch: Default::default(),
        }
    }

    /// A dense layer; `out_major`: the weight is `[out, in]` (Gemm with transB), else `[in, out]`.
    pub fn dense(op: &str, in_features: usize, out_features: usize, out_major: bool) -> Linear {
        // One output: both layouts are the same memory, taken as out-major.
        let (w_rs, w_cs) = if out_major || out_features == 1 { (in_features, 1) } else { (1, out_features) };
        Linear {
            op: op.into(),
            kind: LinearKind::Dense { in_features },
            out_channels: out_features,
            k: in_features,
            groups: 1,
            w_rs,
            w_cs,
            threads: 1,
            scratch: Default::default(),
        }
    }

    /// The layer of a Conv, Gemm or MatMul `node` with an input of `input_shape` and a weight of
    /// `weight_shape` (Gemm: `transA = 0`, `alpha = beta = 1`; MatMul: a 2-D weight).
    pub fn from_node(node: &Node, input_shape: &[usize], weight_shape: &[usize]) -> Result<Linear> {
        let op = node.name.as_str();
        let unsupported = |detail: String| GradError::Unsupported {
            op: format!("{} ({})", node.name, node.op_type),
            detail,
        };
        match node.op_type.as_str() {
            "Conv" => Ok(Linear::conv(op, ConvGeometry::from_node(node, input_shape, weight_shape)?)),
            "ConvTranspose" => {
                Ok(Linear::conv(op, ConvGeometry::transposed_from_node(node, input_shape, weight_shape)?))
            }
            "Gemm" | "MatMul" => {
                if node.op_type == "Gemm"
                    && (node.int_attr("transA", 0)? != 0
                        || node.float_attr("alpha", 1.0)? != 1.0
                        || node.float_attr("beta", 1.0)? != 1.0)
                {
                    return Err(unsupported("Gemm with transA or alpha/beta other than 1".into()));
                }
                let trans_b = node.op_type == "Gemm" && node.int_attr("transB", 0)? != 0;
                if weight_shape.len() != 2 || input_shape.is_empty() {
                    return Err(unsupported(format!("input {input_shape:?}, weight {weight_shape:?}")));
                }
                let (k, n) = if trans_b {
                    (weight_shape[1], weight_shape[0])
                } else {
                    (weight_shape[0], weight_shape[1])
                };
                if input_shape[input_shape.len() - 1] != k {
                    return Err(shape_error(
                        op,
                        format!("input {input_shape:?} against weight {weight_shape:?}"),
                    ));
                }
                Ok(Linear::dense(op, k, n, trans_b))
            }
            other => Err(unsupported(format!("{other} is not a weighted layer"))),
        }
    }

    /// Runs products on `threads` threads.
    pub fn with_threads(mut self, threads: usize) -> Linear {
        self.threads = threads.max(1);
        self
    }

    /// The kind and geometry.
    pub fn kind(&self) -> &LinearKind {
        &self.kind
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// A weight (or anything laid out like it, e.g. each element's encoding index) in the
    /// layout the products take: per group, `[out, k]` rows. A ConvTranspose's `[C_in,
    /// C_out/group, taps]` is reordered to `[C_out, C_in/group, taps]`; other layers' are as given.
    pub fn weight_rows<T: Copy>(&self, w: &[T]) -> Vec<T> {
        let Some(runs) = self.transposed_runs() else { return w.to_vec() };
        let mut rows = Vec::with_capacity(w.len());
        for (at, _, taps) in runs {
            rows.extend_from_slice(&w[at..at + taps]);
        }
        rows
    }

    /// The inverse of [`Linear::weight_rows`]: rows back to the model's weight layout.
    pub fn weight_from_rows<T: Copy + Default>(&self, rows: &[T]) -> Vec<T> {
        let Some(runs) = self.transposed_runs() else { return rows.to_vec() };
        let mut w = vec![T::default(); rows.len()];
        for (at, from, taps) in runs {
            w[at..at + taps].copy_from_slice(&rows[from..from + taps]);
        }
        w
    }

    /// For a ConvTranspose, its weight's runs of taps in row order: `(offset in the model's
    /// layout, offset in rows, taps)`.
    fn transposed_runs(&self) -> Option<impl Iterator<Item = (usize, usize, usize)>> {
        let LinearKind::Conv(g) = &self.kind else { return None };
        if !g.transposed {
            return None;
        }
        let (cin_g, cout_g, taps) = (g.in_channels / g.group, g.out_channels / g.group, g.taps());
        Some((0..self.out_channels).flat_map(move |o| {
            let (gi, ol) = (o / cout_g, o % cout_g);
            (0..cin_g)
                .map(move |cl| (((gi * cin_g + cl) * cout_g + ol) * taps, (o * cin_g + cl) * taps, taps))
        }))
    }

    /// Elements of the weight.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.k
    }

    fn depthwise(&self) -> Option<&ConvGeometry> {
        match &self.kind {
            LinearKind::Conv(g) if g.in_channels == g.group && !g.transposed => Some(g),
            _ => None,
        }
    }

    /// Threads for a product of `macs` multiply-adds: small ones stay on one thread.
    fn par(&self, macs: usize) -> Parallelism {
        if self.threads > 1 && macs >= 1 << 20 { Parallelism::Rayon(self.threads) } else { Parallelism::None }
    }

    /// Prepares input `x` (the layer's input in model layout).
    pub fn columns(&self, x: ArrayViewD<'_, f32>) -> Result<Columns> {
        let x = x.as_standard_layout();
        let data = x.as_slice().expect("standard layout is contiguous");
        match &self.kind {
            LinearKind::Dense { in_features } => {
                let shape = x.shape();
                if shape.last() != Some(in_features) {
                    return Err(shape_error(
                        &self.op,
                        format!("input {shape:?}, {in_features} features expected"),
                    ));
                }
                let m = data.len() / in_features.max(&1);
                let mut cols = vec![0.0f32; data.len()];
                for (r, row) in data.chunks_exact((*in_features).max(1)).enumerate() {
                    for (k, &v) in row.iter().enumerate() {
                        cols[k * m + r] = v;
                    }
                }
                let leading = shape[..shape.len() - 1].to_vec();
                Ok(Columns { data: cols, m, samples: shape.first().copied().unwrap_or(1), leading })
            }
            LinearKind::Conv(g) => {
                let n = x.shape().first().copied().unwrap_or(0);
                if x.shape() != g.input_shape(n).as_slice() {
                    return Err(shape_error(
                        &self.op,
                        format!("input {:?}, expected {:?}", x.shape(), g.input_shape(n)),
                    ));
                }
                let m = n * g.positions();
                if self.depthwise().is_some() {
                    return Ok(Columns {
                        data: padded_planes(g, data, n),
                        m,
                        samples: n,
                        leading: Vec::new(),
                    });
                }
                Ok(Columns { data: im2col(g, data, n), m, samples: n, leading: Vec::new() })
            }
        }
    }

    /// Output in model layout → channel-major `[C, m]`.
    pub fn to_channel_major(&self, y: ArrayViewD<'_, f32>) -> Result<Vec<f32>> {
        let y = y.as_standard_layout();
        let data = y.as_slice().expect("standard layout is contiguous");
        let c = self.out_channels;
        let (samples, inner) = match &self.kind {
            LinearKind::Dense { .. } => (data.len() / c.max(1), 1),
            LinearKind::Conv(g) => (y.shape().first().copied().unwrap_or(0), g.positions()),
        };
        if data.len() != samples * c * inner || y.shape().last().is_none() {
            return Err(shape_error(&self.op, format!("output {:?} with {c} channels", y.shape())));
        }
        let m = samples * inner;
        let mut out = vec![0.0f32; data.len()];
        match &self.kind {
            LinearKind::Dense { .. } => {
                for (r, row) in data.chunks_exact(c.max(1)).enumerate() {
                    for (o, &v) in row.iter().enumerate() {
                        out[o * m + r] = v;
                    }
                }
            }
            LinearKind::Conv(_) => {
                for n in 0..samples {
                    for o in 0..c {
                        let src = &data[(n * c + o) * inner..][..inner];
                        out[o * m + n * inner..][..inner].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Channel-major `[C, m]` → model layout (for `cols`' batch).
    pub fn from_channel_major(&self, y: &[f32], cols: &Columns) -> ArrayD<f32> {
        let c = self.out_channels;
        let m = cols.m;
        match &self.kind {
            LinearKind::Dense { .. } => {
                let mut out = vec![0.0f32; y.len()];
                for o in 0..c {
                    for r in 0..m {
                        out[r * c + o] = y[o * m + r];
                    }
                }
                let mut shape = cols.leading.clone();
                shape.push(c);
                ArrayD::from_shape_vec(IxDyn(&shape), out).expect("sizes agree")
            }
            LinearKind::Conv(g) => {
                let inner = g.positions();
                let mut out = vec![0.0f32; y.len()];
                for n in 0..cols.samples {
                    for o in 0..c {
                        out[(n * c + o) * inner..][..inner].copy_from_slice(&y[o * m + n * inner..][..inner]);
                    }
                }
                ArrayD::from_shape_vec(IxDyn(&g.output_shape(cols.samples)), out).expect("sizes agree")
            }
        }
    }

    fn check(&self, what: &str, len: usize, expected: usize) -> Result<()> {
        if len == expected {
            Ok(())
        } else {
            Err(shape_error(&self.op, format!("{what} holds {len} values, {expected} expected")))
        }
    }

    /// `y = W·cols + bias`, channel-major `[C, m]`.
    pub fn forward(&self, w: &[f32], bias: Option<&[f32]>, cols: &Columns, y: &mut [f32]) -> Result<()> {
        let (c, m, k) = (self.out_channels, cols.m, self.k);
        self.check("weight", w.len(), c * k)?;
        self.check("output", y.len(), c * m)?;
        if let Some(b) = bias {
            self.check("bias", b.len(), c)?;
        }
        if let Some(g) = self.depthwise() {
            depthwise_forward(g, w, &cols.data, cols.samples, y, self.threads);
        } else {
            let cg = c / self.groups;
            for gi in 0..self.groups {
                let a = MatRef { data: &w[gi * cg * k..], rs: self.w_rs, cs: self.w_cs };
                let b = MatRef { data: &cols.data[gi * k * m..], rs: m, cs: 1 };
                sgemm(cg, m, k, a, b, 1.0, &mut y[gi * cg * m..], m, false, self.par(cg * m * k))
                    .map_err(product_error(&self.op))?;
            }
        }
        if let Some(b) = bias {
            for (row, &bo) in y.chunks_exact_mut(m.max(1)).zip(b) {
                row.iter_mut().for_each(|v| *v += bo);
            }
        }
        Ok(())
    }

    /// The weight's gradient `dW = dY·colsᵀ` (in the weight's own layout) for output gradient `dy`.
    pub fn weight_grad(&self, dy: &[f32], cols: &Columns, dw: &mut [f32]) -> Result<()> {
        let (c, m, k) = (self.out_channels, cols.m, self.k);
        self.check("output gradient", dy.len(), c * m)?;
        self.check("weight gradient", dw.len(), c * k)?;
        if let Some(g) = self.depthwise() {
            depthwise_weight_grad(g, dy, &cols.data, cols.samples, dw, self.threads);
            return Ok(());
        }
        let cg = c / self.groups;
        for gi in 0..self.groups {
            let dy_g = &dy[gi * cg * m..];
            let cols_g = &cols.data[gi * k * m..];
            if self.w_cs == 1 {
                let a = MatRef { data: dy_g, rs: m, cs: 1 };
                let b = MatRef { data: cols_g, rs: 1, cs: m };
                sgemm(cg, k, m, a, b, 1.0, &mut dw[gi * cg * k..], self.w_rs, false, self.par(cg * m * k))
            } else {
                let a = MatRef { data: cols_g, rs: m, cs: 1 };
                let b = MatRef { data: dy_g, rs: 1, cs: m };
                sgemm(k, cg, m, a, b, 1.0, dw, self.w_cs, false, self.par(cg * m * k))
            }
            .map_err(product_error(&self.op))?;
        }
        Ok(())
    }

    /// The bias's gradient: `dy` summed over columns.
    pub fn bias_grad(&self, dy: &[f32], m: usize) -> Vec<f32> {
        dy.chunks_exact(m.max(1)).map(|row| row.iter().sum()).collect()
    }

    /// The input's gradient in model layout, for output gradient `dy` over `cols`' batch.
    pub fn input_grad(&self, w: &[f32], dy: &[f32], cols: &Columns) -> Result<ArrayD<f32>> {
        let (c, m, k) = (self.out_channels, cols.m, self.k);
        self.check("weight", w.len(), c * k)?;
        self.check("output gradient", dy.len(), c * m)?;
        match &self.kind {
            LinearKind::Dense { in_features } => {
                let mut dx = vec![0.0f32; m * in_features];
                let a = MatRef { data: dy, rs: 1, cs: m };
                let b = MatRef { data: w, rs: self.w_rs, cs: self.w_cs };
                sgemm(m, k, c, a, b, 1.0, &mut dx, k, false, self.par(m * k * c))
                    .map_err(product_error(&self.op))?;
                let mut shape = cols.leading.clone();
                shape.push(*in_features);
                Ok(ArrayD::from_shape_vec(IxDyn(&shape), dx).expect("sizes agree"))
            }
            LinearKind::Conv(g) => {
                let cg = c / self.groups;
                let mut dcols = vec![0.0f32; self.groups * k * m];
                for gi in 0..self.groups {
                    let a = MatRef { data: &w[gi * cg * k..], rs: self.w_cs, cs: self.w_rs };
                    let b = MatRef { data: &dy[gi * cg * m..], rs: m, cs: 1 };
                    sgemm(k, m, cg, a, b, 1.0, &mut dcols[gi * k * m..], m, false, self.par(m * k * cg))
                        .map_err(product_error(&self.op))?;
                }
                let n = cols.samples;
                let mut dx = vec![0.0f32; n * g.in_channels * g.in_hw[0] * g.in_hw[1]];
                col2im(g, &dcols, n, &mut dx);
                Ok(ArrayD::from_shape_vec(IxDyn(&g.input_shape(n)), dx).expect("sizes agree"))
            }
        }
    }
}

/// Calls `f(column-matrix index, input index)` for every non-padding tap of `g`'s im2col matrix over
/// `n` samples (rows `(group, channel, ky, kx)`, columns `(sample, oy, ox)`).
fn for_each_tap(g: &ConvGeometry, n: usize, mut f: impl FnMut(usize, usize)) {
    let cin_g = g.in_channels / g.group;
    let (h, w) = (g.in_hw[0], g.in_hw[1]);
    let (ho, wo) = (g.out_hw[0], g.out_hw[1]);
    let m = n * ho * wo;
    for c in 0..g.in_channels {
        let (gi, cl) = (c / cin_g, c % cin_g);
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let row = (gi * cin_g + cl) * g.taps() + ky * g.kernel[1] + kx;
                for s in 0..n {
                    for oy in 0..ho {
                        let Some(iy) = g.source(0, oy, ky) else { continue };
                        for ox in 0..wo {
                            let Some(ix) = g.source(1, ox, kx) else { continue };
                            f(row * m + (s * ho + oy) * wo + ox, ((s * g.in_channels + c) * h + iy) * w + ix);
                        }
                    }
                }
            }
        }
    }
}

fn im2col(g: &ConvGeometry, x: &[f32], n: usize) -> Vec<f32> {
    let mut cols = vec![0.0f32; g.in_channels * g.taps() * n * g.positions()];
    for_each_tap(g, n, |at, src| cols[at] = x[src]);
    cols
}

fn col2im(g: &ConvGeometry, cols: &[f32], n: usize, dx: &mut [f32]) {
    for_each_tap(g, n, |at, dst| dx[dst] += cols[at]);
}

/// The layout of depthwise input planes `[C, N, sh, sw, Hq, Wq]` (plus slack after each channel):
/// each sample's zero-padded plane split into `sh × sw` stride phases, so that one kernel tap
/// reads, for every output of a "wide" grid `[Hq, Wq]` (the outputs, then unused columns and rows),
/// one contiguous run — across all samples at once when the strides are 1.
struct PlaneLayout {
    sh: usize,
    sw: usize,
    hq: usize,
    wq: usize,
    /// Values after the last sample of a channel, so every tap's run stays inside.
    slack: usize,
}

impl PlaneLayout {
    fn of(g: &ConvGeometry) -> PlaneLayout {
        let (sh, sw) = (g.stride[0], g.stride[1]);
        let hq = (g.in_hw[0] + g.pads[0] + g.pads[2]).div_ceil(sh);
        let wq = (g.in_hw[1] + g.pads[1] + g.pads[3]).div_ceil(sw);
        let qy = (g.kernel[0] - 1) * g.dilation[0] / sh;
        let qx = (g.kernel[1] - 1) * g.dilation[1] / sw;
        PlaneLayout { sh, sw, hq, wq, slack: (qy + 1) * wq + qx + 1 }
    }

    /// Values of one stride phase of one sample (the wide grid).
    fn phase_len(&self) -> usize {
        self.hq * self.wq
    }

    /// Values of one sample.
    fn sample_len(&self) -> usize {
        self.sh * self.sw * self.phase_len()
    }

    /// Values of one channel over `n` samples, slack included.
    fn channel_len(&self, n: usize) -> usize {
        n * self.sample_len() + self.slack
    }

    /// Where, within a sample, the run of tap `(ky, kx)` starts.
    fn tap_offset(&self, g: &ConvGeometry, ky: usize, kx: usize) -> usize {
        let (a, b) = (ky * g.dilation[0], kx * g.dilation[1]);
        ((a % self.sh) * self.sw + b % self.sw) * self.phase_len() + (a / self.sh) * self.wq + b / self.sw
    }

    /// Runs of the wide grid: one over all `n` samples when the strides are 1, else one per
    /// sample; as (start in the wide output, start in the plane, length).
    fn runs(&self, n: usize) -> impl Iterator<Item = (usize, usize, usize)> + use<> {
        let (phase, sample) = (self.phase_len(), self.sample_len());
        let whole = self.sh == 1 && self.sw == 1;
        let (count, len) = if whole { (usize::from(n > 0), n * phase) } else { (n, phase) };
        (0..count).map(move |s| (s * phase, s * sample, len))
    }
}

/// Zero-padded, phase-split planes (see [`PlaneLayout`]) of input `x` `[N, C, H, W]`.
fn padded_planes(g: &ConvGeometry, x: &[f32], n: usize) -> Vec<f32> {
    let (h, w) = (g.in_hw[0], g.in_hw[1]);
    let layout = PlaneLayout::of(g);
    let channel_len = layout.channel_len(n);
    let mut out = vec![0.0f32; g.in_channels * channel_len];
    for s in 0..n {
        for c in 0..g.in_channels {
            let plane = &mut out[c * channel_len + s * layout.sample_len()..][..layout.sample_len()];
            for y in 0..h {
                let (yp, xp0) = (y + g.pads[0], g.pads[1]);
                let src = &x[((s * g.in_channels + c) * h + y) * w..][..w];
                for (xi, &v) in src.iter().enumerate() {
                    let xp = xp0 + xi;
                    let phase = (yp % layout.sh) * layout.sw + xp % layout.sw;
                    plane[phase * layout.phase_len() + (yp / layout.sh) * layout.wq + xp / layout.sw] = v;
                }
            }
        }
    }
    out
}

/// Whether a depthwise pass is worth sharing between threads.
fn depthwise_parallel(g: &ConvGeometry, n: usize, threads: usize) -> bool {
    threads > 1 && g.out_channels > 1 && n * g.positions() * g.taps() * g.out_channels >= 1 << 18
}

/// `Σ a·b` in f32 with sixteen partial sums, inlined into the multiversioned depthwise gradient
/// (its short runs pay for `qkernels::dot_sum`'s dispatch and f64 sums).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

qkernels::multiversion! {
    /// One output channel of a depthwise convolution over `n` samples of `plane`: every tap adds
    /// its weight times its run to the wide grid `wide`, whose outputs are then copied to `y`.
    fn depthwise_channel(g: &ConvGeometry, w: &[f32], plane: &[f32], n: usize, y: &mut [f32], wide: &mut Vec<f32>) {
        let layout = PlaneLayout::of(g);
        let (ho, wo) = (g.out_hw[0], g.out_hw[1]);
        wide.clear();
        wide.resize(n * layout.phase_len(), 0.0);
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let wv = w[ky * g.kernel[1] + kx];
                let offset = layout.tap_offset(g, ky, kx);
                for (out, src, len) in layout.runs(n) {
                    for (o, &x) in wide[out..out + len].iter_mut().zip(&plane[src + offset..src + offset + len]) {
                        *o += wv * x;
                    }
                }
            }
        }
        for s in 0..n {
            for oy in 0..ho {
                let row = &wide[s * layout.phase_len() + oy * layout.wq..][..wo];
                y[(s * ho + oy) * wo..][..wo].copy_from_slice(row);
            }
        }
    }
}

qkernels::multiversion! {
    /// Adds one output channel's depthwise weight gradient over `n` samples to `dwc`: `d` spread
    /// on the wide grid (zeros elsewhere), then one dot product per tap and run.
    fn depthwise_channel_grad(g: &ConvGeometry, d: &[f32], plane: &[f32], n: usize, dwc: &mut [f32], wide: &mut Vec<f32>) {
        let layout = PlaneLayout::of(g);
        let (ho, wo) = (g.out_hw[0], g.out_hw[1]);
        wide.clear();
        wide.resize(n * layout.phase_len(), 0.0);
        for s in 0..n {
            for oy in 0..ho {
                let row = &mut wide[s * layout.phase_len() + oy * layout.wq..][..wo];
                row.copy_from_slice(&d[(s * ho + oy) * wo..][..wo]);
            }
        }
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let offset = layout.tap_offset(g, ky, kx);
                let mut acc = 0.0f32;
                for (out, src, len) in layout.runs(n) {
                    acc += dot(&wide[out..out + len], &plane[src + offset..src + offset + len]);
                }
                dwc[ky * g.kernel[1] + kx] += acc;
            }
        }
    }
}

fn depthwise_forward(g: &ConvGeometry, w: &[f32], planes: &[f32], n: usize, y: &mut [f32], threads: usize) {
    let channel_len = PlaneLayout::of(g).channel_len(n);
    let per_out = n * g.positions();
    let mult = g.out_channels / g.group;
    let taps = g.taps();
    let one = |wide: &mut Vec<f32>, (o, yc): (usize, &mut [f32])| {
        let plane = &planes[(o / mult) * channel_len..][..channel_len];
        depthwise_channel(g, &w[o * taps..][..taps], plane, n, yc, wide);
    };
    if depthwise_parallel(g, n, threads) {
        y.par_chunks_mut(per_out.max(1)).enumerate().for_each_init(Vec::new, one);
    } else {
        let mut wide = Vec::new();
        y.chunks_mut(per_out.max(1)).enumerate().for_each(|c| one(&mut wide, c));
    }
}

fn depthwise_weight_grad(
    g: &ConvGeometry,
    dy: &[f32],
    planes: &[f32],
    n: usize,
    dw: &mut [f32],
    threads: usize,
) {
    let channel_len = PlaneLayout::of(g).channel_len(n);
    let per_out = n * g.positions();
    let mult = g.out_channels / g.group;
    let taps = g.taps();
    let one = |wide: &mut Vec<f32>, (o, dwc): (usize, &mut [f32])| {
        let plane = &planes[(o / mult) * channel_len..][..channel_len];
        dwc.fill(0.0);
        depthwise_channel_grad(g, &dy[o * per_out..][..per_out], plane, n, dwc, wide);
    };
    if depthwise_parallel(g, n, threads) {
        dw.par_chunks_mut(taps).enumerate().for_each_init(Vec::new, one);
    } else {
        let mut wide = Vec::new();
        dw.chunks_mut(taps).enumerate().for_each(|c| one(&mut wide, c));
    }
}
