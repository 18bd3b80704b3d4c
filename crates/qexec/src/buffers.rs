//! Recycled f32 buffers. Every run of a CNN allocates the same large activation buffers over and
//! over; zero-filling fresh ones costs as much as a small layer. The session hands intermediates it
//! no longer needs back here, and kernels that overwrite their whole output take buffers from here.

use std::sync::Mutex;

use qgraph::Tensor;

/// How many free buffers the pool keeps at most.
const MAX_FREE: usize = 32;

/// A pool of f32 buffers, shared by the runs of one session.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

impl BufferPool {
    /// A buffer of `len` elements with unspecified (finite, previously computed) contents: the
    /// caller must overwrite every element.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            // Best fit by capacity (a shorter length is extended, zero-filling only the tail).
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)?;
            Some(free.swap_remove(best))
        });
        match reused {
            Some(mut b) => {
                b.resize(len, 0.0);
                b
            }
            None => vec![0.0; len],
        }
    }

    /// Takes back the buffer of `t` if nothing else references it.
    pub fn recycle(&self, t: Tensor) {
        let Tensor::F32(a) = t else { return };
        let Ok(owned) = a.try_into_owned_nocopy() else { return };
        let (buf, _) = owned.into_raw_vec_and_offset();
        self.put(buf);
    }

    /// Takes back a scratch buffer a kernel got from [`BufferPool::take`].
    pub fn put(&self, buf: Vec<f32>) {
        if buf.capacity() < 1024 {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            if free.len() < MAX_FREE {
                free.push(buf);
            } else if let Some((i, _)) = free
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .filter(|(_, b)| b.capacity() < buf.capacity())
            {
                // A full pool keeps the largest buffers: after small runs (batch 1) a session
                // must still recycle the big buffers of larger batches.
                free[i] = buf;
            }
        }
    }
}
