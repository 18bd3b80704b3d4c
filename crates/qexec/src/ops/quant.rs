//! `QuantizeLinear` and `DequantizeLinear` with ONNX semantics (round half to even, saturate to
//! the integer type), per tensor or per axis, for 8- and 16-bit integers (and int32 dequantize, as
//! biases of QDQ models use).

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
        if node.int_attr("block_size", 0)? != 0 {
            return Err(super::invalid(node, "blocked quantization (block_size) is not supported"));
        }
        let output = match node.int_attr("output_dtype", 0)? {
            0 => None,
            code => Some(
                DType::from_onnx(code as i32)
                    .ok_or_else(|| super::invalid(node, format!("unsupported output_dtype {code}")))?,
            ),
        };
        Ok(Box::new(Qdq { quantize, axis: node.int_attr("axis", 1)?, output }) as Box<dyn Kernel>)
    })())
}

struct Qdq {
    quantize: bool,
    axis: i64,
    output: Option<DType>,
}

/// Per-element (scale, zero point) lookup: per tensor, or per index along `axis`.
struct Params {
    scale: Vec<f32>,
    zero: Vec<f64>,
    inner: usize,
}

impl Params {
    fn new(x: &[usize], scale: &Tensor, zero: Option<&Tensor>, axis: i64) -> KernelResult<Params> {
        let s: Vec<f32> = super::f32_data(scale)?.into_owned();
        let z: Vec<f64> = zero.map(Tensor::to_f64_vec).unwrap_or_else(|| vec![0.0; s.len()]);
        if z.len() != s.len() {
            return Err(format!("{} scales but {} zero points", s.len(), z.len()));
        }
        if s.len() == 1 {
            return Ok(Params { scale: s, zero: z, inner: usize::MAX });
        }
        let axis = norm_axis(axis, x.len())?;
        if x[axis] != s.len() || scale.shape().len() != 1 {
            return Err(format!("scale shape {:?} does not match axis {axis} of input {x:?}", scale.shape()));
        }
        Ok(Params { scale: s, zero: z, inner: x[axis + 1..].iter().product::<usize>().max(1) })
    }

    fn at(&self, i: usize) -> (f32, f64) {
        if self.inner == usize::MAX {
            return (self.scale[0], self.zero[0]);
        }
        let c = (i / self.inner) % self.scale.len();
        (self.scale[c], self.zero[c])
    }
}

/// The representable range of an integer dtype.
fn int_range(d: DType) -> KernelResult<(f64, f64)> {
    Ok(match d {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        other => return Err(format!("quantized dtype {other} is not supported")),
    })
}

impl Kernel for Qdq {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let (x, scale, zero) = (input(inputs, 0)?, input(inputs, 1)?, opt_input(inputs, 2));
        let p = Params::new(x.shape(), scale, zero, self.axis)?;
        let shape = x.shape().to_vec();
        if self.quantize {
            let to = zero.map(Tensor::dtype).or(self.output).unwrap_or(DType::U8);
            let (lo, hi) = int_range(to)?;
            let xs = super::f32_data(x)?;
            let q: Vec<i64> = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let (s, z) = p.at(i);
                    let r = f64::from((v / s).round_ties_even()) + z;
                    r.clamp(lo, hi) as i64
                })
                .collect();
            Ok(vec![Tensor::from_i64s(to, &shape, &q).ok_or("internal")?])
        } else {
            int_range(x.dtype())?;
            let xs = x.to_i64_vec().ok_or("DequantizeLinear needs an integer input")?;
            let y: Vec<f32> = xs
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let (s, z) = p.at(i);
                    ((q as f64 - z) as f32) * s
                })
                .collect();
            typed::<f32>(scale)?;
            Ok(vec![super::tensor_from(&shape, y)?])
        }
    }
}
