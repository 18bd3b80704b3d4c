//! A training checkpoint: one file, written atomically (so a run killed while writing keeps the
//! previous one whole), holding a JSON header and named f32 arrays — the weights, the learned
//! encodings, the optimizer's moments, the best epoch's state. Layout: the magic line
//! `QKCKPT1\n`, the header's length (u64, little-endian), the header, then each array's values
//! (f32, little-endian) in the header's order. Reading checks every length against the file's
//! size before allocating.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Result, TrainError};

const MAGIC: &[u8] = b"QKCKPT1\n";
/// Largest header read.
const MAX_HEADER: u64 = 64 << 20;

/// The contents of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checkpoint {
    /// Everything that is not an array.
    pub header: Value,
    /// Named arrays, in order.
    pub arrays: Vec<(String, Vec<f32>)>,
}

fn bad(path: &Path, detail: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut header = self.header.clone();
        let index: Vec<Value> = self.arrays.iter().map(|(n, a)| json!({"name": n, "len": a.len()})).collect();
        if let Some(map) = header.as_object_mut() {
            map.insert("arrays".into(), Value::Array(index));
        }
        let text = serde_json::to_vec(&header).map_err(|e| bad(path, e.to_string()))?;
        let payload: usize = self.arrays.iter().map(|(_, a)| a.len() * 4).sum();
        let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + text.len() + payload);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&text);
        for (_, a) in &self.arrays {
            for v in a {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| bad(path, e.to_string()))?;
        }
        qgraph::write_atomically(path, &bytes)?;
        Ok(())
    }

    /// Reads the checkpoint at `path`.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
        let rest =
            bytes.strip_prefix(MAGIC).ok_or_else(|| bad(path, "not a quantkit training checkpoint"))?;
        let (len, rest) = rest.split_first_chunk::<8>().ok_or_else(|| bad(path, "truncated header"))?;
        let len = u64::from_le_bytes(*len);
        if len > MAX_HEADER || len > rest.len() as u64 {
            return Err(bad(path, format!("header of {len} bytes in a file of {}", bytes.len())));
        }
        let (text, mut payload) = rest.split_at(len as usize);
        let header: Value = serde_json::from_slice(text).map_err(|e| bad(path, format!("header: {e}")))?;
        let index =
            header.get("arrays").and_then(Value::as_array).ok_or_else(|| bad(path, "no array index"))?;
        let mut arrays = Vec::with_capacity(index.len());
        for entry in index {
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(path, "an array without a name"))?;
            let n = entry
                .get("len")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(path, format!("{name}: no length")))?;
            let size = n.checked_mul(4).filter(|&s| s <= payload.len() as u64).ok_or_else(|| {
                bad(path, format!("{name}: {n} values do not fit in the {} bytes left", payload.len()))
            })?;
            let (data, tail) = payload.split_at(size as usize);
            arrays.push((
                name.to_string(),
                data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            ));
            payload = tail;
        }
        if !payload.is_empty() {
            return Err(bad(path, format!("{} bytes after the last array", payload.len())));
        }
        Ok(Checkpoint { header, arrays })
    }

    /// The array named `name`.
    pub fn array(&self, name: &str) -> Option<&[f32]> {
        self.arrays.iter().find(|(n, _)| n == name).map(|(_, a)| a.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        let c = Checkpoint {
            header: json!({"epoch": 3}),
            arrays: vec![("w".into(), vec![1.0, -2.5]), ("m".into(), vec![]), ("v".into(), vec![0.25])],
        };
        c.write(&path).unwrap();
        let back = Checkpoint::read(&path).unwrap();
        assert_eq!(back.arrays, c.arrays);
        assert_eq!(back.header["epoch"], 3);
        assert_eq!(back.array("v"), Some(&[0.25f32][..]));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(Checkpoint::read(&path).unwrap_err().to_string().contains("do not fit"));
        std::fs::write(&path, b"QKCKPT1\n\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
        assert!(Checkpoint::read(&path).unwrap_err().to_string().contains("header of"));
        std::fs::write(&path, b"hello").unwrap();
        assert!(Checkpoint::read(&path).unwrap_err().to_string().contains("not a quantkit"));
    }
}
