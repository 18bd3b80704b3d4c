//! Folders of images (JPEG, PNG, BMP, WebP, TIFF, PNM, JPEG 2000) as model input, the ImageNet way: each image (sorted by file name)
//! decoded to RGB, its shorter side resized to `resize` (bilinear), centre-cropped to
//! `size`×`size`, and stacked into a u8 batch `[N, 3, size, size]` (or `[N, size, size, 3]`);
//! `--mean/--std` or `--offset/--scale` then make the float input.

use std::path::Path;

use anyhow::{Context, bail};
use image::imageops::FilterType;
use qexec::image_codec::{PixelFormat, decode_image};
use qgraph::Tensor;

/// Channel order of the stacked batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum Layout {
    /// `[N, 3, H, W]`.
    #[default]
    Nchw,
    /// `[N, H, W, 3]`.
    Nhwc,
}

/// The file extensions this loader reads.
const EXTENSIONS: [&str; 11] =
    ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "ppm", "pgm", "jp2", "j2k"];

/// Whether `name` is an image file this loader reads.
fn is_image(name: &Path) -> bool {
    name.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes `file` to RGB as Pillow does (`qexec::image_codec`), the file and its pixels bounded by
/// 512 MiB or `limit`: a truncated or corrupt file, or one that would not fit, is an error naming it.
fn decode(file: &Path, limit: usize) -> anyhow::Result<image::RgbImage> {
    let limit = limit.min(512 << 20);
    let size = std::fs::metadata(file).with_context(|| format!("cannot open {}", file.display()))?.len();
    if size > limit as u64 {
        bail!(
            "{}: a file of {size} bytes is beyond the memory limit of {limit} bytes (--max-memory)",
            file.display()
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot open {}", file.display()))?;
    let decoded = decode_image(&bytes, PixelFormat::Rgb, limit)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let (w, h) = (u32::try_from(decoded.width)?, u32::try_from(decoded.height)?);
    image::RgbImage::from_raw(w, h, decoded.pixels)
        .with_context(|| format!("{}: pixel count", file.display()))
}

/// Loads every image of `dir`, resized (shorter side `resize`), centre-cropped to `size`.
pub(crate) fn load_folder(dir: &Path, resize: u32, size: u32, layout: Layout) -> anyhow::Result<Tensor> {
    if size == 0 || resize < size {
        bail!("--image-size {size} must be at least 1 and not above --resize {resize}");
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no images ({})", dir.display(), EXTENSIONS.join(", "));
    }
    let s = size as usize;
    let limit = qexec::default_max_tensor_bytes();
    let fits = |dims: &[usize]| qexec::tensor_bytes(dims, 1).filter(|&b| b <= limit);
    let Some(total) = fits(&[files.len(), 3, s, s]) else {
        bail!(
            "{} images of {size}×{size} are beyond the memory limit of {limit} bytes (--max-memory)",
            files.len()
        );
    };
    let mut data = vec![0u8; total];
    for (n, file) in files.iter().enumerate() {
        let img = decode(file, limit)?;
        let (w, h) = img.dimensions();
        let scale = resize as f64 / w.min(h).max(1) as f64;
        let (nw, nh) =
            (((w as f64 * scale).round() as u32).max(size), ((h as f64 * scale).round() as u32).max(size));
        if fits(&[nw as usize, nh as usize, 3]).is_none() {
            bail!(
                "{}: resizing {w}×{h} to {nw}×{nh} (--resize {resize}) is beyond the memory limit",
                file.display()
            );
        }
        let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
        let crop =
            image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image();
        let sample = &mut data[n * 3 * s * s..(n + 1) * 3 * s * s];
        for (x, y, p) in crop.enumerate_pixels() {
            let (x, y) = (x as usize, y as usize);
            for c in 0..3 {
                let at = match layout {
                    Layout::Nchw => c * s * s + y * s + x,
                    Layout::Nhwc => (y * s + x) * 3 + c,
                };
                sample[at] = p[c];
            }
        }
    }
    let shape = match layout {
        Layout::Nchw => [files.len(), 3, s, s],
        Layout::Nhwc => [files.len(), s, s, 3],
    };
    Tensor::from_vec(&shape, data).context("image batch shape")
}
