//! Image decoding shared by the `ImageDecoder` op and the command line's image folders, pixel for
//! pixel as Pillow (the ONNX reference) and OpenCV decode: JPEG through libjpeg-turbo's decoder
//! (as built by the `mozjpeg` crate: accurate integer IDCT, smooth chroma upsampling), JPEG 2000
//! through `hayro-jpeg2000`, BMP, PNG, PNM, TIFF and WebP through the `image` crate. Alpha is dropped, 16-bit samples are scaled to 8,
//! and colour becomes gray with Pillow's ITU-R 601-2 weights. The size in the header is checked
//! against a byte limit before any pixel is decoded, and a truncated or corrupt stream is an error.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder as _, ImageReader, Limits};
use mozjpeg_sys::{J_COLOR_SPACE, JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr};

/// Channel layout of a decoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// `[H, W, 3]`, red first.
    Rgb,
    /// `[H, W, 3]`, blue first.
    Bgr,
    /// `[H, W, 1]`.
    Grayscale,
}

impl PixelFormat {
    fn channels(self) -> usize {
        if self == PixelFormat::Grayscale { 1 } else { 3 }
    }
}

/// Pixels of a decoded image, row-major `[height, width, channels]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// 3 for RGB/BGR, 1 for grayscale.
    pub channels: usize,
    /// `height·width·channels` samples.
    pub pixels: Vec<u8>,
}

/// Decodes an encoded image (BMP, JPEG, JPEG 2000, PNG, PNM, TIFF or WebP) to `format`, refusing one whose
/// decoded pixels (and, for JPEG, the decoder's coefficient buffers) would exceed `max_bytes`.
pub fn decode_image(bytes: &[u8], format: PixelFormat, max_bytes: usize) -> Result<DecodedImage, String> {
    let (height, width, samples, colour) = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes, max_bytes)?
    } else if bytes.starts_with(b"\x00\x00\x00\x0C\x6A\x50\x20\x20")
        || bytes.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
    {
        decode_jpeg2000(bytes, max_bytes)?
    } else {
        decode_other(bytes, format, max_bytes)?
    };
    let pixels = match (format, colour) {
        (PixelFormat::Rgb, true) => samples,
        (PixelFormat::Bgr, true) => {
            let mut samples = samples;
            samples.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
            samples
        }
        (PixelFormat::Grayscale, true) => samples.chunks_exact(3).map(pillow_gray).collect(),
        (PixelFormat::Grayscale, false) => samples,
        (PixelFormat::Rgb | PixelFormat::Bgr, false) => samples.iter().flat_map(|&v| [v; 3]).collect(),
    };
    Ok(DecodedImage { height, width, channels: format.channels(), pixels })
}

/// Pillow's conversion of 8-bit RGB to gray (`L = R·299/1000 + G·587/1000 + B·114/1000` in 16-bit
/// fixed point, rounded to nearest).
fn pillow_gray(rgb: &[u8]) -> u8 {
    let [r, g, b] = [rgb[0], rgb[1], rgb[2]].map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// An error unless `height × width × per_pixel` bytes fit `max_bytes`.
fn check_size(height: usize, width: usize, per_pixel: usize, max_bytes: usize) -> Result<(), String> {
    match height.checked_mul(width).and_then(|n| n.checked_mul(per_pixel)) {
        Some(bytes) if bytes <= max_bytes => Ok(()),
        _ => Err(format!(
            "an image of {width}×{height} needs more than the memory limit of {max_bytes} bytes (raise it with --max-memory)"
        )),
    }
}

/// `(height, width, samples, colour)`: RGB samples when `colour`, gray ones otherwise.
type Samples = (usize, usize, Vec<u8>, bool);

/// Decodes BMP, PNG, PNM, TIFF or WebP to RGB, or to gray when the image has no colour.
fn decode_other(bytes: &[u8], format: PixelFormat, max_bytes: usize) -> Result<Samples, String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the encoded stream: {e}"))?;
    if reader.format().is_none() {
        return Err("the encoded stream is not a BMP, JPEG, JPEG 2000, PNG, PNM, TIFF or WebP image".into());
    }
    let mut decoder = reader.into_decoder().map_err(|e| format!("not a readable image: {e}"))?;
    let (w, h) = decoder.dimensions();
    let (height, width) = (h as usize, w as usize);
    check_size(
        height,
        width,
        format.channels().max(decoder.color_type().bytes_per_pixel().into()),
        max_bytes,
    )?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_bytes as u64);
    decoder.set_limits(limits).map_err(|e| format!("image of {w}×{h}: {e}"))?;
    let image = DynamicImage::from_decoder(decoder).map_err(|e| format!("not a readable image: {e}"))?;
    Ok(if image.color().has_color() {
        (height, width, image.into_rgb8().into_raw(), true)
    } else {
        (height, width, image.into_luma8().into_raw(), false)
    })
}

