//! Prefill's scores `q·Kᵀ` on the AMX tiles, where the CPU has them and both sides are bf16
//! values: keys from a bf16 pool, queries from a bf16 model (the engine widens its bf16 queries
//! to f32 exactly). The products are exact and summed in f32, as the f32 GEMM's are, in another
//! order. The probabilities times the values stay on the f32 GEMM unless the caller asked for
//! them rounded to bf16 ([`super::Probabilities::Bf16`], an encoder whose reference rounds
//! them so): otherwise they are not bf16 values, and rounding them would change the result.

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

/// One head's `len` values transposed and packed for the tiles (`vd` rows of `len` rounded up
/// to a tile's depth, zeros past `len`; gathered through `buf`), when the tiles run here and the
/// pool holds bf16; `None` otherwise. Packed once per head, they are the products' activations:
/// each slice's probabilities are the weights, taken as they lie, so a slice packs nothing.
pub(super) fn values_packed<T: CachedRow>(
    kv: &PagedKv<'_, T>,
    (len, stride, offset, vd): (usize, usize, usize, usize),
    buf: &mut Vec<f32>,
) -> Option<PackedValues> {
    let depth = padded_depth(len);
    if !on_tiles(depth) || T::bf16_row(kv.values, 0, 0).is_none() {
        return None;
    }
    buf.clear();
    buf.resize(vd * depth, 0.0);
    for t in 0..len {
        let row = T::bf16_row(kv.values, kv.slot(t, stride) + offset, vd)?;
        for (x, &v) in row.iter().enumerate() {
            buf[x * depth + t] = v.to_f32();
        }
    }
    pack(buf, (vd, depth))
}

/// `out[vd × rows] = (P · V)ᵀ` for probabilities `probs` (`rows × cols`) rounded to bf16 and
/// values from [`values_packed`] (`cols` of them), the rounded rows gathered into `pbuf`.
pub(super) fn weighted(
    probs: &[f32],
    (rows, cols): (usize, usize),
    values: &PackedValues,
    pbuf: &mut Vec<bf16>,
    out: &mut [f32],
) {
    let depth = padded_depth(cols);
    // Every value is written: the row, then its padding (no zeroing pass before).
    pbuf.resize(rows * depth, bf16::ZERO);
    for (dst, src) in pbuf.chunks_exact_mut(depth).zip(probs.chunks_exact(cols)) {
        let (row, pad) = dst.split_at_mut(cols);
        crate::convert::round_bf16(src, row);
        pad.fill(bf16::ZERO);
    }
    times(values, pbuf, rows, out);
}

/// `len` rounded up to a whole number of the tiles' depth (32 pairs of bf16).
fn padded_depth(len: usize) -> usize {
    len.next_multiple_of(32)
}

/// A head's values packed for the tiles.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) type PackedValues = crate::amx::Packed;

/// No tiles off x86-64 Linux: never made.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) enum PackedValues {}

/// On this thread alone, as [`product`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn pack(x: &[f32], shape: (usize, usize)) -> Option<PackedValues> {
    crate::amx::Packed::new(x, shape, crate::amx::Split::Here)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn times(values: &PackedValues, w: &[bf16], n: usize, out: &mut [f32]) {
    values.times(w, n, out, crate::amx::Split::Here)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn pack(_: &[f32], _: (usize, usize)) -> Option<PackedValues> {
    None
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn times(values: &PackedValues, _: &[bf16], _: usize, _: &mut [f32]) {
    match *values {}
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
    if !crate::amx::takes(shape.1) {
        return false;
    }
    let w = crate::StackedRows::new(std::slice::from_ref(&w), shape.1);
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
