//! float16 `.npy` files, which `ndarray-npy` does not read or write: the header is parsed for a
//! little-endian `<f2` array in C order, the body read as IEEE half bits; writing emits a
//! version 1.0 header padded to 64 bytes, as numpy does.

use std::path::Path;

use half::f16;
use qgraph::Tensor;

/// A `<f2` array from `path`, `None` if the file holds another dtype.
pub(crate) fn read(path: &Path) -> anyhow::Result<Option<Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let (header_len, prefix) = match bytes.get(6) {
        Some(1) if bytes.len() >= 10 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        Some(2 | 3) if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        _ => return Ok(None),
    };
    let Some(header) = bytes.get(prefix..prefix + header_len) else { return Ok(None) };
    let header = String::from_utf8_lossy(header);
    if !header.contains("'descr': '<f2'") {
        return Ok(None);
    }
    if header.contains("'fortran_order': True") {
        anyhow::bail!("{}: Fortran-ordered float16 arrays are not supported", path.display());
    }
    let dims = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.trim_start().strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow::anyhow!("{}: the .npy header has no shape", path.display()))?;
    let shape: Vec<usize> = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().map_err(|_| anyhow::anyhow!("{}: .npy dimension '{d}'", path.display())))
        .collect::<anyhow::Result<_>>()?;
    let body = &bytes[prefix + header_len..];
    let count =
        qgraph::checked_numel(&shape)
            .filter(|n| n.checked_mul(2).is_some_and(|b| b <= body.len()))
            .ok_or_else(|| anyhow::anyhow!("{}: shape {shape:?} does not fit the file", path.display()))?;
    let values: Vec<f16> =
        body[..count * 2].chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
    Ok(Tensor::from_vec(&shape, values))
}

/// The `.npy` bytes of a float16 tensor.
pub(crate) fn write(t: &Tensor) -> Option<Vec<u8>> {
    let Tensor::F16(a) = t else { return None };
    let dims: Vec<String> = a.shape().iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in a.iter() {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    Some(out)
}
