//! `LazyTensor`: a static tensor read on demand instead of held in memory — a slice of a
//! memory-mapped external data file, or a tensor derived from another lazy one (fake-quantized,
//! converted to integers) when it is read. Models whose weights outgrow memory keep them this way:
//! each read copies the tensor out of the mapping and hands the file's pages back to the kernel,
//! so a run holds only the weights of the nodes it is executing.

use std::fmt;
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{GraphError, Result};
use crate::tensor::Tensor;

/// How a derived lazy tensor is computed from its source when read.
type Derivation = dyn Fn(Tensor) -> std::result::Result<Tensor, String> + Send + Sync;

/// A static tensor whose data is read when needed. Clones share the source.
#[derive(Clone)]
pub struct LazyTensor(Arc<Inner>);

struct Inner {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    source: Source,
    /// Kept once something asks for a borrowed tensor ([`LazyTensor::resident`]).
    resident: OnceLock<Option<Tensor>>,
}

enum Source {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Derived { from: LazyTensor, derive: Box<Derivation> },
}

impl LazyTensor {
    /// `len` bytes at `offset` of a mapped file, decoded as `dtype` of `shape` (ONNX raw layout).
    /// Errors when the range is outside the mapping or does not hold that many elements.
    pub fn mapped(
        name: &str,
        dtype: DType,
        shape: &[usize],
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    ) -> Result<LazyTensor> {
        let bad = |detail: String| GraphError::TensorData { tensor: name.to_string(), detail };
        if offset.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(bad(format!("bytes {offset}+{len} lie outside the {}-byte mapping", map.len())));
        }
        let count =
            crate::shape::checked_numel(shape).ok_or_else(|| bad("element count overflows".into()))?;
        if dtype.raw_len(count) != Some(len) {
            return Err(bad(format!(
                "shape {shape:?} needs {count} {dtype} elements, the file holds {len} bytes"
            )));
        }
        Ok(LazyTensor(Arc::new(Inner {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            source: Source::Mapped { map, offset, len },
            resident: OnceLock::new(),
        })))
    }

    /// A lazy tensor of `dtype` and `shape` that is `derive` applied to this one, computed on
    /// every read; a failure of `derive` is an error of [`LazyTensor::load`] naming the tensor.
    pub fn derive(
        &self,
        dtype: DType,
        shape: &[usize],
        derive: impl Fn(Tensor) -> std::result::Result<Tensor, String> + Send + Sync + 'static,
    ) -> LazyTensor {
        LazyTensor(Arc::new(Inner {
            name: self.0.name.clone(),
            dtype,
            shape: shape.to_vec(),
            source: Source::Derived { from: self.clone(), derive: Box::new(derive) },
            resident: OnceLock::new(),
        }))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// Reads the tensor. Nothing is kept: the next read reads it again (unless it was made
    /// resident).
    pub fn load(&self) -> Result<Tensor> {
        if let Some(Some(t)) = self.0.resident.get() {
            return Ok(t.clone());
        }
        let fail = |detail: String| GraphError::TensorData { tensor: self.0.name.clone(), detail };
        let t = match &self.0.source {
            Source::Mapped { map, offset, len } => {
                let t = Tensor::from_le_bytes(self.0.dtype, &self.0.shape, &map[*offset..*offset + *len])
                    .ok_or_else(|| fail("the mapped bytes do not decode".into()))?;
                release_pages(map, *offset, *len);
                t
            }
            Source::Derived { from, derive } => derive(from.load()?).map_err(fail)?,
        };
        if t.dtype() != self.0.dtype || t.shape() != self.0.shape.as_slice() {
            return Err(fail(format!(
                "read as {} {:?}, declared {} {:?}",
                t.dtype(),
                t.shape(),
                self.0.dtype,
                self.0.shape
            )));
        }
        Ok(t)
    }

    /// The tensor, read once and then kept in memory for every later borrow and read; `None`
    /// when it cannot be read ([`LazyTensor::load`] says why).
    pub fn resident(&self) -> Option<&Tensor> {
        self.0.resident.get_or_init(|| self.load().ok()).as_ref()
    }

    /// Whether the tensor is held in memory.
    pub fn is_resident(&self) -> bool {
        self.0.resident.get().is_some_and(Option::is_some)
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
pub(crate) fn map_file(file: &std::fs::File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is only ever read, through `LazyTensor::load`, which copies the bytes
    // out at once. Another process truncating or rewriting the file meanwhile is outside what
    // Rust can guard (as for every memory-mapped file); the model's external data is taken to
    // stay as it is while the model is in use.
    unsafe { Mmap::map(file) }
}

/// Hands the mapped pages of `len` bytes at `offset` back to the kernel once they are copied out,
/// so mapped weights do not accumulate in the resident set.
#[allow(unsafe_code)]
fn release_pages(map: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    // SAFETY: the mapping is read-only and shared with its file, so dropping its pages only makes
    // the next access fault them in again from the file; no borrow of these bytes outlives the
    // decode above, and concurrent readers of neighbouring tensors re-read the same file bytes.
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

impl fmt::Debug for LazyTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0.source {
            Source::Mapped { .. } => "mapped",
            Source::Derived { .. } => "derived",
        };
        write!(f, "LazyTensor({kind} '{}' {} {:?})", self.0.name, self.0.dtype, self.0.shape)
    }
}

/// Two lazy tensors are equal when they are the same one (clones of each other).
impl PartialEq for LazyTensor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
