//! `QuantizeLinear` and `DequantizeLinear` with ONNX semantics (round half to even, saturate to
//! the integer type), per tensor, per axis or per block along an axis (`block_size`), for 4-, 8- and
//! 16-bit integers (and int32 dequantize, as biases of QDQ models use).

use qgraph::{DType, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, norm_axis, opt_input, typed};
use crate::error::{KernelResult, Result};

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    let quantize = match node.op_type.as_str() {
        "QuantizeLinear" => true,
        "DequantizeLinear" => false,
        _ => return None,
    };
    Some((|| {
        let block = node.int_attr("block_size", 0)?;
        let block = usize::try_from(block)
            .map_err(|_| super::invalid(node, format!("block_size {block} is negative")))?;
        let output = match node.int_attr("output_dtype", 0)? {
            0 => None,
            code => Some(
                DType::from_onnx(code as i32)
                    .ok_or_else(|| super::invalid(node, format!("unsupported output_dtype {code}")))?,
            ),
        };
        Ok(Box::new(Qdq { quantize, axis: node.int_attr("axis", 1)?, block, output }) as Box<dyn Kernel>)
    })())
}

struct Qdq {
    quantize: bool,
    axis: i64,
    /// Elements along `axis` sharing one scale (0: per tensor or per axis).
    block: usize,
    output: Option<DType>,
}

/// Scales and zero points, one per tensor or one per index along an axis.
struct Params {
    scale: Vec<f32>,
    zero: Vec<f64>,
    /// Elements sharing one parameter pair in a row-major run (the product of the dims after
    /// the axis); the whole tensor for per-tensor parameters.
    inner: usize,
}

impl Params {
    fn new(
        x: &[usize],
        scale: &Tensor,
        zero: Option<&Tensor>,
        axis: i64,
        block: usize,
    ) -> KernelResult<Params> {
        let s: Vec<f32> = super::f32_data(scale)?.into_owned();
        let z: Vec<f64> = zero.map(Tensor::to_f64_vec).unwrap_or_else(|| vec![0.0; s.len()]);
        if z.len() != s.len() {
            return Err(format!("{} scales but {} zero points", s.len(), z.len()));
        }
        let count: usize = x.iter().product();
        if block > 0 {
            return Params::blocked(x, scale.shape(), &s, &z, axis, block);
        }
        if s.len() == 1 {
            return Ok(Params { scale: s, zero: z, inner: count.max(1) });
        }
        let axis = norm_axis(axis, x.len())?;
        if x[axis] != s.len() || scale.shape().len() != 1 {
            return Err(format!("scale shape {:?} does not match axis {axis} of input {x:?}", scale.shape()));
        }
        Ok(Params { scale: s, zero: z, inner: x[axis + 1..].iter().product::<usize>().max(1) })
    }

    /// Blocked parameters (one pair per `block` elements along `axis`), expanded to one pair per
    /// element.
    fn blocked(
        x: &[usize],
        ss: &[usize],
        s: &[f32],
        z: &[f64],
        axis: i64,
        block: usize,
    ) -> KernelResult<Params> {
        let axis = norm_axis(axis, x.len())?;
        let fits = ss.len() == x.len()
            && (0..x.len()).all(|d| if d == axis { ss[d] == x[d].div_ceil(block) } else { ss[d] == x[d] });
        if !fits {
            return Err(format!(
                "scale shape {ss:?} does not block input {x:?} by {block} along axis {axis}"
            ));
        }
        let (xs, sst) = (super::strides_of(x), super::strides_of(ss));
        let count: usize = x.iter().product();
        let at = |flat: usize| -> usize {
            (0..x.len())
                .map(|d| {
                    let c = (flat / xs[d]) % x[d];
                    (if d == axis { c / block } else { c }) * sst[d]
                })
                .sum()
        };
        let (scale, zero) = (0..count).map(|i| (s[at(i)], z[at(i)])).unzip();
        Ok(Params { scale, zero, inner: 1 })
    }

    /// Runs `f(run, scale, zero)` over the runs of elements that share parameters.
    fn for_runs<T>(&self, data: &[T], mut f: impl FnMut(&[T], f32, f64)) {
        for (i, run) in data.chunks(self.inner).enumerate() {
            let c = i % self.scale.len();
            f(run, self.scale[c], self.zero[c]);
        }
    }
}

