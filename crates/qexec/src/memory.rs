//! The memory guard: the largest tensor a session may create, checked with overflow-safe
//! arithmetic before anything is allocated, so a hostile or mistaken model (a pad of 2⁴⁰, a Tile
//! whose repeats multiply past the address space) fails with an error naming the node, the shape
//! and the bytes instead of aborting the process or exhausting the machine.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The process-wide default set by [`set_default_max_tensor_bytes`] (0: not set).
static DEFAULT_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Bytes one tensor may take when the caller sets no limit: what
/// [`set_default_max_tensor_bytes`] set, else half the physical memory (4 GiB where it cannot
/// be read).
pub fn default_max_tensor_bytes() -> usize {
    match DEFAULT_LIMIT.load(Ordering::Relaxed) {
        0 => physical_memory().map_or(4 << 30, |bytes| bytes / 2),
        set => set,
    }
}

/// Sets the default of every session built afterwards in this process (a command-line
/// `--max-memory`); 0 restores the physical-memory default.
pub fn set_default_max_tensor_bytes(bytes: usize) {
    DEFAULT_LIMIT.store(bytes, Ordering::Relaxed);
}

/// Total physical memory from `/proc/meminfo` (Linux), if readable.
fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes of a tensor of `shape` with `elem` bytes per element, `None` when the product
/// overflows `usize`.
pub fn tensor_bytes(shape: &[usize], elem: usize) -> Option<usize> {
    shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d))
}

/// The number of elements of `shape` when a tensor of it (`elem` bytes each) fits `limit`
/// bytes; otherwise a description of the shape, the bytes it needs and the limit.
pub(crate) fn check(shape: &[usize], elem: usize, limit: usize) -> Result<usize, String> {
    match tensor_bytes(shape, elem) {
        Some(bytes) if bytes <= limit => Ok(bytes / elem.max(1)),
        Some(bytes) => Err(format!(
            "output shape {shape:?} needs {} bytes, beyond the memory limit of {} bytes (raise it with --max-memory)",
            bytes, limit
        )),
        None => Err(format!("output shape {shape:?} has more elements than memory can address")),
    }
}

/// A size computed in floating point (a Range length, a Resize output dim) as an integer, when it
/// is a finite, non-negative count below 2⁵³ (where f64 still counts exactly).
pub(crate) fn count_from_f64(v: f64, what: &str) -> Result<usize, String> {
    if (0.0..9.0e15).contains(&v) { Ok(v as usize) } else { Err(format!("{what} gives {v} elements")) }
}

/// [`check`] for dims given as signed integers (repeats, pads, target shapes): negative dims are
/// refused too.
pub(crate) fn check_signed(dims: &[i64], elem: usize, limit: usize) -> Result<Vec<usize>, String> {
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d} in {dims:?}")))
        .collect::<Result<_, _>>()?;
    check(&shape, elem, limit)?;
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_before_they_overflow() {
        assert_eq!(tensor_bytes(&[2, 3], 4), Some(24));
        assert_eq!(tensor_bytes(&[1 << 40, 1 << 40], 4), None);
        assert_eq!(check(&[2, 3], 4, 24), Ok(6));
        assert!(check(&[2, 4], 4, 24).unwrap_err().contains("32 bytes"));
        assert!(check(&[usize::MAX, 2], 4, usize::MAX).unwrap_err().contains("more elements"));
        assert!(check_signed(&[2, -1], 4, 100).unwrap_err().contains("negative"));
        assert!(default_max_tensor_bytes() > 0);
    }
}
