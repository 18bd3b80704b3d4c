//! Checksums that tie cached results to what produced them (FNV-1a, 64 bits, hexadecimal): of
//! named tensors, of data batches, and of a simulation — its weights and quantizer settings, and on
//! request its encodings.

use qgraph::Tensor;

use crate::{Feeds, QuantSim};

/// A checksum of named tensors and `extra` (over names, shapes and values).
pub fn tensors_checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a Tensor)>, extra: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for (name, t) in tensors {
        name.bytes().for_each(&mut eat);
        t.shape().iter().for_each(|d| d.to_le_bytes().into_iter().for_each(&mut eat));
        match t.as_f32() {
            Some(a) => a.iter().for_each(|v| v.to_bits().to_le_bytes().into_iter().for_each(&mut eat)),
            None => {
                t.to_f64_vec().iter().for_each(|v| v.to_bits().to_le_bytes().into_iter().for_each(&mut eat))
            }
        }
    }
    extra.bytes().for_each(&mut eat);
    format!("{h:016x}")
}

/// A checksum of data batches.
pub fn feeds_checksum(batches: &[Feeds]) -> String {
    tensors_checksum(batches.iter().flatten().map(|(n, t)| (n.as_str(), t)), "")
}

impl QuantSim {
    /// A checksum of the weights (a post-training technique changes them) and of each quantizer's
    /// settings — enabled, precision, symmetry, granularity, LPBQ, frozen and learned encodings —
    /// but not of calibrated encodings.
    pub fn settings_checksum(&self) -> String {
        self.checksum(false)
    }

    /// [`QuantSim::settings_checksum`] and every quantizer's current encodings: what a result
    /// computed on this calibrated simulation depends on.
    pub fn state_checksum(&self) -> String {
        self.checksum(true)
    }

    fn checksum(&self, encodings: bool) -> String {
        let g = &self.model().graph;
        let tensors = g.initializers().filter_map(|v| Some((g.value(v).name.as_str(), g.static_value(v)?)));
        let p = self.placement();
        let quantizers: String = p
            .quantizer_ids()
            .iter()
            .map(|&q| {
                let q = p.quantizer(q);
                let fixed = (q.frozen || encodings).then_some(&q.encodings);
                format!(
                    "{:?}{:?}{}{:?}{:?}{fixed:?}{:?};",
                    q.enabled, q.precision, q.symmetric, q.granularity, q.lpbq, q.learned
                )
            })
            .collect();
        tensors_checksum(tensors, &quantizers)
    }
}