/// The representable range of an integer dtype.
fn int_range(d: DType) -> KernelResult<(f64, f64)> {
    Ok(match d {
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        other => return Err(format!("quantized dtype {other} is not supported")),
    })
}

/// Integer element types of quantized tensors.
trait QuantInt: qgraph::Element {
    fn from_level(v: f32) -> Self;
    fn level(self) -> i32;
}

macro_rules! quant_int {
    ($($t:ty),*) => {$(
        impl QuantInt for $t {
            fn from_level(v: f32) -> Self { v as $t }
            fn level(self) -> i32 { self as i32 }
        }
    )*};
}
quant_int!(u8, i8, u16, i16, i32);

impl QuantInt for qgraph::Int4 {
    fn from_level(v: f32) -> Self {
        qgraph::Int4::saturating(v as i64)
    }
    fn level(self) -> i32 {
        i32::from(self.get())
    }
}

impl QuantInt for qgraph::UInt4 {
    fn from_level(v: f32) -> Self {
        qgraph::UInt4::saturating(v as i64)
    }
    fn level(self) -> i32 {
        i32::from(self.get())
    }
}

qkernels::multiversion! {
    /// Quantization levels `clamp(round_half_even(x / s) + z, lo, hi)` of one run of elements.
    fn levels(xs: &[f32], s: f32, z: f32, lo: f32, hi: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(xs) {
            *o = ((v / s).round_ties_even() + z).clamp(lo, hi);
        }
    }
}

fn quantize<T: QuantInt>(xs: &[f32], p: &Params, shape: &[usize]) -> KernelResult<Tensor> {
    let (lo, hi) = int_range(T::DTYPE)?;
    let mut q = vec![0f32; xs.len()];
    let mut at = 0;
    p.for_runs(xs, |run, s, z| {
        levels(run, s, z as f32, lo as f32, hi as f32, &mut q[at..at + run.len()]);
        at += run.len();
    });
    super::tensor_from(shape, q.iter().map(|&v| T::from_level(v)).collect())
}

/// `(q − z) · s` over one run, with ONNX's int32 arithmetic.
#[inline(always)]
fn dequantize_run<T: QuantInt>(run: &[T], s: f32, z: i32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(run) {
        *o = q.level().wrapping_sub(z) as f32 * s;
    }
}

fn dequantize<T: QuantInt>(x: &Tensor, p: &Params) -> KernelResult<Tensor> {
    let a = typed::<T>(x)?;
    let std = a.as_standard_layout();
    let xs = std.as_slice().ok_or("internal")?;
    let mut y = vec![0f32; xs.len()];
    let mut at = 0;
    p.for_runs(xs, |run, s, z| {
        dequantize_run(run, s, z as i32, &mut y[at..at + run.len()]);
        at += run.len();
    });
    super::tensor_from(x.shape(), y)
}

impl Kernel for Qdq {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (x, scale, zero) = (input(inputs, 0)?, input(inputs, 1)?, opt_input(inputs, 2));
        let p = Params::new(x.shape(), scale, zero, self.axis, self.block)?;
        if self.quantize {
            let to = zero.map(Tensor::dtype).or(self.output).unwrap_or(DType::U8);
            let xs = super::f32_data(x)?;
            let shape = x.shape();
            Ok(vec![match to {
                DType::U8 => quantize::<u8>(&xs, &p, shape)?,
                DType::I8 => quantize::<i8>(&xs, &p, shape)?,
                DType::U16 => quantize::<u16>(&xs, &p, shape)?,
                DType::I16 => quantize::<i16>(&xs, &p, shape)?,
                DType::U4 => quantize::<qgraph::UInt4>(&xs, &p, shape)?,
                DType::I4 => quantize::<qgraph::Int4>(&xs, &p, shape)?,
                other => return Err(format!("quantized dtype {other} is not supported")),
            }])
        } else {
            typed::<f32>(scale)?;
            Ok(vec![match x.dtype() {
                DType::U8 => dequantize::<u8>(x, &p)?,
                DType::I8 => dequantize::<i8>(x, &p)?,
                DType::U16 => dequantize::<u16>(x, &p)?,
                DType::I16 => dequantize::<i16>(x, &p)?,
                DType::I32 => dequantize::<i32>(x, &p)?,
                DType::U4 => dequantize::<qgraph::UInt4>(x, &p)?,
                DType::I4 => dequantize::<qgraph::Int4>(x, &p)?,
                other => return Err(format!("quantized dtype {other} is not supported")),
            }])
        }
    }
}
