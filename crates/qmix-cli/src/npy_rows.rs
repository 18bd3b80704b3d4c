//! `.npy` headers, and the rows of a `.npy` file read only when a batch takes them: a dataset of
//! any size costs the memory of one batch. The header is checked against the file size before
//! anything is allocated (a header claiming 10¹² rows over a short body is an error naming the
//! file, not an allocation of terabytes).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use qgraph::Tensor;

/// What a `.npy` header says.
#[derive(Debug, Clone)]
pub(crate) struct NpyHeader {
    /// The type descriptor, e.g. `<f4`, `|u1`.
    pub descr: String,
    /// Whether the array is stored in Fortran (column-major) order.
    pub fortran: bool,
    pub shape: Vec<usize>,
    /// Where the data starts in the file.
    pub data_offset: u64,
}

/// Reads and checks the header of the `.npy` file `path`.
pub(crate) fn header(path: &Path) -> anyhow::Result<NpyHeader> {
    let mut f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = [0u8; 12];
    if f.read_exact(&mut head).is_err() || &head[..6] != b"\x93NUMPY" {
        anyhow::bail!("{} is not a .npy file (no NUMPY magic)", path.display());
    }
    let (header_len, prefix) = match head[6] {
        1 => (u64::from(u16::from_le_bytes([head[8], head[9]])), 10u64),
        2 | 3 => (u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])), 12u64),
        v => anyhow::bail!("{}: .npy format version {v} is not supported", path.display()),
    };
    if header_len > 1 << 20 {
        anyhow::bail!("{}: .npy header of {header_len} bytes", path.display());
    }
    let mut text = vec![0u8; header_len as usize];
    f.seek(SeekFrom::Start(prefix))
        .and_then(|_| f.read_exact(&mut text))
        .map_err(|_| anyhow::anyhow!("{}: the .npy header is cut short", path.display()))?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| text.split(key).nth(1).map(str::trim_start);
    let descr: String = field("'descr':")
        .map(|d| d.trim_start_matches(['\'', '"']).chars().take_while(|c| !matches!(c, '\'' | '"')).collect())
        .unwrap_or_default();
    let item: u64 = descr.get(2..).and_then(|d| d.parse().ok()).unwrap_or(1);
    let fortran = field("'fortran_order':").is_some_and(|v| v.starts_with("True"));
    let dims = field("'shape':")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow::anyhow!("{}: the .npy header has no shape", path.display()))?;
    let mut bytes = Some(item);
    let mut shape = Vec::new();
    for d in dims.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let d: u64 = d.parse().map_err(|_| anyhow::anyhow!("{}: .npy dimension '{d}'", path.display()))?;
        bytes = bytes.and_then(|b| b.checked_mul(d));
        shape
            .push(usize::try_from(d).map_err(|_| anyhow::anyhow!("{}: .npy dimension {d}", path.display()))?);
    }
    let body = file_len.saturating_sub(prefix + header_len);
    match bytes {
        Some(b) if b <= body => Ok(NpyHeader { descr, fortran, shape, data_offset: prefix + header_len }),
        Some(b) => anyhow::bail!(
            "{}: its header claims shape ({dims}) = {b} bytes, but the file holds {body} bytes of data",
            path.display()
        ),
        None => anyhow::bail!("{}: its header claims shape ({dims}), beyond any file", path.display()),
    }
}

/// The element types read lazily, by their little-endian (or byte-sized) descriptor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Element {
    F32,
    F64,
    I64,
    I32,
    U8,
    I8,
    Bool,
}

