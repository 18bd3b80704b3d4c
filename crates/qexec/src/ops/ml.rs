//! The `ai.onnx.ml` ops of numeric pipelines: `Binarizer` (1 above the threshold, else 0, in the
//! input's type) and `ArrayFeatureExtractor` (columns picked from the last axis; a vector input
//! gives one row, as onnxruntime does).

use qgraph::{Node, Tensor};

use super::{
    Activation, ExecCtx, Kernel, contiguous, f32_data, input, ints_of, tensor_from, typed, with_dtype,
};
use crate::error::{ExecError, KernelResult, Result};

enum Ml {
    Binarizer { threshold: f32 },
    ArrayFeatureExtractor,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.domain != "ai.onnx.ml" {
        return None;
    }
    Some(match node.op_type.as_str() {
        "Binarizer" => node
            .float_attr("threshold", 0.0)
            .map_err(ExecError::from)
            .map(|threshold| Box::new(Ml::Binarizer { threshold }) as Box<dyn Kernel>),
        "ArrayFeatureExtractor" => Ok(Box::new(Ml::ArrayFeatureExtractor) as Box<dyn Kernel>),
        _ => return None,
    })
}

impl Kernel for Ml {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        match self {
            Ml::Binarizer { threshold } => {
                let out = f32_data(x)?.iter().map(|&v| if v > *threshold { 1.0f32 } else { 0.0 }).collect();
                Ok(vec![tensor_from(x.shape(), out)?])
            }
            Ml::ArrayFeatureExtractor => {
                let picks = ints_of(input(inputs, 1)?)?;
                let (rows, width) = match x.shape() {
                    [] => return Err("the input must have at least one dim".into()),
                    [w] => (1, *w),
                    s => (s[..s.len() - 1].iter().product(), s[s.len() - 1]),
                };
                let columns = picks
                    .iter()
                    .map(|&i| {
                        usize::try_from(i)
                            .ok()
                            .filter(|&i| i < width)
                            .ok_or_else(|| format!("index {i} is out of range for {width} columns"))
                    })
                    .collect::<KernelResult<Vec<usize>>>()?;
                let mut shape =
                    if x.shape().len() == 1 { vec![1] } else { x.shape()[..x.shape().len() - 1].to_vec() };
                shape.push(columns.len());
                ctx.checked_len(&shape, x.dtype().size_of())?;
                Ok(vec![with_dtype!(x.dtype(), T => {
                    let data = contiguous(typed::<T>(x)?);
                    let mut out = Vec::with_capacity(rows * columns.len());
                    for r in 0..rows {
                        out.extend(columns.iter().map(|&c| data[r * width + c]));
                    }
                    tensor_from(&shape, out)?
                })])
            }
        }
    }
}
