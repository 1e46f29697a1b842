//! Prefill's scores `q·Kᵀ` on the AMX tiles, where the CPU has them and both sides are bf16
//! values: keys from a bf16 pool, queries from a bf16 model (the engine widens its bf16 queries
//! to f32 exactly). The products are exact and summed in f32, as the f32 GEMM's are, in another
//! order. The probabilities times the values stay on the f32 GEMM: the probabilities are not
//! bf16 values, and rounding them would change what the engine computes.

use half::bf16;

use super::{CachedRow, PagedKv};

/// One head's `len` keys as stored, `[len][d]`, gathered through the block table into `buf`,
/// when the tiles run here for depth `d`, the pool holds bf16 and `queries_exact` says every
/// query of the head is a bf16 value; `None` otherwise (nothing gathered).
pub(super) fn keys<'a, T: CachedRow>(
    kv: &PagedKv<'_, T>,
    (len, stride, offset, d): (usize, usize, usize, usize),
    queries_exact: impl FnOnce() -> bool,
    buf: &'a mut Vec<bf16>,
) -> Option<&'a [bf16]> {
    if !on_tiles(d) || T::bf16_row(kv.keys, 0, 0).is_none() || !queries_exact() {
        return None;
    }
    buf.clear();
    for t in 0..len {
        buf.extend_from_slice(T::bf16_row(kv.keys, kv.slot(t, stride) + offset, d)?);
    }
    Some(buf)
}

/// `scores[rows × cols] = Q · Kᵀ` (unscaled) for the queries `query(i)`, `i < rows`, each `d`
/// wide, against the first `cols` of `keys`, gathering the queries into `qbuf`; false (nothing
/// written) when the tiles decline.
pub(super) fn scores<'q>(
    query: impl Fn(usize) -> &'q [f32],
    (rows, d, cols): (usize, usize, usize),
    keys: &[bf16],
    qbuf: &mut Vec<f32>,
    scores: &mut [f32],
) -> bool {
    qbuf.clear();
    for i in 0..rows {
        qbuf.extend_from_slice(query(i));
    }
    product(qbuf, &keys[..cols * d], (rows, d, cols), scores)
}

/// Whether every value is a bf16 value.
pub(super) fn exact(x: &[f32]) -> bool {
    x.iter().all(|v| v.to_bits() & 0xffff == 0)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn on_tiles(d: usize) -> bool {
    crate::amx::takes(d)
}

/// On this thread alone: the caller is a pool task holding the attention's thread-local
/// buffers, which a parallel product could re-enter (rayon runs other tasks while it waits).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn product(x: &[f32], w: &[bf16], shape: (usize, usize, usize), out: &mut [f32]) -> bool {
    crate::amx::matmul(x, w, shape, out, crate::amx::Split::Here)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn on_tiles(_: usize) -> bool {
    false
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn product(_: &[f32], _: &[bf16], _: (usize, usize, usize), _: &mut [f32]) -> bool {
    false
}
