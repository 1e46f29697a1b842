//! Causal grouped-query attention of one sequence's new queries over its keys and values in the
//! paged KV pool: the engine's fused kernel on the CPU, candle's operations elsewhere.

use candle_core::{DType, Tensor};

use crate::batch::{Batch, SeqStep};
use crate::kv_pool::BlockId;
use crate::{EngineError, Result};

/// One sequence's keys and values in the pool.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// The pool's keys, `(slots, kv_heads, head_dim)`.
    pub keys: &'a Tensor,
    /// The pool's values, shaped as the keys (MLA: the keys themselves).
    pub values: &'a Tensor,
    /// How much of each value head is read: its first `value_dim` elements (`head_dim` for
    /// ordinary attention; MLA's values are the latent part of its keys).
    pub value_dim: usize,
    /// The sequence's block table.
    pub blocks: &'a [BlockId],
    /// Positions per block.
    pub block_size: usize,
}

/// Attention of `q` — `(seq, heads, head_dim)`, the queries at positions `start..start + seq` —
/// over the sequence's first `start + seq` positions; the result is `(seq, heads, value_dim)`.
/// Query head `h` reads key/value head `h / (heads / kv_heads)`.
pub fn paged(q: &Tensor, kv: &PagedKv<'_>, start: usize, scale: f64) -> Result<Tensor> {
    let seq = q.dim(0)?;
    if kv.blocks.len() * kv.block_size < start + seq {
        return Err(EngineError::Internal(format!(
            "attention over {} positions through a block table of {} blocks of {}",
            start + seq,
            kv.blocks.len(),
            kv.block_size
        )));
    }
    if let Some(out) = crate::cpu::attention(q, kv, start, scale as f32)? {
        return Ok(out);
    }
    with_candle(q, kv, start, scale)
}

/// [`paged`] for every sequence of `batch`: `q` holds their queries back to back,
/// `(rows, heads, head_dim)`; each attends over its own blocks of the pool's `keys` and `values`
/// (`(slots, kv_heads, head_dim)`, reading `value_dim` of each value head). The results come back
/// to back, `(rows, heads, value_dim)`. On a GPU the decode rows and the short prompt chunks
/// (`gpu_rows`) take the engine's kernel in one launch; longer chunks, and every chunk with
/// `PIO_GPU_KERNELS=candle`, take candle's operations per sequence.
pub fn paged_batch(
    q: &Tensor,
    batch: &Batch<'_>,
    keys: &Tensor,
    values: &Tensor,
    (block_size, value_dim): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let _timed = crate::profile::PROFILE.scope(crate::profile::Op::Attention);
    let on_gpu = attended_on_gpu(q, batch, keys, values, (block_size, value_dim), scale)?;
    if let Some((out, at)) = &on_gpu {
        if at.iter().all(Option::is_some) {
            return Ok(out.clone());
        }
    }
    let mut outs = Vec::with_capacity(batch.seqs.len());
    let mut row = 0;
    for (i, seq) in batch.seqs.iter().enumerate() {
        let n = seq.tokens.len();
        if let Some((out, Some(at))) = on_gpu.as_ref().map(|(out, at)| (out, at[i])) {
            outs.push(out.narrow(0, at, n)?);
            row += n;
            continue;
        }
        let kv = PagedKv {
            keys,
            values,
            blocks: seq.blocks,
            block_size,
            value_dim,
        };
        outs.push(paged(&q.narrow(0, row, n)?, &kv, seq.start, scale)?);
        row += n;
    }
    Ok(if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 0)?
    })
}

