//! Recycled f32 buffers. Every run of a CNN allocates the same large activation buffers over and
//! over; zero-filling fresh ones costs as much as a small layer. The session hands intermediates it
//! no longer needs back here, and kernels that overwrite their whole output take buffers from here.
//!
//! A buffer never shrinks: a kernel gets a [`Scratch`], a prefix of a pooled allocation, and the
//! tensor made from it keeps the whole allocation behind a view of the prefix. So the part past
//! the prefix stays initialized and a later, longer request reuses it without a fill.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn, s};
use qgraph::Tensor;

/// How many free buffers the pool keeps at most.
const MAX_FREE: usize = 32;

/// A pool of f32 buffers, shared by the runs of one session.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

/// `len` elements at the front of a pooled allocation, with unspecified (finite, previously
/// computed) contents: the caller must overwrite every element.
#[derive(Debug)]
pub(crate) struct Scratch {
    data: Vec<f32>,
    len: usize,
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

impl Scratch {
    /// A tensor of `shape` over the prefix (the allocation goes with it, back to the pool when
    /// the session recycles the tensor).
    pub fn into_tensor(self, shape: &[usize]) -> Result<Tensor, String> {
        let (full, len) = (self.data.len(), self.len);
        let n: usize = shape.iter().product();
        if n != len {
            return Err(format!("internal: {len} elements for shape {shape:?}"));
        }
        let whole = ArrayD::from_shape_vec(IxDyn(&[full]), self.data).map_err(|e| e.to_string())?;
        let prefix =
            whole.slice_move(s![..len]).into_shape_with_order(IxDyn(shape)).map_err(|e| e.to_string())?;
        Ok(Tensor::F32(prefix.into_shared()))
    }
}

/// Scratch space on loan from a [`BufferPool`], returned to it on drop.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    pool: &'a BufferPool,
    scratch: Option<Scratch>,
}

impl Deref for Lease<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.scratch.as_deref().unwrap_or_default()
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.scratch.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            self.pool.put(scratch);
        }
    }
}

impl BufferPool {
    /// Scratch space of `len` elements: the smallest free buffer that already holds `len`
    /// initialized elements, else one with the capacity (its tail zero-filled), else a new one.
    pub fn take(&self, len: usize) -> Scratch {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let smallest = |fits: &dyn Fn(&Vec<f32>) -> bool| {
                free.iter().enumerate().filter(|(_, b)| fits(b)).min_by_key(|(_, b)| b.len()).map(|(i, _)| i)
            };
            let best = smallest(&|b| b.len() >= len).or_else(|| smallest(&|b| b.capacity() >= len))?;
            Some(free.swap_remove(best))
        });
        let data = match reused {
            Some(mut b) => {
                if b.len() < len {
                    b.resize(len, 0.0);
                }
                b
            }
            None => vec![0.0; len],
        };
        Scratch { data, len }
    }

    /// Scratch space of `len` elements, contents unspecified as with [`BufferPool::take`], that
    /// goes back to the pool when dropped: the per-thread buffers of a parallel loop, which has
    /// no place to hand them back itself.
    pub fn lease(&self, len: usize) -> Lease<'_> {
        Lease { pool: self, scratch: Some(self.take(len)) }
    }

    /// [`BufferPool::lease`], zeroed. Zeroing a recycled buffer costs less than the page faults
    /// of a fresh one.
    pub fn lease_zeroed(&self, len: usize) -> Lease<'_> {
        let mut lease = self.lease(len);
        lease.fill(0.0);
        lease
    }

    /// A copy of an f32 tensor in a pooled buffer, which the caller then owns alone (other
    /// dtypes come back as they are). A hook that rewrites a fed input in place would otherwise
    /// copy it into fresh memory on every run, and page faults on a large batch cost as much as
    /// the copy.
    pub fn owned_copy(&self, t: Tensor) -> Tensor {
        let Tensor::F32(a) = &t else { return t };
        let mut copy = self.take(a.len());
        match a.as_slice() {
            Some(src) => copy.copy_from_slice(src),
            None => copy.iter_mut().zip(a.iter()).for_each(|(d, &v)| *d = v),
        }
        copy.into_tensor(a.shape()).unwrap_or(t)
    }

    /// Takes back the buffer of `t` if nothing else references it.
    pub fn recycle(&self, t: Tensor) {
        let Tensor::F32(a) = t else { return };
        let Ok(owned) = a.try_into_owned_nocopy() else { return };
        let (buf, _) = owned.into_raw_vec_and_offset();
        self.keep(buf);
    }

    /// Takes back scratch space a kernel got from [`BufferPool::take`].
    pub fn put(&self, scratch: Scratch) {
        self.keep(scratch.data);
    }

    fn keep(&self, buf: Vec<f32>) {
        if buf.len() < 1024 {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            if free.len() < MAX_FREE {
                free.push(buf);
            } else if let Some((i, _)) =
                free.iter().enumerate().min_by_key(|(_, b)| b.len()).filter(|(_, b)| b.len() < buf.len())
            {
                // A full pool keeps the largest buffers: after small runs (batch 1) a session
                // must still recycle the big buffers of larger batches.
                free[i] = buf;
            }
        }
    }
}
