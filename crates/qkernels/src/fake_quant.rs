//! Quantize-dequantize (spec §1.2): NaN → min, clamp to `[min, max]`, `q = round(x/Δ − offset)`,
//! `y = Δ·(q + offset)`, all in f32 — per tensor or per channel along any axis — plus quantization
//! to integers for QDQ export.

use crate::encoding::Encoding;
use crate::error::KernelError;

/// How `x/Δ − offset` is rounded to the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Ties away from zero (C `round`): AIMET's simulation.
    #[default]
    HalfAwayFromZero,
    /// Ties to even: ONNX `QuantizeLinear`, for exported QDQ models.
    HalfToEven,
}

/// The largest f32 below ½ (`0.5 − 2⁻²⁵`).
const BELOW_HALF: f32 = 0.499_999_97;

/// `round_half_away(t)` for `t > −0.5`, and ≤ 0 like it below (where the index clamp that
/// follows makes both 0), in two instructions: `trunc(t + (½ − 2⁻²⁵))`. The sum rounds up to the
/// next integer exactly when `t` is at or above a half-integer (a `.5` tie becomes
/// `n + 1 − 2⁻²⁵`, which rounds to `n + 1` in every binade up to 2²³, and the float just below a
/// tie stays below `n + 1`); checked on every f32 of `(−0.5, 2²⁴)` by a test. Never −0 there.
#[inline(always)]
fn round_half_away_above_minus_half(t: f32) -> f32 {
    (t + BELOW_HALF).trunc()
}

/// `t` rounded to an integer as `rounding` says (exact for `t > −0.5`, ≤ 0 below).
#[inline(always)]
fn round_steps(t: f32, rounding: Rounding) -> f32 {
    match rounding {
        Rounding::HalfAwayFromZero => round_half_away_above_minus_half(t),
        Rounding::HalfToEven => t.round_ties_even(),
    }
}

/// The f32 constants of one encoding, as the kernel uses them.
#[derive(Debug, Clone, Copy)]
struct Grid {
    min: f32,
    max: f32,
    delta: f32,
    offset: f32,
    steps: f32,
    /// Whether clamping `x` to `[min, max]` already keeps the rounded index in `[0, N]` (the
    /// index at `min` is within ½ of 0 and at `max` within ½ of `N`, so both roundings give 0
    /// and `N` there; as `x/Δ − offset` is monotone in `x`, every index in between is in range),
    /// so the kernel skips the index clamp. True for the encodings computed from ranges; false
    /// for hand-made inconsistent ones and grids too fine for f32 (32-bit bias bookkeeping).
    bounded: bool,
}

impl Grid {
    fn of(e: &Encoding) -> Grid {
        let mut g = Grid {
            min: e.min as f32,
            max: e.max as f32,
            delta: e.delta as f32,
            // `+ 0.0` turns an offset of −0 into +0, so `q + offset` never yields −0.
            offset: e.offset as f32 + 0.0,
            steps: e.steps as f32,
            bounded: false,
        };
        let t_min = g.min / g.delta - g.offset;
        let t_max = g.max / g.delta - g.offset;
        g.bounded = t_min.abs() < 0.5 && (t_max - g.steps).abs() < 0.5;
        g
    }

    /// `x` clamped to `[min, max]`, NaN mapped to `min`. Compare-and-select clamps map to single
    /// max/min instructions (f32::max/min need extra NaN handling): a NaN `x` fails `x > min` and
    /// becomes `min`; nothing later is NaN.
    #[inline(always)]
    fn clamp(&self, x: f32) -> f32 {
        let v = if x > self.min { x } else { self.min };
        if v < self.max { v } else { self.max }
    }

    /// `x/Δ − offset` of the clamped `x`: the grid index before rounding.
    #[inline(always)]
    fn steps_of(&self, x: f32) -> f32 {
        self.clamp(x) / self.delta - self.offset
    }

    /// Grid index of `x` in `[0, N]`.
    #[inline(always)]
    fn index(&self, x: f32, rounding: Rounding) -> f32 {
        let q = round_steps(self.steps_of(x), rounding);
        let q = if q > 0.0 { q } else { 0.0 };
        if q < self.steps { q } else { self.steps }
    }