/// On a GPU, the rows of `batch` the engine's kernel takes, all in one launch: every row, or with
/// `PIO_GPU_KERNELS=candle` (or more rows than a grid holds) the decoding sequences' only; the
/// outputs, and where each sequence's first row is among them (`None`: not taken).
#[cfg(feature = "cuda")]
fn attended_on_gpu(
    q: &Tensor,
    batch: &Batch<'_>,
    keys: &Tensor,
    values: &Tensor,
    shape: (usize, usize),
    scale: f64,
) -> Result<Option<(Tensor, Vec<Option<usize>>)>> {
    if !crate::cuda::takes(q, keys, values, shape) {
        return Ok(None);
    }
    let prompts = crate::cuda::KERNELS.on() && batch.rows() <= crate::cuda::MAX_GRID_Y;
    let (taken, at) = gpu_rows(batch, prompts);
    let seqs: Vec<&SeqStep<'_>> = (batch.seqs.iter().zip(&at))
        .filter_map(|(seq, at)| at.map(|_| seq))
        .collect();
    if seqs.is_empty() {
        return Ok(None);
    }
    let q = if taken.len() == batch.rows() {
        q.clone()
    } else {
        q.index_select(&Tensor::new(taken, q.device())?, 0)?
    };
    let out =
        crate::cuda::paged_attention(&q, &seqs, keys, values, shape, scale, &batch.device_tables)?;
    Ok(Some((out, at)))
}

/// The most query-position pairs (rows × positions read by the last) a prompt chunk may have
/// and still take the GPU kernel: its rows re-read the sequence's keys once per row and head
/// (from cache), which beats candle's per-sequence launches for the short chunks of many
/// prompts at once, not a long chunk deep into a long prompt (where cuBLAS's products win). A
/// first estimate (the default 256-token chunk of a fresh prompt qualifies); the GPU bench's
/// A/B is where to tune it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_KERNEL_CHUNK_PAIRS: usize = 1 << 16;

/// Which of `batch`'s rows the GPU kernel takes — every decoding sequence's one row, and with
/// `prompts` each prompt chunk within [`MAX_KERNEL_CHUNK_PAIRS`] — as their indices into the
/// step's rows, and where each sequence's first row lands among them (`None`: not taken).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn gpu_rows(batch: &Batch<'_>, prompts: bool) -> (Vec<u32>, Vec<Option<usize>>) {
    let (mut taken, mut at, mut row) = (Vec::new(), Vec::new(), 0u32);
    for seq in &batch.seqs {
        let n = seq.tokens.len() as u32;
        let chunk_fits = n as usize * (seq.start + n as usize) <= MAX_KERNEL_CHUNK_PAIRS;
        at.push((n == 1 || (prompts && chunk_fits)).then(|| {
            taken.extend(row..row + n);
            taken.len() - n as usize
        }));
        row += n;
    }
    (taken, at)
}

/// Thread blocks a launch should have to keep a large GPU busy (an H200 has 132 multiprocessors).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TARGET_BLOCKS: usize = 264;
/// The fewest positions worth a share of their own (fewer, and the merge costs more than it saves).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MIN_SHARE: usize = 64;

/// On a GPU, how many shares to split each of `blocks` (sequence, head) pairs' positions into, the longest
/// sequence attending over `longest`: enough for [`TARGET_BLOCKS`], each share at least
/// [`MIN_SHARE`] positions long; 1 where the batch fills the GPU by itself.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn decode_splits(blocks: usize, longest: usize) -> usize {
    (TARGET_BLOCKS / blocks.max(1))
        .min(longest.div_ceil(MIN_SHARE))
        .max(1)
}

/// The length every decoding sequence's block table is padded to: the longest's (at least 1).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn table_width(seqs: &[&SeqStep<'_>]) -> usize {
    seqs.iter()
        .map(|s| s.blocks.len())
        .max()
        .unwrap_or(1)
        .max(1)
}

/// What the attention kernel reads for `seqs`' rows: each block table padded to the longest's
/// length, then every row's position count (a sequence's rows at `start`, `start + 1`, … attend
/// over `start + 1`, `start + 2`, … positions: the causal mask), then every row's sequence. A
/// table that does not cover its sequence's rows, or names a block outside the pool's
/// `pool_blocks`, is an error here rather than a read out of bounds on the device.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn row_tables(
    seqs: &[&SeqStep<'_>],
    block_size: usize,
    pool_blocks: usize,
) -> Result<Vec<u32>> {
    let width = table_width(seqs);
    let mut words = vec![0u32; seqs.len() * width];
    for (row, seq) in words.chunks_exact_mut(width).zip(seqs) {
        let end = seq.start + seq.tokens.len();
        if seq.blocks.len() * block_size < end
            || seq.blocks.iter().any(|&b| b as usize >= pool_blocks)
        {
            return Err(EngineError::Internal(format!(
                "attention over positions {}..{end} through a block table of {:?} (blocks of {block_size}, {pool_blocks} in the pool)",
                seq.start, seq.blocks
            )));
        }
        row[..seq.blocks.len()].copy_from_slice(seq.blocks);
    }
    let rows = |s: &&SeqStep<'_>| s.start + 1..s.start + s.tokens.len() + 1;
    words.extend(seqs.iter().flat_map(rows).map(|len| len as u32));
    for (i, seq) in seqs.iter().enumerate() {
        words.extend(std::iter::repeat_n(i as u32, seq.tokens.len()));
    }
    Ok(words)
}

