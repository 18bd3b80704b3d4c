//! `ImageDecoder` on images encoded here: JPEG and PNG in every pixel format, gray sources, alpha
//! dropped; truncated, corrupt (JPEG 2000 too) and oversized streams are one-line errors within the memory limit.

mod common;

use common::{Src, one_node};
use image::{ImageEncoder, codecs::jpeg::JpegEncoder, codecs::png::PngEncoder};
use qexec::{Session, SessionOptions};
use qgraph::{Attribute, Tensor};

/// A `w`×`h` image with `channels` samples per pixel that vary smoothly (JPEG-friendly).
fn gradient(w: u32, h: u32, channels: u32) -> Vec<u8> {
    (0..h)
        .flat_map(|y| {
            (0..w).flat_map(move |x| (0..channels).map(move |c| ((x * 3 + y * 2 + c * 70) % 256) as u8))
        })
        .collect()
}

fn jpeg(pixels: &[u8], w: u32, h: u32, color: image::ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90).write_image(pixels, w, h, color).unwrap();
    out
}

fn png(pixels: &[u8], w: u32, h: u32, color: image::ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out).write_image(pixels, w, h, color).unwrap();
    out
}

/// Runs `ImageDecoder` on `bytes` with a session limit of `max_bytes`.
fn decode(bytes: &[u8], format: &str, max_bytes: usize) -> Result<Tensor, String> {
    let stream = Tensor::from_vec(&[bytes.len()], bytes.to_vec()).unwrap();
    let attrs = vec![("pixel_format", Attribute::String(format.into()))];
    let (model, feeds) = one_node("ImageDecoder", vec![Src::Fed(stream)], attrs, 1, 20);
    let options = SessionOptions { max_tensor_bytes: max_bytes, ..SessionOptions::threads(1) };
    let session = Session::new(model, options).map_err(|e| e.to_string())?;
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    session.run(&feeds).map(|mut r| r.remove(0)).map_err(|e| e.to_string())
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.view::<u8>().unwrap().iter().copied().collect()
}

#[test]
fn jpeg_decodes_to_rgb_bgr_and_pillows_gray() {
    let (w, h) = (24, 16);
    let source = gradient(w, h, 3);
    let encoded = jpeg(&source, w, h, image::ExtendedColorType::Rgb8);
    let rgb = decode(&encoded, "RGB", 1 << 20).unwrap();
    assert_eq!(rgb.shape(), [16, 24, 3]);
    let rgb = bytes_of(&rgb);
    let worst = rgb.iter().zip(&source).map(|(&a, &b)| a.abs_diff(b)).max().unwrap();
    assert!(worst <= 24, "JPEG at quality 90 off by {worst}");
    let bgr = bytes_of(&decode(&encoded, "BGR", 1 << 20).unwrap());
    let swapped: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    assert_eq!(bgr, swapped);
    let gray = decode(&encoded, "Grayscale", 1 << 20).unwrap();
    assert_eq!(gray.shape(), [16, 24, 1]);
    let pillow: Vec<u8> = rgb
        .chunks(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    assert_eq!(bytes_of(&gray), pillow);
}

#[test]
fn gray_sources_are_replicated_and_alpha_is_dropped() {
    let (w, h) = (8, 6);
    let luma = gradient(w, h, 1);
    let encoded = jpeg(&luma, w, h, image::ExtendedColorType::L8);
    let gray = bytes_of(&decode(&encoded, "Grayscale", 1 << 20).unwrap());
    let rgb = bytes_of(&decode(&encoded, "RGB", 1 << 20).unwrap());
    assert_eq!(rgb, gray.iter().flat_map(|&v| [v; 3]).collect::<Vec<_>>());

    let rgba = gradient(w, h, 4);
    let encoded = png(&rgba, w, h, image::ExtendedColorType::Rgba8);
    let rgb = bytes_of(&decode(&encoded, "RGB", 1 << 20).unwrap());
    assert_eq!(rgb, rgba.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect::<Vec<_>>());
}

#[test]
fn bad_streams_are_errors() {
    let (w, h) = (32, 32);
    let encoded = jpeg(&gradient(w, h, 3), w, h, image::ExtendedColorType::Rgb8);
    let e = decode(&encoded[..encoded.len() / 2], "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("ends before"), "{e}");
    let e = decode(&encoded[..40], "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("JPEG"), "{e}");
    let e = decode(b"not an image at all", "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("not a BMP, JPEG, JPEG 2000"), "{e}");
    let e = decode(&[0xFF, 0x4F, 0xFF, 0x51, 0, 0x29, 1, 2, 3], "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("not a readable JPEG 2000"), "{e}");
    let e = decode(b"\x00\x00\x00\x0C\x6A\x50\x20\x20\x0D\x0A\x87\x0A", "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("not a readable JPEG 2000"), "{e}");
    let e = decode(&[], "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("not a BMP, JPEG, JPEG 2000"), "{e}");
    let encoded_png = png(&gradient(w, h, 3), w, h, image::ExtendedColorType::Rgb8);
    let e = decode(&encoded_png[..encoded_png.len() - 30], "RGB", 1 << 20).unwrap_err();
    assert!(e.contains("not a readable image"), "{e}");
    let e = decode(&encoded, "YUV", 1 << 20).unwrap_err();
    assert!(e.contains("pixel_format"), "{e}");
}

#[test]
fn sizes_in_headers_go_through_the_memory_guard() {
    let (w, h) = (32, 32);
    let mut encoded = jpeg(&gradient(w, h, 3), w, h, image::ExtendedColorType::Rgb8);
    // The baseline frame header (FFC0): length (2), precision (1), then height and width.
    let sof = encoded.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    encoded[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let e = decode(&encoded, "RGB", 64 << 20).unwrap_err();
    assert!(e.contains("60000×60000") && e.contains("memory limit"), "{e}");

    let encoded = png(&gradient(w, h, 3), w, h, image::ExtendedColorType::Rgb8);
    let e = decode(&encoded, "RGB", 1000).unwrap_err();
    assert!(e.contains("32×32") && e.contains("memory limit"), "{e}");
}

#[test]
fn mutated_streams_decode_or_fail_cleanly() {
    let (w, h) = (32, 24);
    let source = gradient(w, h, 3);
    let seeds = [
        jpeg(&source, w, h, image::ExtendedColorType::Rgb8),
        png(&source, w, h, image::ExtendedColorType::Rgb8),
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for _ in 0..300 {
            let mut bytes = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            let cut = bytes.len() - (next() as usize) % 8;
            // Either pixels of the header's size or an error: never a panic or an abort.
            if let Ok(t) = decode(&bytes[..cut], "RGB", 1 << 20) {
                assert_eq!(t.shape()[2], 3);
            }
        }
    }
}
