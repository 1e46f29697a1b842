//! The paged KV pool every sequence of a model shares: fixed-size blocks of token slots, one
//! tensor per layer and per kind of cached vector, and a [`BlockAllocator`] saying which
//! sequence holds which block. A sequence's positions map to slots through its block table, so a
//! growing sequence takes a new block and nothing is copied; full blocks are shared between
//! sequences with the same prefix.
//!
//! What one token leaves per layer is the model's choice, declared as a [`TokenLayout`]: keys and
//! values per head for grouped-query attention, one compressed latent for MLA.

use candle_core::{DType, Device, Tensor};

use crate::{EngineError, Result};

mod blocks;

pub use blocks::{BlockAllocator, BlockId, PrefixHash};

/// One vector a token leaves per layer: `heads × dim` values (K or V of GQA: `kv_heads ×
/// head_dim`; MLA's latent: `1 × kv_lora_rank + rope_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedVector {
    /// Heads (rows per token).
    pub heads: usize,
    /// Values per head.
    pub dim: usize,
}

/// What a model caches per token: the same vectors in each of `layers` layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    /// Attention layers.
    pub layers: usize,
    /// The vectors of one layer (for GQA: keys, then values).
    pub vectors: Vec<CachedVector>,
}

impl TokenLayout {
    /// Grouped-query attention: keys and values of `kv_heads × head_dim` in every layer.
    pub fn keys_values(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let kv = CachedVector {
            heads: kv_heads,
            dim: head_dim,
        };
        Self {
            layers,
            vectors: vec![kv, kv],
        }
    }

    /// Multi-head latent attention: one `dim`-wide latent (shared by every head) per layer.
    pub fn latent(layers: usize, dim: usize) -> Self {
        Self {
            layers,
            vectors: vec![CachedVector { heads: 1, dim }],
        }
    }

    /// Bytes one token takes stored as `storage`.
    pub fn bytes_per_token(&self, storage: CacheType) -> usize {
        let per_layer: usize = self
            .vectors
            .iter()
            .map(|v| v.heads * storage.row_bytes(v.dim))
            .sum();
        self.layers * per_layer
    }
}

/// What the pool stores cached vectors as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    /// Values of a float dtype (f32, bf16 or f16).
    Float(DType),
    /// 8-bit rows with one f16 scale per 32 values ([`pio_kernels::kv_q8`]): half of bf16's
    /// bytes, so half the traffic of attention over a long context. Read by the CPU kernels.
    Q8_0,
}

impl CacheType {
    /// The type a manifest names: `f32`, `bf16`, `f16` or `q8_0`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "f32" => Self::Float(DType::F32),
            "bf16" => Self::Float(DType::BF16),
            "f16" => Self::Float(DType::F16),
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    /// The name [`parse`](Self::parse) takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float(dtype) => dtype.as_str(),
            Self::Q8_0 => "q8_0",
        }
    }

    /// Bytes one cached row of `dim` values takes.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            Self::Float(dtype) => dim * dtype.size_in_bytes(),
            Self::Q8_0 => pio_kernels::kv_q8::row_bytes(dim),
        }
    }

    /// The pool tensor's last dimension for rows of `dim` values, and its element type.
    fn tensor_row(self, dim: usize) -> (usize, DType) {
        match self {
            Self::Float(dtype) => (dim, dtype),
            Self::Q8_0 => (pio_kernels::kv_q8::row_bytes(dim), DType::U8),
        }
    }
}

/// Cached rows read from a pool tensor — `(n, heads, units)` — as values: 8-bit rows of `dim`
/// values widened to f32, float rows as they are. For readers other than the CPU kernels.
pub fn values(rows: &Tensor, dim: usize) -> Result<Tensor> {
    if rows.dtype() != DType::U8 {
        return Ok(rows.clone());
    }
    let (n, heads, units) = rows.dims3()?;
    let bytes = rows.flatten_all()?.to_vec1::<u8>()?;
    let mut out = vec![0f32; n * heads * dim];
    for (row, out) in bytes.chunks_exact(units).zip(out.chunks_exact_mut(dim)) {
        pio_kernels::kv_q8::dequantize_row(row, dim, out);
    }
    Ok(Tensor::from_vec(out, (n, heads, dim), rows.device())?)
}

/// How big a pool is and what it stores in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolShape {
    /// Token positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
    /// What the cached vectors are stored as.
    pub storage: CacheType,
}

