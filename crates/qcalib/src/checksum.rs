//! Checksums that tie cached results to what produced them (FNV-1a, 64 bits, hexadecimal): of
//! named tensors, of data batches, and of a simulation — its weights and quantizer settings, and on
//! request its encodings.

use qgraph::Tensor;

use crate::{Feeds, QuantSim};

/// A checksum of named tensors and `extra` (over names, shapes and values).
pub fn tensors_checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a Tensor)>, extra: &str) -> String {
    let mut h = Fnv::default();
    for (name, t) in tensors {
        h.tensor(name, t);
    }
    h.finish(extra)
}

/// FNV-1a, 64 bits, fed tensor by tensor.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn bytes(&mut self, bytes: impl IntoIterator<Item = u8>) {
        bytes.into_iter().for_each(|b| self.byte(b));
    }

    fn tensor(&mut self, name: &str, t: &Tensor) {
        self.bytes(name.bytes());
        t.shape().iter().for_each(|d| self.bytes(d.to_le_bytes()));
        match t.as_f32() {
            Some(a) => a.iter().for_each(|v| self.bytes(v.to_bits().to_le_bytes())),
            None => t.to_f64_vec().iter().for_each(|v| self.bytes(v.to_bits().to_le_bytes())),
        }
    }

    fn finish(mut self, extra: &str) -> String {
        self.bytes(extra.bytes());
        format!("{:016x}", self.0)
    }
}

/// A checksum of data batches.
pub fn feeds_checksum(batches: &[Feeds]) -> String {
    tensors_checksum(batches.iter().flatten().map(|(n, t)| (n.as_str(), t)), "")
}

impl QuantSim {
    /// A checksum of the weights (a post-training technique changes them) and of each quantizer's
    /// settings — enabled, precision, symmetry, granularity, LPBQ, frozen and learned encodings —
    /// but not of calibrated encodings.
    pub fn settings_checksum(&self) -> crate::Result<String> {
        self.checksum(false)
    }

    /// [`QuantSim::settings_checksum`] and every quantizer's current encodings: what a result
    /// computed on this calibrated simulation depends on.
    pub fn state_checksum(&self) -> crate::Result<String> {
        self.checksum(true)
    }

    /// Weights are read one at a time, so lazy ones are never all in memory.
    fn checksum(&self, encodings: bool) -> crate::Result<String> {
        let g = &self.model().graph;
        let mut h = Fnv::default();
        for v in g.initializers() {
            if let Some(t) = g.load_static(v)? {
                h.tensor(&g.value(v).name, &t);
            }
        }
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
        Ok(h.finish(&quantizers))
    }
}