    #[inline(always)]
    fn qdq(&self, x: f32, rounding: Rounding) -> f32 {
        self.delta * (self.index(x, rounding) + self.offset)
    }

    /// [`Grid::qdq`] for a `bounded` grid: one clamp, and the index rounded without a clamp.
    #[inline(always)]
    fn qdq_bounded(&self, x: f32, rounding: Rounding) -> f32 {
        self.delta * (round_steps(self.steps_of(x), rounding) + self.offset)
    }
}

/// Fake-quantizes `data` in place with AIMET's rounding.
pub fn fake_quant(data: &mut [f32], enc: &Encoding) {
    fake_quant_with(data, enc, Rounding::HalfAwayFromZero);
}

/// Fake-quantizes `data` in place with the given rounding.
pub fn fake_quant_with(data: &mut [f32], enc: &Encoding, rounding: Rounding) {
    qdq_slice(data, &Grid::of(enc), rounding);
}

crate::multiversion! {
    /// The fake-quant loop, one copy per rounding mode and clamp form so each vectorises.
    fn qdq_slice(data: &mut [f32], g: &Grid, rounding: Rounding) {
        use Rounding::{HalfAwayFromZero as Away, HalfToEven as Even};
        match (rounding, g.bounded) {
            (Away, true) => data.iter_mut().for_each(|x| *x = g.qdq_bounded(*x, Away)),
            (Even, true) => data.iter_mut().for_each(|x| *x = g.qdq_bounded(*x, Even)),
            (Away, false) => data.iter_mut().for_each(|x| *x = g.qdq(*x, Away)),
            (Even, false) => data.iter_mut().for_each(|x| *x = g.qdq(*x, Even)),
        }
    }
}

/// Splits a row-major `shape` at `axis` into (outer, channels, inner) extents.
fn channel_layout(
    len: usize,
    shape: &[usize],
    axis: usize,
    encodings: usize,
) -> Result<(usize, usize, usize), KernelError> {
    if axis >= shape.len() {
        return Err(KernelError::Layout(format!("axis {axis} out of range for shape {shape:?}")));
    }
    if shape.iter().product::<usize>() != len {
        return Err(KernelError::Layout(format!("shape {shape:?} does not hold {len} elements")));
    }
    if shape[axis] != encodings {
        return Err(KernelError::Layout(format!(
            "{encodings} encodings for {} channels on axis {axis}",
            shape[axis]
        )));
    }
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    Ok((outer, shape[axis], inner))
}

/// Fake-quantizes `data` (row-major, `shape`) in place with one encoding per index of `axis`.
pub fn fake_quant_per_channel(
    data: &mut [f32],
    shape: &[usize],
    axis: usize,
    encodings: &[Encoding],
    rounding: Rounding,
) -> Result<(), KernelError> {
    let (_, channels, inner) = channel_layout(data.len(), shape, axis, encodings.len())?;
    let grids: Vec<Grid> = encodings.iter().map(Grid::of).collect();
    if inner == 0 {
        return Ok(());
    }
    for (block, chunk) in data.chunks_mut(inner).enumerate() {
        qdq_slice(chunk, &grids[block % channels], rounding);
    }
    Ok(())
}