impl Element {
    fn of(descr: &str) -> Option<Element> {
        let little = cfg!(target_endian = "little");
        Some(match descr {
            "<f4" => Element::F32,
            "=f4" if little => Element::F32,
            "<f8" => Element::F64,
            "=f8" if little => Element::F64,
            "<i8" => Element::I64,
            "=i8" if little => Element::I64,
            "<i4" => Element::I32,
            "=i4" if little => Element::I32,
            "|u1" | "<u1" => Element::U8,
            "|i1" | "<i1" => Element::I8,
            "|b1" => Element::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Element::F32 | Element::I32 => 4,
            Element::F64 | Element::I64 => 8,
            Element::U8 | Element::I8 | Element::Bool => 1,
        }
    }
}

/// A `.npy` array whose rows (along axis 0) are read from the file when taken.
#[derive(Debug)]
pub(crate) struct NpyRows {
    path: PathBuf,
    element: Element,
    shape: Vec<usize>,
    data_offset: u64,
}

impl NpyRows {
    /// The array of `path` if its rows can be read apart: a C-ordered array of rank ≥ 1 of
    /// f32, f64, i64, i32, u8, i8 or bool; `None` otherwise (read it whole).
    pub fn open(path: &Path) -> anyhow::Result<Option<NpyRows>> {
        if path.extension().is_none_or(|e| e != "npy") || path.is_dir() {
            return Ok(None);
        }
        let h = header(path)?;
        let element = Element::of(&h.descr);
        Ok(element.filter(|_| !h.fortran && !h.shape.is_empty()).map(|element| NpyRows {
            path: path.to_path_buf(),
            element,
            shape: h.shape,
            data_offset: h.data_offset,
        }))
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows `rows` as a tensor of the file's type (shape: the array's, `rows.len()` on axis 0).
    pub fn read(&self, rows: std::ops::Range<usize>) -> anyhow::Result<Tensor> {
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot read {}: {e}", self.path.display());
        if rows.end > self.shape[0] || rows.start > rows.end {
            return Err(fail(&format!("rows {rows:?} of {}", self.shape[0])));
        }
        let row_len: usize = self.shape[1..].iter().product();
        let row_bytes = row_len * self.element.size();
        let mut bytes = vec![0u8; rows.len() * row_bytes];
        let mut f = std::fs::File::open(&self.path).map_err(|e| fail(&e))?;
        f.seek(SeekFrom::Start(self.data_offset + (rows.start * row_bytes) as u64))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| fail(&e))?;
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        fn decode<T: qgraph::Element>(bytes: &[u8], shape: &[usize]) -> Option<Tensor> {
            Tensor::from_vec(shape, bytes.chunks_exact(T::DTYPE.size_of()).map(T::from_le).collect())
        }
        let t = match self.element {
            Element::F32 => decode::<f32>(&bytes, &shape),
            Element::F64 => decode::<f64>(&bytes, &shape),
            Element::I64 => decode::<i64>(&bytes, &shape),
            Element::I32 => decode::<i32>(&bytes, &shape),
            Element::U8 => decode::<u8>(&bytes, &shape),
            Element::I8 => decode::<i8>(&bytes, &shape),
            Element::Bool => decode::<bool>(&bytes, &shape),
        };
        t.ok_or_else(|| fail(&"the rows do not fill their shape"))
    }
}

#[cfg(test)]
mod tests {
    use super::NpyRows;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn rows_read_apart_are_the_rows_of_the_whole_array() {
        let dir = tempfile::tempdir().unwrap();
        let shape = IxDyn(&[5, 2, 3]);
        let f32s = ArrayD::from_shape_fn(shape.clone(), |i| (i[0] * 6 + i[1] * 3 + i[2]) as f32 * 0.5 - 3.0);
        let u8s = f32s.mapv(|v| (v + 3.0) as u8);
        let i64s = f32s.mapv(|v| (v * 1e12) as i64);
        let bools = f32s.mapv(|v| v > 0.0);
        let paths: Vec<std::path::PathBuf> =
            ["f", "u", "i", "b"].iter().map(|n| dir.path().join(format!("{n}.npy"))).collect();
        ndarray_npy::write_npy(&paths[0], &f32s).unwrap();
        ndarray_npy::write_npy(&paths[1], &u8s).unwrap();
        ndarray_npy::write_npy(&paths[2], &i64s).unwrap();
        ndarray_npy::write_npy(&paths[3], &bools).unwrap();
        for p in &paths {
            let rows = NpyRows::open(p).unwrap().expect("read apart");
            let whole = crate::read_tensor(p).unwrap();
            assert_eq!(rows.shape(), whole.shape());
            for (start, len) in [(0, 5), (1, 2), (4, 1), (3, 0)] {
                assert_eq!(
                    rows.read(start..start + len).unwrap(),
                    whole.slice_axis(0, start, len).unwrap(),
                    "{p:?}"
                );
            }
            assert!(rows.read(4..6).is_err());
        }
        // Fortran order and scalars are read whole.
        let scalar = dir.path().join("s.npy");
        ndarray_npy::write_npy(&scalar, &ndarray::arr0(1.5f32)).unwrap();
        assert!(NpyRows::open(&scalar).unwrap().is_none());
        let fortran = dir.path().join("t.npy");
        ndarray_npy::write_npy(&fortran, &f32s.t()).unwrap();
        assert!(NpyRows::open(&fortran).unwrap().is_none());
    }
}