/// Decodes a JPEG 2000 image (a JP2 file or a raw codestream) to RGB, or to gray when it has one
/// colour channel; alpha is dropped. The decoder keeps its own buffers of every component in f32.
fn decode_jpeg2000(bytes: &[u8], max_bytes: usize) -> Result<Samples, String> {
    let decoded = std::panic::catch_unwind(|| -> Result<Samples, String> {
        let settings = hayro_jpeg2000::DecodeSettings::default();
        let image = hayro_jpeg2000::Image::new(bytes, &settings).map_err(|e| format!("{e:?}"))?;
        let (height, width) = (image.height() as usize, image.width() as usize);
        let colours = usize::from(image.color_space().num_channels());
        let stored = colours + usize::from(image.has_alpha());
        check_size(height, width, stored.max(1) * 9, max_bytes)?;
        if colours != 1 && colours != 3 {
            return Err(format!("{colours} colour channels (only gray and RGB are decoded)"));
        }
        let mut context = hayro_jpeg2000::DecoderContext::default();
        let pixels = image.decode(&mut context).map_err(|e| format!("{e:?}"))?.data_u8();
        let samples = if stored == colours {
            pixels
        } else {
            pixels.chunks_exact(stored).flat_map(|p| p[..colours].iter().copied()).collect()
        };
        if samples.len() != height * width * colours {
            return Err(format!("{} samples for {width}×{height}×{colours}", samples.len()));
        }
        Ok((height, width, samples, colours == 3))
    });
    match decoded {
        Ok(result) => result.map_err(|e| format!("not a readable JPEG 2000 image: {e}")),
        Err(_) => Err("not a readable JPEG 2000 image: the decoder failed".into()),
    }
}

/// Decodes a JPEG with libjpeg-turbo: RGB for colour images, gray for grayscale ones. libjpeg
/// reports errors by unwinding out of its error handler; the unwind is caught here.
fn decode_jpeg(bytes: &[u8], max_bytes: usize) -> Result<Samples, String> {
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Samples> {
        let jpeg = mozjpeg::decompress::DecompressBuilder::new().with_err(error_manager()).from_mem(bytes)?;
        let (width, height) = jpeg.size();
        // Progressive images keep every coefficient (2 bytes a sample) besides the output.
        check_size(height, width, 9, max_bytes).map_err(std::io::Error::other)?;
        let colour = jpeg.color_space() != J_COLOR_SPACE::JCS_GRAYSCALE;
        let mut started = if colour { jpeg.rgb()? } else { jpeg.grayscale()? };
        let samples: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok((height, width, samples, colour))
    });
    match decoded {
        Ok(Ok(samples)) => Ok(samples),
        Ok(Err(e)) => Err(format!("not a readable JPEG: {e}")),
        Err(payload) => Err(format!(
            "not a readable JPEG: {}",
            payload.downcast_ref::<String>().map_or("libjpeg failed", String::as_str)
        )),
    }
}

/// libjpeg's standard error manager with its exits turned into unwinds (no message printed):
/// every error, and the warning that the stream ended early, which libjpeg would otherwise pad
/// over with gray rows.
fn error_manager() -> jpeg_error_mgr {
    // SAFETY: an all-zero `jpeg_error_mgr` is valid (null pointers, `None` handlers), and
    // `jpeg_std_error` fills every field of it.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid, exclusively borrowed error manager.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(fail);
    err.emit_message = Some(on_message);
    err
}

/// The message template of libjpeg's current message code.
fn message(cinfo: &jpeg_common_struct) -> String {
    // SAFETY: libjpeg sets `err` to the manager built by `error_manager` before any call.
    let Some(err) = (unsafe { cinfo.err.as_ref() }) else { return "libjpeg failed".into() };
    let code = err.msg_code;
    if err.jpeg_message_table.is_null() || code < 0 || code > err.last_jpeg_message {
        return format!("libjpeg message {code}");
    }
    // SAFETY: the table holds `last_jpeg_message + 1` NUL-terminated strings (libjpeg's jerror.h).
    let text = unsafe { *err.jpeg_message_table.add(code as usize) };
    if text.is_null() {
        return format!("libjpeg message {code}");
    }
    // SAFETY: checked non-null above; the table's strings are static and NUL-terminated.
    let template = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    let words = &err.msg_parm._bindgen_data_;
    let ints: [i32; 8] = std::array::from_fn(|i| words[i] as i32);
    fill_template(&template, &ints)
}

/// A libjpeg message template with its `%d`/`%u`/`%x` conversions (flags and widths included)
/// replaced by `ints` in order; `%s` (a string parameter) becomes `?`.
fn fill_template(template: &str, ints: &[i32; 8]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut next = ints.iter();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        for spec in chars.by_ref() {
            match spec {
                'd' | 'u' => out.push_str(&next.next().map_or(String::new(), i32::to_string)),
                'x' | 'X' => out.push_str(&next.next().map_or(String::new(), |v| format!("{v:02x}"))),
                's' => out.push('?'),
                '%' => out.push('%'),
                _ => continue,
            }
            break;
        }
    }
    out
}

extern "C-unwind" fn fail(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(message(cinfo)));
}

extern "C-unwind" fn on_message(cinfo: &mut jpeg_common_struct, level: std::ffi::c_int) {
    // SAFETY: as in `message`.
    let truncated = unsafe { cinfo.err.as_ref() }.is_some_and(|e| e.msg_code == JWRN_JPEG_EOF);
    if level < 0 && truncated {
        std::panic::resume_unwind(Box::new("the stream ends before the image does".to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::{fill_template, pillow_gray};

    #[test]
    fn libjpeg_templates_are_filled() {
        let ints = [65500, 0x1c, 3, 0, 0, 0, 0, 0];
        assert_eq!(
            fill_template("Maximum supported image dimension is %u pixels", &ints),
            "Maximum supported image dimension is 65500 pixels"
        );
        assert_eq!(
            fill_template("Bogus marker 0x%02x after %d%%, %s", &[0x1c; 8]),
            "Bogus marker 0x1c after 28%, ?"
        );
    }

    #[test]
    fn gray_weights_are_pillows() {
        assert_eq!(pillow_gray(&[255, 255, 255]), 255);
        assert_eq!(pillow_gray(&[0, 0, 0]), 0);
        // Pillow: Image.new("RGB", (1, 1), (200, 100, 50)).convert("L") is 124.
        assert_eq!(pillow_gray(&[200, 100, 50]), 124);
    }
}