/// Fake-quantizes `data` (row-major, `shape`) in place with blockwise encodings (spec §1.7): the
/// encoding shape is `shape[channel_axis]` along the channel axis, `shape[block_axis] /
/// block_size` along the block axis and 1 elsewhere, and `encodings` are in row-major order of
/// that shape (so a Conv weight `[O, I, kh, kw]` with axes 0 and 1 has `O × I/block` encodings,
/// channel-major).
pub fn fake_quant_per_block(
    data: &mut [f32],
    shape: &[usize],
    channel_axis: usize,
    block_axis: usize,
    block_size: usize,
    encodings: &[Encoding],
    rounding: Rounding,
) -> Result<(), KernelError> {
    let rank = shape.len();
    if channel_axis >= rank || block_axis >= rank || channel_axis == block_axis {
        return Err(KernelError::Layout(format!(
            "channel axis {channel_axis} and block axis {block_axis} must be distinct axes of shape {shape:?}"
        )));
    }
    if block_size == 0 || shape[block_axis] % block_size != 0 {
        return Err(KernelError::Layout(format!(
            "block size {block_size} does not divide dim {} of shape {shape:?}",
            shape[block_axis]
        )));
    }
    if shape.iter().product::<usize>() != data.len() {
        return Err(KernelError::Layout(format!("shape {shape:?} does not hold {} elements", data.len())));
    }
    let enc_shape: Vec<usize> = (0..rank)
        .map(|d| match d {
            d if d == channel_axis => shape[d],
            d if d == block_axis => shape[d] / block_size,
            _ => 1,
        })
        .collect();
    if enc_shape.iter().product::<usize>() != encodings.len() {
        return Err(KernelError::Layout(format!(
            "{} encodings for an encoding shape {enc_shape:?}",
            encodings.len()
        )));
    }
    let last = match shape.last() {
        Some(&n) if n > 0 => n,
        _ => return Ok(()),
    };
    let mut enc_strides = vec![0usize; rank];
    let mut acc = 1;
    for d in (0..rank).rev() {
        enc_strides[d] = if enc_shape[d] > 1 { acc } else { 0 };
        acc *= enc_shape[d];
    }
    let grids: Vec<Grid> = encodings.iter().map(Grid::of).collect();
    let block_of = |d: usize, i: usize| if d == block_axis { i / block_size } else { i };
    for (r, row) in data.chunks_mut(last).enumerate() {
        // Encoding index of the row's first element, from its coordinates.
        let mut rest = r;
        let mut base = 0;
        for d in (0..rank - 1).rev() {
            base += block_of(d, rest % shape[d]) * enc_strides[d];
            rest /= shape[d];
        }
        let step = enc_strides[rank - 1];
        if step == 0 {
            qdq_slice(row, &grids[base], rounding);
        } else if rank - 1 == block_axis {
            for (k, run) in row.chunks_mut(block_size).enumerate() {
                qdq_slice(run, &grids[base + k * step], rounding);
            }
        } else {
            for (j, x) in row.iter_mut().enumerate() {
                *x = grids[base + j * step].qdq(*x, rounding);
            }
        }
    }
    Ok(())
}

