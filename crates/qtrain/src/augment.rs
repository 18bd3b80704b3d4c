//! Image augmentation of training batches: a random horizontal flip and a random resized crop
//! (a region of `min_crop_area`..1 of the image at an aspect ratio of 3/4..4/3, resized back to
//! the image's size with bilinear interpolation at pixel centres), drawn per image from a seeded
//! generator. It applies to every 4-D float input; other inputs pass through. With distillation
//! the teacher sees the same augmented images, so a few hundred unlabeled images yield a new
//! training set every epoch.

use qgraph::Tensor;

use crate::error::{Result, TrainError};

/// Where the channels of an image batch are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// `[N, C, H, W]`.
    Nchw,
    /// `[N, H, W, C]`.
    Nhwc,
}

/// Augmentation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Flip half of the images left to right.
    pub flip: bool,
    /// Smallest share of the image's area a crop keeps (1: no cropping).
    pub min_crop_area: f32,
    /// Layout of the image inputs.
    pub layout: ImageLayout,
}

/// splitmix64: a small, seedable generator for sample orders and augmentations.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One image's crop window (in source pixels) and flip.
struct Window {
    top: f64,
    left: f64,
    height: f64,
    width: f64,
    flip: bool,
}

impl Augmentation {
    /// Checks the settings.
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.min_crop_area > 0.0 && self.min_crop_area <= 1.0) {
            return Err(TrainError::Data(format!(
                "the smallest crop area {} must lie in (0, 1]",
                self.min_crop_area
            )));
        }
        Ok(())
    }

    fn window(&self, rng: &mut SplitMix64, h: usize, w: usize) -> Window {
        let flip = self.flip && rng.unit() < 0.5;
        let (hf, wf) = (h as f64, w as f64);
        let area = f64::from(self.min_crop_area) + (1.0 - f64::from(self.min_crop_area)) * rng.unit();
        // The aspect ratio within 3/4..4/3 and such that the window fits: area ≤ ratio ≤ 1/area.
        let (lo, hi) = ((3.0f64 / 4.0).max(area).ln(), (4.0f64 / 3.0).min(1.0 / area).ln());
        let ratio = (lo + (hi - lo) * rng.unit()).exp();
        let height = (area / ratio).sqrt().min(1.0) * hf;
        let width = (area * ratio).sqrt().min(1.0) * wf;
        let top = (hf - height) * rng.unit();
        let left = (wf - width) * rng.unit();
        Window { top, left, height, width, flip }
    }

    /// `feeds` with every 4-D float input augmented, image by image, from `seed`.
    pub(crate) fn apply(&self, feeds: &[(String, Tensor)], seed: u64) -> Result<Vec<(String, Tensor)>> {
        let mut rng = SplitMix64::new(seed);
        feeds
            .iter()
            .map(|(name, t)| {
                let Some(a) = t.as_f32().filter(|a| a.ndim() == 4) else {
                    return Ok((name.clone(), t.clone()));
                };
                let s = a.shape();
                let (n, c, h, w) = match self.layout {
                    ImageLayout::Nchw => (s[0], s[1], s[2], s[3]),
                    ImageLayout::Nhwc => (s[0], s[3], s[1], s[2]),
                };
                let src: Vec<f32> = a.iter().copied().collect();
                let mut out = vec![0f32; src.len()];
                let at = |i: usize, ch: usize, y: usize, x: usize| match self.layout {
                    ImageLayout::Nchw => ((i * c + ch) * h + y) * w + x,
                    ImageLayout::Nhwc => ((i * h + y) * w + x) * c + ch,
                };
                for i in 0..n {
                    let win = self.window(&mut rng, h, w);
                    let columns: Vec<(usize, usize, f32)> = (0..w)
                        .map(|x| source(win.left, win.width, w, if win.flip { w - 1 - x } else { x }))
                        .collect();
                    for y in 0..h {
                        let (y0, y1, fy) = source(win.top, win.height, h, y);
                        for (x, &(x0, x1, fx)) in columns.iter().enumerate() {
                            for ch in 0..c {
                                let top = src[at(i, ch, y0, x0)] * (1.0 - fx) + src[at(i, ch, y0, x1)] * fx;
                                let bottom =
                                    src[at(i, ch, y1, x0)] * (1.0 - fx) + src[at(i, ch, y1, x1)] * fx;
                                out[at(i, ch, y, x)] = top * (1.0 - fy) + bottom * fy;
                            }
                        }
                    }
                }
                let t = Tensor::from_vec(s, out)
                    .ok_or_else(|| TrainError::Data(format!("input '{name}': internal shape mismatch")))?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}

/// The two source pixels along one axis that output pixel `o` (of `len`) interpolates between,
/// and the weight of the second, for a window of `size` pixels starting at `start`.
fn source(start: f64, size: f64, len: usize, o: usize) -> (usize, usize, f32) {
    let p = (start + (o as f64 + 0.5) * size / len as f64 - 0.5).clamp(0.0, (len - 1) as f64);
    let lo = p.floor() as usize;
    let hi = (lo + 1).min(len - 1);
    (lo, hi, (p - lo as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(n: usize, c: usize, h: usize, w: usize) -> Tensor {
        let data: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
        Tensor::from_vec(&[n, c, h, w], data).unwrap()
    }

    #[test]
    fn without_flip_or_crop_images_pass_unchanged_and_other_inputs_always_do() {
        let aug = Augmentation { flip: false, min_crop_area: 1.0, layout: ImageLayout::Nchw };
        let ids = Tensor::from_vec(&[2, 5], vec![1i64; 10]).unwrap();
        let feeds = vec![("x".to_string(), image(2, 3, 4, 5)), ("ids".to_string(), ids.clone())];
        let out = aug.apply(&feeds, 7).unwrap();
        assert_eq!(out[0].1.as_f32().unwrap(), feeds[0].1.as_f32().unwrap());
        assert_eq!(out[1].1.to_i64_vec(), ids.to_i64_vec());
    }

    #[test]
    fn a_flip_mirrors_rows_and_the_seed_decides_which_images() {
        let aug = Augmentation { flip: true, min_crop_area: 1.0, layout: ImageLayout::Nchw };
        let feeds = vec![("x".to_string(), image(16, 1, 2, 3))];
        let out = aug.apply(&feeds, 3).unwrap();
        let (src, got) = (feeds[0].1.as_f32().unwrap(), out[0].1.as_f32().unwrap());
        let mut flipped = 0;
        for i in 0..16 {
            let same = (0..2).all(|y| (0..3).all(|x| got[[i, 0, y, x]] == src[[i, 0, y, x]]));
            let mirrored = (0..2).all(|y| (0..3).all(|x| got[[i, 0, y, x]] == src[[i, 0, y, 2 - x]]));
            assert!(same || mirrored, "image {i} is neither itself nor its mirror");
            flipped += usize::from(mirrored);
        }
        assert!(flipped > 0 && flipped < 16, "{flipped} of 16 flipped");
        assert_eq!(aug.apply(&feeds, 3).unwrap()[0].1.as_f32(), out[0].1.as_f32());
    }

    #[test]
    fn crops_stay_within_the_source_values_in_both_layouts() {
        for layout in [ImageLayout::Nchw, ImageLayout::Nhwc] {
            let aug = Augmentation { flip: true, min_crop_area: 0.3, layout };
            let feeds = vec![("x".to_string(), image(4, 3, 8, 8))];
            let out = aug.apply(&feeds, 11).unwrap();
            let got = out[0].1.as_f32().unwrap();
            assert_eq!(got.shape(), [4, 3, 8, 8]);
            let max = (4 * 3 * 8 * 8 - 1) as f32;
            assert!(got.iter().all(|&v| (0.0..=max).contains(&v)));
            assert_ne!(got, feeds[0].1.as_f32().unwrap());
        }
    }

    #[test]
    fn a_crop_area_outside_its_range_is_refused() {
        for area in [0.0, -1.0, 1.5, f32::NAN] {
            let aug = Augmentation { flip: false, min_crop_area: area, layout: ImageLayout::Nchw };
            assert!(aug.check().is_err(), "{area}");
        }
    }
}
