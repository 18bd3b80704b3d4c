//! `ImageDecoder`: an encoded image in a uint8 tensor decoded to `[H, W, 3]` RGB or BGR, or
//! `[H, W, 1]` grayscale, by [`crate::image_codec`] within the session's memory limit.

use qgraph::{DType, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, tensor_from};
use crate::error::{KernelResult, Result};
use crate::image_codec::{PixelFormat, decode_image};

struct ImageDecoder {
    format: PixelFormat,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "ImageDecoder" {
        return None;
    }
    Some((|| {
        let format = match node.string_attr("pixel_format")?.unwrap_or("RGB") {
            "RGB" => PixelFormat::Rgb,
            "BGR" => PixelFormat::Bgr,
            "Grayscale" => PixelFormat::Grayscale,
            other => return Err(super::invalid(node, format!("unknown pixel_format '{other}'"))),
        };
        Ok(Box::new(ImageDecoder { format }) as Box<dyn Kernel>)
    })())
}

impl Kernel for ImageDecoder {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        if x.dtype() != DType::U8 {
            return Err(format!("encoded_stream must be uint8, got {}", x.dtype()));
        }
        let image = decode_image(&x.to_le_bytes(), self.format, ctx.max_bytes)?;
        Ok(vec![tensor_from(&[image.height, image.width, image.channels], image.pixels)?])
    }
}