/// Without the `cuda` feature nothing runs on a GPU.
#[cfg(not(feature = "cuda"))]
fn attended_on_gpu(
    _: &Tensor,
    _: &Batch<'_>,
    _: &Tensor,
    _: &Tensor,
    _: (usize, usize),
    _: f64,
) -> Result<Option<(Tensor, Vec<Option<usize>>)>> {
    Ok(None)
}

/// The same with candle's operations: the sequence's rows gathered, keys and values repeated per
/// query head, an explicit mask.
fn with_candle(q: &Tensor, kv: &PagedKv<'_>, start: usize, scale: f64) -> Result<Tensor> {
    let (seq, heads, head_dim) = q.dims3()?;
    let total = start + seq;
    let bs = kv.block_size;
    let slots: Vec<u32> = (0..total)
        .map(|t| kv.blocks[t / bs] * bs as u32 + (t % bs) as u32)
        .collect();
    let slots = Tensor::new(slots, q.device())?;
    let read = |t: &Tensor| crate::kv_pool::values(&t.index_select(&slots, 0)?, head_dim);
    let (k, v) = (read(kv.keys)?, read(kv.values)?.narrow(2, 0, kv.value_dim)?);
    // (heads, positions, head_dim), each key/value head repeated for its group of query heads.
    let heads_first = |t: &Tensor| -> Result<Tensor> {
        let (len, kvh, d) = t.dims3()?;
        let groups = heads / kvh;
        Ok(t.transpose(0, 1)?
            .unsqueeze(1)?
            .expand((kvh, groups, len, d))?
            .reshape((kvh * groups, len, d))?)
    };
    let q = q.transpose(0, 1)?.contiguous()?;
    let (k, v) = (
        heads_first(&k.to_dtype(q.dtype())?)?,
        heads_first(&v.to_dtype(q.dtype())?)?,
    );
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if seq > 1 {
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq, total), q.device())?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs =
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?.transpose(0, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;

    fn step(tokens: &'static [u32], blocks: &'static [u32], start: usize) -> SeqStep<'static> {
        SeqStep {
            tokens,
            splices: &[],
            start,
            positions: &crate::batch::Positions::Linear,
            blocks,
            logits: crate::batch::Wanted::Best,
            score: None,
        }
    }

    #[test]
    fn row_tables_pad_each_table_give_each_row_its_length_and_refuse_what_would_read_out_of_bounds()
    {
        let (a, b) = (step(&[1], &[4, 7], 20), step(&[1, 2, 3], &[2], 3));
        let words = row_tables(&[&a, &b], 16, 8).unwrap();
        // Tables padded to 2; a's row over 21 positions, b's three over 4, 5, 6; their sequences.
        assert_eq!(words, [4, 7, 2, 0, 21, 4, 5, 6, 0, 1, 1, 1]);
        // Position 32 needs a third block of 16; so do rows 14..17 of a one-block chunk; block 8
        // is past a pool of 8.
        for bad in [
            step(&[1], &[4, 7], 32),
            step(&[1, 2, 3], &[2], 14),
            step(&[1], &[8], 0),
        ] {
            assert!(row_tables(&[&a, &bad], 16, 8).is_err(), "{bad:?}");
        }
    }

    /// Prompt chunks go to the kernel with the decode rows (the short ones), or stay out of it,
    /// and each sequence's rows are found where they landed.
    #[test]
    fn gpu_rows_take_decode_rows_and_short_enough_prompt_chunks() {
        // A 2-row chunk at position 2^16 - 2 reads 2^16 positions with its last row: 2^17 pairs,
        // past the kernel's share; decode rows go at any depth.
        let seqs = vec![
            step(&[1], &[0], 4),
            step(&[1, 2, 3], &[1], 0),
            step(&[1], &[2], 9),
            step(&[1, 2], &[3], 5),
            step(&[1, 2], &[4], (1 << 16) - 2),
            step(&[1], &[5], 1 << 20),
        ];
        let batch = Batch::new(seqs);
        let (all, at) = gpu_rows(&batch, true);
        assert_eq!(all, [0, 1, 2, 3, 4, 5, 6, 9]);
        assert_eq!(at, [Some(0), Some(1), Some(4), Some(5), None, Some(7)]);
        let (decoding, at) = gpu_rows(&batch, false);
        assert_eq!(decoding, [0, 4, 9]);
        assert_eq!(at, [Some(0), None, Some(1), None, None, Some(2)]);
    }

    /// A lone sequence's heads are split until the GPU has enough blocks, never into shares
    /// shorter than the minimum; a batch that fills the GPU by itself is not split.
    #[test]
    fn decode_splits_fill_the_gpu_without_tiny_shares() {
        assert_eq!(decode_splits(32, 1540), 8, "32 heads x 8 = 256 blocks");
        assert_eq!(
            decode_splits(32, 100),
            2,
            "100 positions: two shares of at least 64"
        );
        assert_eq!(decode_splits(32, 64), 1);
        assert_eq!(decode_splits(32 * 32, 4000), 1, "32 sequences fill the GPU");
        assert_eq!(decode_splits(0, 0), 1);
        for blocks in 1..300 {
            for longest in [1, 63, 65, 640, 100_000] {
                let s = decode_splits(blocks, longest);
                assert!(
                    s >= 1 && (s == 1 || blocks * s <= TARGET_BLOCKS),
                    "{blocks} {longest}"
                );
                assert!(s == 1 || longest.div_ceil(s) >= MIN_SHARE.min(longest) / 2);
            }
        }
    }
    use crate::kv_pool::{CacheType, KvPool, PoolShape, TokenLayout};
    use candle_core::Device;

    /// The fused kernel and candle's operations agree through a scattered block table, for a
    /// prompt and the decode steps after it, on float and 8-bit pools (both read the same
    /// rounded rows).
    #[test]
    fn the_kernel_and_candle_agree() {
        for storage in [CacheType::Float(DType::F32), CacheType::Q8_0] {
            agree(storage);
        }
    }

    fn agree(storage: CacheType) {
        let device = Device::Cpu;
        let (heads, kv_heads, d) = (6, 2, 16);
        let shape = PoolShape {
            block_size: 4,
            blocks: 8,
            storage,
        };
        let pool = KvPool::new(TokenLayout::keys_values(1, kv_heads, d), shape, &device).unwrap();
        let blocks = [5, 2, 7, 0, 3, 6];
        let mut start = 0;
        for seq in [12, 1, 1, 9] {
            let seed = 3 * start as u64;
            let q = normal(0.0, 1.0, (seq, heads, d), &device, seed);
            let k = normal(0.0, 1.0, (seq, kv_heads, d), &device, seed + 1);
            let v = normal(0.0, 1.0, (seq, kv_heads, d), &device, seed + 2);
            pool.write(0, 0, &blocks, start, &k).unwrap();
            pool.write(0, 1, &blocks, start, &v).unwrap();
            let kv = PagedKv {
                keys: &pool.layer(0)[0],
                values: &pool.layer(0)[1],
                blocks: &blocks,
                block_size: 4,
                value_dim: d,
            };
            let fused = paged(&q, &kv, start, 0.25).unwrap();
            let reference = with_candle(&q, &kv, start, 0.25).unwrap();
            assert_eq!(fused.dims(), &[seq, heads, d]);
            let diff = (fused - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            // Decode over 8-bit keys rounds the query to 8-bit blocks too (as llama.cpp does):
            // scores move by ~1/254 of the query's scale, the outputs by as little.
            let tolerance = match (storage, seq < 8) {
                (CacheType::Q8_0, true) => 2e-2,
                _ => 1e-5,
            };
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(
                diff < tolerance,
                "{storage:?}: seq {seq} at {start}: {diff}"
            );
            start += seq;
        }
    }
}
