//! Low-power blockwise quantization (AIMET's LPBQ, `set_grouped_blockwise_quantization_for_weights`):
//! a blockwise weight's per-block scales are themselves quantized per output channel — each an
//! integer in `1..=2^(decompressed − compressed bits)` times one float scale per channel, the
//! channel's largest block scale over `2^(decompressed − compressed bits)` — so a runtime stores
//! the weights at the compressed width and decompresses them to the wider one with integer
//! arithmetic.

use qkernels::Encoding;

/// The encoding shape of a per-block quantizer on a tensor of `shape`: the channel axis whole,
/// the block axis in blocks, every other axis 1 (row-major, as the encodings are stored).
pub(crate) fn block_encoding_shape(
    shape: &[usize],
    channel_axis: usize,
    block_axis: usize,
    block_size: usize,
) -> Vec<usize> {
    (0..shape.len())
        .map(|a| match a {
            a if a == channel_axis => shape[a],
            a if a == block_axis => shape[a] / block_size.max(1),
            _ => 1,
        })
        .collect()
}

/// The channel (index along `channel_axis`) of each encoding of `enc_shape`, in storage order.
fn channel_of_each(enc_shape: &[usize], channel_axis: usize) -> Vec<usize> {
    let count: usize = enc_shape.iter().product();
    let inner: usize = enc_shape[channel_axis + 1..].iter().product();
    let channels = enc_shape[channel_axis].max(1);
    (0..count).map(|i| i / inner.max(1) % channels).collect()
}

/// One float scale per channel and one integer per block: the decomposition of LPBQ scales.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LpbqScales {
    /// Per channel: its largest block scale over `2^scale_bits`.
    pub per_channel: Vec<f64>,
    /// Per encoding (storage order): the block scale in units of its channel's scale.
    pub per_block: Vec<u32>,
}

/// Splits block `encodings` (storage order of `enc_shape`) into LPBQ's per-channel float scales
/// and per-block integers of `scale_bits` bits (clamped to `1..=2^scale_bits`).
pub(crate) fn lpbq_scales(
    encodings: &[Encoding],
    enc_shape: &[usize],
    channel_axis: usize,
    scale_bits: u32,
) -> LpbqScales {
    let channel = channel_of_each(enc_shape, channel_axis);
    let top = 2f64.powi(scale_bits as i32);
    let mut per_channel = vec![0f64; enc_shape.get(channel_axis).copied().unwrap_or(0)];
    for (e, &c) in encodings.iter().zip(&channel) {
        per_channel[c] = per_channel[c].max(e.delta);
    }
    per_channel.iter_mut().for_each(|s| *s /= top);
    let per_block = encodings
        .iter()
        .zip(&channel)
        .map(|(e, &c)| {
            let s = per_channel[c];
            if s > 0.0 { (e.delta / s).round().clamp(1.0, top) as u32 } else { 1 }
        })
        .collect();
    LpbqScales { per_channel, per_block }
}

/// Replaces each block encoding's scale by its LPBQ value (integer times channel scale); the
/// offsets stay.
pub(crate) fn compress(
    encodings: &mut [Encoding],
    enc_shape: &[usize],
    channel_axis: usize,
    scale_bits: u32,
) {
    let s = lpbq_scales(encodings, enc_shape, channel_axis, scale_bits);
    let channel = channel_of_each(enc_shape, channel_axis);
    for ((e, &c), &k) in encodings.iter_mut().zip(&channel).zip(&s.per_block) {
        let delta = f64::from(k) * s.per_channel[c];
        if delta > 0.0 && delta.is_finite() {
            *e = Encoding::from_scale_offset(delta, e.offset, e.bitwidth, e.steps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(delta: f64) -> Encoding {
        Encoding::from_scale_offset(delta, -8.0, 4, 15.0)
    }

    #[test]
    fn block_scales_become_integers_times_a_channel_scale() {
        // Two channels (axis 1 of a [2 blocks, 2 channels] shape): channel 0's blocks 1.6 and
        // 0.3, channel 1's 0.05 and 0.8; 4 scale bits: units 0.1 and 0.05.
        let mut e = vec![enc(1.6), enc(0.05), enc(0.3), enc(0.8)];
        let s = lpbq_scales(&e, &[2, 2], 1, 4);
        assert_eq!(s.per_channel, vec![0.1, 0.05]);
        assert_eq!(s.per_block, vec![16, 1, 3, 16]);
        compress(&mut e, &[2, 2], 1, 4);
        let deltas: Vec<f64> = e.iter().map(|e| e.delta).collect();
        assert!((deltas[0] - 1.6).abs() < 1e-12 && (deltas[2] - 0.3).abs() < 1e-12, "{deltas:?}");
        assert!((deltas[1] - 0.05).abs() < 1e-12 && (deltas[3] - 0.8).abs() < 1e-12, "{deltas:?}");
        assert_eq!(e[0].offset, -8.0);
    }
}