/// Quantizes to integers on the encoding's signed or unsigned view: `q + offset + shift`, where
/// `shift` is `2^(b−1)` for a symmetric dtype view (AIMET `int<b>`) and 0 for unsigned (`uint<b>`).
/// With `signed = true` int8 symmetric values land in `[−128, 127]`.
pub fn quantize_to_int(data: &[f32], enc: &Encoding, signed: bool, rounding: Rounding) -> Vec<i32> {
    let g = Grid::of(enc);
    let shift = if signed { 2f32.powi(enc.bitwidth as i32 - 1) } else { 0.0 };
    data.iter().map(|&x| (g.index(x, rounding) - shift) as i32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::QuantSpec;

    #[test]
    fn ties_in_the_step_domain_round_up() {
        // delta 2^-7, offset -128: -127.5, -0.5, 0.5, 2.5 steps.
        let e = Encoding::from_scale_offset(1.0 / 128.0, -128.0, 8, 255.0);
        let mut x: Vec<f32> = [-127.5f32, -0.5, 0.5, 2.5].iter().map(|s| s / 128.0).collect();
        fake_quant(&mut x, &e);
        let steps: Vec<f32> = x.iter().map(|v| v * 128.0).collect();
        assert_eq!(steps, [-127.0, 0.0, 1.0, 3.0]);
        let mut y: Vec<f32> = [0.5f32, 2.5].iter().map(|s| s / 128.0).collect();
        fake_quant_with(&mut y, &e, Rounding::HalfToEven);
        assert_eq!(y.iter().map(|v| v * 128.0).collect::<Vec<_>>(), [0.0, 2.0]);
    }

    #[test]
    fn trunc_of_t_plus_below_half_rounds_half_away_on_every_f32_above_minus_half() {
        // Every f32 in (−0.5, 0] and [0, 2²⁴) (above 2²⁴ every f32 is an integer).
        crate::multiversion! {
            fn mismatches(bits: std::ops::Range<u32>) -> usize {
                bits.map(f32::from_bits)
                    .filter(|t| round_half_away_above_minus_half(*t).to_bits() != (t.round() + 0.0).to_bits())
                    .count()
            }
        }
        assert_eq!(mismatches(0x8000_0000..0xBF00_0000) + mismatches(0..0x4B80_0000), 0);
    }

    #[test]
    fn inconsistent_encodings_take_the_clamped_path() {
        // min and max off the grid: the index at max is 300 > N, so the kernel clamps the index.
        let e = Encoding { min: -1.0, max: 2.0, delta: 0.01, offset: -100.0, bitwidth: 8, steps: 255.0 };
        assert!(!Grid::of(&e).bounded);
        let mut x = [2.0f32, -1.0, f32::NAN];
        fake_quant(&mut x, &e);
        assert_eq!(x, [0.01f32 * 155.0, -1.0, -1.0]);
        let aligned = Encoding::from_range(-1.0, 2.0, QuantSpec::asymmetric(8)).unwrap();
        assert!(Grid::of(&aligned).bounded);
    }

    #[test]
    fn clamps_and_maps_nan_to_min() {
        let e = Encoding::from_range(-1.0, 2.0, QuantSpec::asymmetric(8)).unwrap();
        let mut x = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 100.0, -100.0, 0.0];
        fake_quant(&mut x, &e);
        let (lo, hi) = (e.min as f32, e.max as f32);
        assert_eq!(x[0], lo);
        assert_eq!(x[1], lo);
        assert!((x[2] - hi).abs() <= 1e-6 && (x[4] - hi).abs() <= 1e-6);
        assert!((x[3] - lo).abs() <= 1e-6 && (x[5] - lo).abs() <= 1e-6);
        assert_eq!(x[6], 0.0, "zero is exactly representable");
    }

    #[test]
    fn per_channel_uses_each_channels_grid() {
        let encs: Vec<Encoding> = [1.0, 10.0]
            .iter()
            .map(|&m| Encoding::from_range(-m, m, QuantSpec::symmetric(8)).unwrap())
            .collect();
        // shape [2, 3] along axis 0, and [3, 2] along axis 1.
        let mut a = [0.3f32, 0.9, 5.0, 0.3, 0.9, 5.0];
        fake_quant_per_channel(&mut a, &[2, 3], 0, &encs, Rounding::default()).unwrap();
        assert_eq!(a[2], 1.0, "channel 0 clamps at its max");
        assert!((a[5] - 5.0).abs() < 10.0 / 127.0);
        let mut b = [5.0f32, 5.0, 5.0, 5.0, 5.0, 5.0];
        fake_quant_per_channel(&mut b, &[3, 2], 1, &encs, Rounding::default()).unwrap();
        assert_eq!(b[0], 1.0);
        assert!((b[1] - 5.0).abs() < 0.04);
        assert!(fake_quant_per_channel(&mut b, &[3, 2], 0, &encs, Rounding::default()).is_err());
        assert!(fake_quant_per_channel(&mut b, &[3, 2], 2, &encs, Rounding::default()).is_err());
    }

    #[test]
    fn integer_views() {
        let e = Encoding::from_range(-1.0, 1.0, QuantSpec::symmetric(8)).unwrap();
        assert_eq!(quantize_to_int(&[-1.0, 0.0, 1.0], &e, true, Rounding::HalfToEven), [-127, 0, 127]);
        let u = Encoding::from_range(0.0, 2.55, QuantSpec::asymmetric(8)).unwrap();
        assert_eq!(quantize_to_int(&[0.0, 2.55, 9.0], &u, false, Rounding::HalfToEven), [0, 255, 255]);
    }
}
