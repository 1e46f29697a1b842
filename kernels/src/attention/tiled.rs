//! Prefill's scores `q·Kᵀ` on the AMX tiles, where the CPU has them and both sides are bf16
//! values: keys from a bf16 pool, queries from a bf16 model (the engine widens its bf16 queries
//! to f32 exactly). The products are exact and summed in f32, as the f32 GEMM's are, in another
//! order. The probabilities times the values stay on the f32 GEMM unless the caller asked for
//! them rounded to bf16 ([`super::Probabilities::Bf16`], an encoder whose reference rounds
//! them so): otherwise they are not bf16 values, and rounding them would change the result.
//!
//! In both products the head's keys or values are packed once as the tiles' activations and
//! each slice's queries or probabilities are the weights, taken as they lie: the tiles then hold
//! `Q · Kᵀ` and `P · V` as they are wanted, and the sums leave without a transposition.

use half::bf16;

use super::{CachedRow, PagedKv};
use crate::parallel::SharedMut;

/// One head's `len` keys as stored, `[len][d]`, gathered through the block table into `buf` and
/// packed for the tiles, when the tiles run here for depth `d`, the pool holds bf16 and
/// `queries_exact` says every query of the head is a bf16 value; `None` otherwise.
pub(super) fn keys<T: CachedRow>(
    kv: &PagedKv<'_, T>,
    (len, stride, offset, d): (usize, usize, usize, usize),
    queries_exact: impl FnOnce() -> bool,
    buf: &mut Vec<bf16>,
) -> Option<PackedKeys> {
    if !on_tiles(d) || T::bf16_row(kv.keys, 0, 0).is_none() || !queries_exact() {
        return None;
    }
    buf.clear();
    for t in 0..len {
        buf.extend_from_slice(T::bf16_row(kv.keys, kv.slot(t, stride) + offset, d)?);
    }
    pack_bf16(buf, (len, d))
}

/// `scores[rows × cols] = Q · Kᵀ` (unscaled) for the queries `query(i)`, `i < rows`, each `d`
/// wide and every one a bf16 value ([`keys`] checked), against the first `cols` of `keys`, the
/// queries gathered as bf16 into `qbuf`.
pub(super) fn scores<'q>(
    query: impl Fn(usize) -> &'q [f32],
    (rows, d, cols): (usize, usize, usize),
    keys: &PackedKeys,
    qbuf: &mut Vec<bf16>,
    scores: &mut [f32],
) {
    assert_eq!(scores.len(), rows * cols, "scores are not {rows} × {cols}");
    qbuf.clear();
    for i in 0..rows {
        // Exact: each value's low half is zero.
        let bits = query(i)[..d].iter().map(|v| (v.to_bits() >> 16) as u16);
        qbuf.extend(bits.map(bf16::from_bits));
    }
    let y = SharedMut::new(scores);
    // SAFETY: `rows` rows of `cols` scores lie inside `scores`, this call's alone.
    unsafe { times(keys, (qbuf, rows), cols, y, (0, cols)) };
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

/// `y[at + i·stride ..][..vd] = (P · V)[i]` for probabilities `probs` (`rows × cols`) rounded to
/// bf16 and values from [`values_packed`] (`cols` of them), the rounded rows gathered into
/// `pbuf`.
///
/// # Safety
/// Rows `at + i·stride`, `i < rows`, of `vd` values each lie inside `y`, and nothing else writes
/// them meanwhile.
pub(super) unsafe fn weighted(
    probs: &[f32],
    (rows, cols): (usize, usize),
    values: &PackedValues,
    pbuf: &mut Vec<bf16>,
    y: SharedMut<f32>,
    out: (usize, usize),
) {
    let depth = padded_depth(cols);
    // Every value is written: the row, then its padding (no zeroing pass before).
    pbuf.resize(rows * depth, bf16::ZERO);
    for (dst, src) in pbuf.chunks_exact_mut(depth).zip(probs.chunks_exact(cols)) {
        let (row, pad) = dst.split_at_mut(cols);
        crate::convert::round_bf16(src, row);
        pad.fill(bf16::ZERO);
    }
    // SAFETY: the caller's promise.
    unsafe { times(values, (pbuf, rows), packed_rows(values), y, out) };
}

/// `len` rounded up to a whole number of the tiles' depth (32 pairs of bf16).
fn padded_depth(len: usize) -> usize {
    len.next_multiple_of(32)
}

/// A head's values (or keys) packed for the tiles.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) type PackedValues = crate::amx::Packed;

/// No tiles off x86-64 Linux: never made.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) enum PackedValues {}

/// A head's keys packed for the tiles, as its values are.
pub(super) type PackedKeys = PackedValues;

/// On this thread alone, as [`times`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn pack(x: &[f32], shape: (usize, usize)) -> Option<PackedValues> {
    crate::amx::Packed::new(x, shape, crate::amx::Split::Here)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn pack_bf16(x: &[bf16], shape: (usize, usize)) -> Option<PackedKeys> {
    crate::amx::Packed::from_bf16(x, shape)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn packed_rows(x: &PackedValues) -> usize {
    x.rows()
}

/// `y[at + j·stride + i] = (w · xᵀ)[j][i]` for the `n` rows `j` of `w` (`(w, n)`) and the first
/// `m` packed rows `i` of `x`, on this thread alone: the caller is a pool task holding the
/// attention's thread-local buffers, which a parallel product could re-enter (rayon runs other
/// tasks while it waits).
///
/// # Safety
/// Rows `at + j·stride`, `j < n`, of `m` values each lie inside `y`, and nothing else writes
/// them meanwhile.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn times(
    x: &PackedValues,
    w: (&[bf16], usize),
    m: usize,
    y: SharedMut<f32>,
    out: (usize, usize),
) {
    // SAFETY: the caller's promise.
    unsafe { x.transposed_into(w, m, y, out, crate::amx::Split::Here) }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn pack(_: &[f32], _: (usize, usize)) -> Option<PackedValues> {
    None
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn pack_bf16(_: &[bf16], _: (usize, usize)) -> Option<PackedKeys> {
    None
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn packed_rows(x: &PackedValues) -> usize {
    match *x {}
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
unsafe fn times(
    x: &PackedValues,
    _: (&[bf16], usize),
    _: usize,
    _: SharedMut<f32>,
    _: (usize, usize),
) {
    match *x {}
}

/// Whether every value is a bf16 value.
pub(super) fn exact(x: &[f32]) -> bool {
    x.iter().all(|v| v.to_bits() & 0xffff == 0)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn on_tiles(d: usize) -> bool {
    crate::amx::takes(d)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn on_tiles(_: usize) -> bool {
    false
}
