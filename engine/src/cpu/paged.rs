//! Attention over the paged KV pool on the kernels: each sequence's blocks read in place through
//! its block table, in whichever element type the pool stores.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use pio_kernels::{paged_attention, AttentionShape, CachedRow, PagedKv};

use super::{activations, in_dtype, supports, with_elements, with_f32, Elements};

/// Causal attention of `q` `(seq, heads, head_dim)` at positions `start..` over one sequence's
/// keys and values in the paged pool (`(slots, kv_heads, head_dim)` each, read through its block
/// table); the result is `(seq, heads, head_dim)` in `q`'s dtype. `None` off the CPU.
pub(crate) fn attention(
    q: &Tensor,
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let (keys, values) = (kv.keys, kv.values);
    let eight_bit = keys.dtype() == DType::U8;
    if !supports(q) || !(eight_bit || supports(keys)) || keys.dtype() != values.dtype() {
        return Ok(None);
    }
    let (seq, heads, head_dim) = q.dims3()?;
    let kv_heads = checked_pool(q, kv, start)?;
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim,
        value_dim: kv.value_dim,
        scale,
    };
    let qf = activations(q)?;
    let mut out = vec![0f32; seq * heads * kv.value_dim];
    if !with_f32(&qf, |qs| attend_into(&shape, qs, kv, start, &mut out)) {
        return Ok(None);
    }
    Ok(Some(in_dtype(out, &[seq, heads, kv.value_dim], q.dtype())?))
}

/// The pool's key/value heads, once its shapes are checked against `q`'s: head sizes match,
/// query heads are a multiple of key/value heads, the block table covers every position
/// `..start + seq` and stays inside the pool.
fn checked_pool(
    q: &Tensor,
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
) -> candle_core::Result<usize> {
    let (keys, values) = (kv.keys, kv.values);
    let (seq, heads, head_dim) = q.dims3()?;
    let (slots, kv_heads, key_units) = keys.dims3()?;
    let units = match keys.dtype() == DType::U8 {
        true => pio_kernels::kv_q8::row_bytes(head_dim),
        false => head_dim,
    };
    let bs = kv.block_size;
    let blocks_fit = kv.blocks[..(start + seq).div_ceil(bs.max(1)).min(kv.blocks.len())]
        .iter()
        .all(|&b| (b as usize + 1) * bs <= slots);
    if key_units != units
        || values.dims() != keys.dims()
        || kv.value_dim == 0
        || kv.value_dim > head_dim
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || bs == 0
        || kv.blocks.len() * bs < start + seq
        || !blocks_fit
    {
        candle_core::bail!(
            "attention of {seq} queries {:?} at position {start} over a pool of {:?} keys and {:?} values: \
             head sizes must match, query heads be a multiple of key/value heads, and the block table cover every position inside the pool",
            q.dims(),
            keys.dims(),
            values.dims()
        );
    }
    Ok(kv_heads)
}

/// Paged attention of the queries `qs` into `out`, over the pool in whichever element type it
/// holds (8-bit rows, f32, bf16, f16); false if its storage is none of them.
fn attend_into(
    shape: &AttentionShape,
    qs: &[f32],
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
    out: &mut [f32],
) -> bool {
    fn run<T: CachedRow>(
        shape: &AttentionShape,
        (qs, keys, values): (&[f32], &[T], &[T]),
        kv: &crate::attention::PagedKv<'_>,
        start: usize,
        out: &mut [f32],
    ) -> bool {
        let view = PagedKv {
            keys,
            values,
            blocks: kv.blocks,
            block_size: kv.block_size,
        };
        paged_attention(shape, qs, &view, start, out);
        true
    }
    let (keys, values) = (kv.keys, kv.values);
    if keys.dtype() == DType::U8 {
        return with_bytes(keys, |k| {
            with_bytes(values, |v| run(shape, (qs, k, v), kv, start, out)).unwrap_or(false)
        })
        .unwrap_or(false);
    }
    with_elements(keys, |ks| {
        with_elements(values, |vs| match (ks, vs) {
            (Elements::F32(k), Elements::F32(v)) => run(shape, (qs, k, v), kv, start, out),
            (Elements::Bf16(k), Elements::Bf16(v)) => run(shape, (qs, k, v), kv, start, out),
            (Elements::F16(k), Elements::F16(v)) => run(shape, (qs, k, v), kv, start, out),
            _ => false,
        })
        .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// Calls `f` on the bytes of `t` when it is a contiguous CPU tensor of bytes (the 8-bit KV
/// cache's rows).
fn with_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::U8(v)) => Some(f(&v[start..end])),
        _ => None,
    }
}