/// A zero tensor whose pages the operating system commits only when written: candle's own
/// `zeros` fills bf16 and f16 buffers element by element, which would make the whole pool
/// resident at once.
fn zeroed(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    fn halves<T>(n: usize) -> Vec<T> {
        const { assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2) };
        // A zeroed allocation (calloc): fresh pages stay uncommitted until touched.
        let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
        // SAFETY: T is bf16 or f16, `#[repr(transparent)]` over u16 (size and alignment checked
        // above), for which all-zero bits are +0.0; the allocation moves over whole.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
    }
    let n = shape.0 * shape.1 * shape.2;
    Ok(match (dtype, device) {
        (DType::BF16, Device::Cpu) => {
            Tensor::from_vec(halves::<pio_kernels::bf16>(n), shape, device)?
        }
        (DType::F16, Device::Cpu) => {
            Tensor::from_vec(halves::<pio_kernels::f16>(n), shape, device)?
        }
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// The pool: per layer, one `(blocks · block_size, heads, dim)` tensor per cached vector.
#[derive(Debug)]
pub struct KvPool {
    shape: PoolShape,
    layers: Vec<Vec<Tensor>>,
    /// Which blocks are free, held or cached.
    pub allocator: BlockAllocator,
}

impl KvPool {
    /// A pool of `shape` for `layout` on `device`. The tensors are zero-allocated, so the
    /// operating system commits their pages only as blocks are first written.
    pub fn new(layout: TokenLayout, shape: PoolShape, device: &Device) -> Result<Self> {
        if shape.block_size == 0 || shape.blocks == 0 {
            return Err(EngineError::InvalidInput(format!(
                "a KV pool of {} blocks of {} positions holds nothing: give the model more KV cache memory (kv_cache_bytes)",
                shape.blocks, shape.block_size
            )));
        }
        if shape.storage == CacheType::Q8_0 && !device.is_cpu() {
            return Err(EngineError::InvalidInput(format!(
                "kv_cache_dtype = \"q8_0\" is read by the CPU kernels only; on {device:?} use \"bf16\" or \"f16\""
            )));
        }
        let slots = shape.blocks * shape.block_size;
        let layers = (0..layout.layers)
            .map(|_| {
                layout
                    .vectors
                    .iter()
                    .map(|v| {
                        let (units, dtype) = shape.storage.tensor_row(v.dim);
                        zeroed((slots, v.heads, units), dtype, device)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            allocator: BlockAllocator::new(shape.blocks),
            shape,
            layers,
        })
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    /// The pool's size and element type.
    pub fn shape(&self) -> PoolShape {
        self.shape
    }

    /// Layer `layer`'s tensors, in the layout's order.
    pub fn layer(&self, layer: usize) -> &[Tensor] {
        &self.layers[layer]
    }

    /// A float pool on a GPU: the slot of every new row of `batch`, back to back, on the device —
    /// computed, checked against the pool and uploaded once per step, then read by every layer.
    /// `None` for a pool on the CPU or of 8-bit rows.
    #[cfg(feature = "cuda")]
    pub fn device_slots(&self, batch: &crate::batch::Batch<'_>) -> Result<Option<Tensor>> {
        let Some(device) = self
            .layers
            .first()
            .and_then(|l| l.first())
            .map(Tensor::device)
        else {
            return Ok(None);
        };
        if !matches!(self.shape.storage, CacheType::Float(_)) || !device.is_cuda() {
            return Ok(None);
        }
        if let Some(slots) = batch.device_slots.get() {
            return Ok(Some(slots.clone()));
        }
        let slots = row_slots(batch, self.shape.block_size, self.shape.blocks)?;
        let slots = Tensor::new(slots, device)?;
        let _ = batch.device_slots.set(slots.clone());
        Ok(Some(slots))
    }

    /// Writes `rows` — every sequence of `batch`'s new rows back to back, `(rows, heads, dim)` —
    /// into vector `vector` of layer `layer`, each sequence's through its own block table.
    pub fn write_batch(
        &self,
        layer: usize,
        vector: usize,
        batch: &crate::batch::Batch<'_>,
        rows: &Tensor,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(slots) = self.device_slots(batch)? {
            let target = &self.layers[layer][vector];
            let rows = rows.to_dtype(target.dtype())?.contiguous()?;
            return crate::cuda::scatter_rows(target, &rows, &slots);
        }
        let mut row = 0;
        for seq in &batch.seqs {
            let n = seq.tokens.len();
            self.write(
                layer,
                vector,
                seq.blocks,
                seq.start,
                &rows.narrow(0, row, n)?,
            )?;
            row += n;
        }
        Ok(())
    }

    /// Writes `rows` — `(len, heads, dim)`, positions `start..start + len` of the sequence whose
    /// block table is `blocks` — into vector `vector` of layer `layer`, in place.
    pub fn write(
        &self,
        layer: usize,
        vector: usize,
        blocks: &[BlockId],
        start: usize,
        rows: &Tensor,
    ) -> Result<()> {
        let target = &self.layers[layer][vector];
        let rows = match self.shape.storage {
            CacheType::Float(dtype) => rows.to_dtype(dtype)?.contiguous()?,
            CacheType::Q8_0 => quantized(rows)?,
        };
        let len = rows.dim(0)?;
        let bs = self.shape.block_size;
        if blocks.len() * bs < start + len {
            return Err(EngineError::Internal(format!(
                "positions up to {} written through a block table of {} blocks of {bs}",
                start + len,
                blocks.len()
            )));
        }
        let mut done = 0;
        while done < len {
            let pos = start + done;
            // Positions are contiguous within a block: one copy per block touched.
            let run = (bs - pos % bs).min(len - done);
            let slot = blocks[pos / bs] as usize * bs + pos % bs;
            target.slice_set(&rows.narrow(0, done, run)?, 0, slot)?;
            done += run;
        }
        Ok(())
    }
}

/// The pool slot of every new row of `batch`, sequence after sequence: what
/// [`KvPool::write_batch`] writes through the block tables, as one list (the GPU's one launch).
pub fn row_slots(
    batch: &crate::batch::Batch<'_>,
    block_size: usize,
    pool_blocks: usize,
) -> Result<Vec<u32>> {
    let mut slots = Vec::with_capacity(batch.rows());
    for seq in &batch.seqs {
        let end = seq.start + seq.tokens.len();
        if seq.blocks.len() * block_size < end
            || seq.blocks.iter().any(|&b| b as usize >= pool_blocks)
        {
            return Err(EngineError::Internal(format!(
                "positions up to {end} written through a block table of {:?} (blocks of {block_size}, {pool_blocks} in the pool)",
                seq.blocks
            )));
        }
        slots.extend((seq.start..end).map(|pos| {
            seq.blocks[pos / block_size] * block_size as u32 + (pos % block_size) as u32
        }));
    }
    Ok(slots)
}

/// `(len, heads, dim)` values as 8-bit rows, `(len, heads, row bytes)`.
fn quantized(rows: &Tensor) -> Result<Tensor> {
    let (len, heads, dim) = rows.dims3()?;
    let values = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let units = pio_kernels::kv_q8::row_bytes(dim);
    let mut bytes = vec![0u8; len * heads * units];
    for (x, row) in values
        .chunks_exact(dim.max(1))
        .zip(bytes.chunks_exact_mut(units))
    {
        pio_kernels::kv_q8::quantize_row(x, row);
    }
    Ok(Tensor::from_vec(bytes, (len, heads, units), rows.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    #[test]
    fn a_pool_takes_memory_only_as_it_is_written() {
        for storage in [DType::BF16, DType::F16, DType::F32]
            .map(CacheType::Float)
            .into_iter()
            .chain([CacheType::Q8_0])
        {
            let before = resident_bytes();
            // 2 GiB of address space per type.
            let layout = TokenLayout::keys_values(4, 8, 128);
            let blocks = (2usize << 30) / (layout.bytes_per_token(storage) * 16);
            let shape = PoolShape {
                block_size: 16,
                blocks,
                storage,
            };
            let pool = KvPool::new(layout, shape, &Device::Cpu).unwrap();
            let grown = resident_bytes().saturating_sub(before);
            assert!(
                grown < 256 << 20,
                "{storage:?}: a fresh 2 GiB pool made {grown} bytes resident"
            );
            let zero = pool.layer(3)[1].narrow(0, 0, 16).unwrap();
            let sum = zero.to_dtype(DType::F32).unwrap().sum_all().unwrap();
            assert_eq!(sum.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn writes_land_in_the_slots_of_the_block_table() {
        let layout = TokenLayout::keys_values(1, 2, 3);
        let shape = PoolShape {
            block_size: 4,
            blocks: 4,
            storage: CacheType::Float(DType::F32),
        };
        let pool = KvPool::new(layout.clone(), shape, &Device::Cpu).unwrap();
        assert_eq!(layout.bytes_per_token(shape.storage), 2 * 2 * 3 * 4);
        // Positions 2..8 of a sequence on blocks [3, 1]: slots 14, 15 then 4..8.
        let rows = Tensor::arange(0f32, 36.0, &Device::Cpu)
            .unwrap()
            .reshape((6, 2, 3))
            .unwrap();
        pool.write(0, 1, &[3, 1], 2, &rows).unwrap();
        let values = pool.layer(0)[1].to_vec3::<f32>().unwrap();
        assert_eq!(values[14][0][0], 0.0 + 0.0 * 6.0);
        assert_eq!(values[15][1][2], 11.0);
        assert_eq!(values[4][0][0], 12.0);
        assert_eq!(values[7][1][2], 35.0);
        assert_eq!(values[0][0][0], 0.0, "other slots untouched");
        assert!(pool.write(0, 0, &[3], 2, &rows).is_err(), "table too short");
    }

    /// The GPU's one-launch write lists each new row's slot as the CPU's per-block copies place it:
    /// the pool after a batch's writes holds row i at `row_slots[i]`.
    #[test]
    fn row_slots_are_where_the_batch_writes_land() {
        use crate::batch::{Batch, Positions, SeqStep, Wanted};
        let layout = TokenLayout::keys_values(1, 1, 2);
        let shape = PoolShape {
            block_size: 4,
            blocks: 6,
            storage: CacheType::Float(DType::F32),
        };
        let pool = KvPool::new(layout, shape, &Device::Cpu).unwrap();
        let tables: [Vec<u32>; 3] = [vec![3, 1], vec![5], vec![0, 2, 4]];
        let tokens: [&[u32]; 3] = [&[1; 6], &[2], &[3; 3]];
        let starts = [2, 0, 7];
        let batch = Batch::new(
            (0..3)
                .map(|i| SeqStep {
                    tokens: tokens[i],
                    splices: &[],
                    start: starts[i],
                    positions: &Positions::Linear,
                    blocks: &tables[i],
                    logits: Wanted::Logits,
                    score: None,
                })
                .collect(),
        );
        let rows = Tensor::arange(1f32, 21.0, &Device::Cpu)
            .unwrap()
            .reshape((10, 1, 2))
            .unwrap();
        pool.write_batch(0, 0, &batch, &rows).unwrap();
        let slots = row_slots(&batch, 4, 6).unwrap();
        assert_eq!(slots, [14, 15, 4, 5, 6, 7, 20, 11, 16, 17]);
        let stored = pool.layer(0)[0]
            .index_select(&Tensor::new(slots, &Device::Cpu).unwrap(), 0)
            .unwrap();
        assert_eq!(
            stored.to_vec3::<f32>().unwrap(),
            rows.to_vec3::<f32>().unwrap()
        );
        assert!(
            row_slots(&batch, 4, 5).is_err(),
            "block 5 is outside a 5-block pool"
        );
        assert!(
            row_slots(&batch, 2, 6).is_err(),
            "tables too short for blocks of 2"
        );
    }

    /// 8-bit rows land in the block table's slots and read back within half a step of their
    /// group's scale (and the f16 scale's rounding); a token takes 34 bytes per 32 values.
    #[test]
    fn eight_bit_rows_are_written_through_the_block_table() {
        let layout = TokenLayout::keys_values(1, 2, 64);
        assert_eq!(layout.bytes_per_token(CacheType::Q8_0), 2 * 2 * (64 + 4));
        let shape = PoolShape {
            block_size: 4,
            blocks: 4,
            storage: CacheType::Q8_0,
        };
        let pool = KvPool::new(layout, shape, &Device::Cpu).unwrap();
        let rows = crate::testing::normal(0.0, 1.0, (6, 2, 64), &Device::Cpu, 1);
        pool.write(0, 0, &[3, 1], 2, &rows).unwrap();
        let stored = values(&pool.layer(0)[0], 64).unwrap();
        let slots: Vec<u32> = vec![14, 15, 4, 5, 6, 7];
        let read = stored
            .index_select(&Tensor::new(slots, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let err = (read - &rows)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let err = err.to_vec1::<f32>().unwrap();
        let amax = rows
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Half a step, plus the stored f16 scale's rounding (half an ulp, 2^-11 relative) times
        // the largest step count, 127: ggml quantizes with the exact scale and stores it rounded.
        let bound = (amax / 127.0 * 0.5 + amax * 2f32.powi(-11)) * 1.001;
        assert!(err.iter().all(|e| *e <= bound), "bound {bound}: {err:?}");
        let untouched = values(&pool.layer(0)[0].narrow(0, 0, 4).unwrap(), 64).unwrap();
        assert_eq!(
            untouched
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(KvPool::new(TokenLayout::keys_values(1, 2, 64), shape, &Device::Cpu).is_ok());
    }
}
