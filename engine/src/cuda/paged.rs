//! Attention over the paged KV pool on the GPU (`paged_attention.cu`): every query row of a step
//! in one launch — a decoding sequence's one row, a prompt chunk's many — each reading its
//! sequence's keys and values through the block table in place, with no gather copy.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor};

use super::launch::{view, Gpu, Launch, MAX_GRID_Y};
use crate::batch::SeqStep;
use crate::{EngineError, Result};

const SOURCE: &str = include_str!("paged_attention.cu");
/// Warps per block, as the source's `WARPS`.
const THREADS: u32 = 8 * 32;
/// The source's `MAX_HEAD_DIM` and `MAX_V_PER_LANE × 32`.
const MAX_HEAD_DIM: usize = 1024;
const MAX_VALUE_DIM: usize = 512;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "paged_attention.cu", SOURCE)
}

/// Whether [`paged_attention`] can read this pool for these queries: on a GPU, one dtype, keys
/// and values of one contiguous shape, head sizes the kernel's buffers hold.
pub fn takes(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    (block_size, value_dim): (usize, usize),
) -> bool {
    let fits = match (q.dims3(), keys.dims3()) {
        (Ok((_, heads, dim)), Ok((_, kv_heads, key_dim))) => {
            dim == key_dim
                && kv_heads > 0
                && heads % kv_heads == 0
                && dim <= MAX_HEAD_DIM
                && (1..=dim.min(MAX_VALUE_DIM)).contains(&value_dim)
        }
        _ => false,
    };
    fits && block_size > 0
        && q.device().is_cuda()
        && q.dtype() == keys.dtype()
        && values.dtype() == keys.dtype()
        && values.dims() == keys.dims()
        && keys.is_contiguous()
        && values.is_contiguous()
}

/// Attention of `q` — `(rows, heads, head_dim)`, the new rows of `seqs` back to back, a
/// sequence's rows at its positions `start..` — over the pool's `keys` and `values`
/// (`(slots, kv_heads, head_dim)`, the first `value_dim` of each value head read), each row over
/// its own position and those before it; the result is `(rows, heads, value_dim)`. Check
/// [`takes`] first; a block table that does not cover its sequence, or names a block outside the
/// pool, is an error here rather than a read out of bounds on the device. The tables go to the
/// device once into `uploaded` and are read from there by later calls with the same `seqs` (the
/// other layers of a step).
pub fn paged_attention(
    q: &Tensor,
    seqs: &[&SeqStep<'_>],
    keys: &Tensor,
    values: &Tensor,
    (block_size, value_dim): (usize, usize),
    scale: f64,
    uploaded: &OnceLock<((usize, usize), Tensor)>,
) -> Result<Tensor> {
    let (rows, heads, _) = q.dims3()?;
    if rows != seqs.iter().map(|s| s.tokens.len()).sum::<usize>() || rows > MAX_GRID_Y {
        return Err(EngineError::Internal(format!(
            "paged attention over {rows} query rows for {} sequences (at most {MAX_GRID_Y} rows)",
            seqs.len()
        )));
    }
    // Every layer of a step attends for the same rows: the first builds, checks and uploads
    // their tables, the others read them from the device.
    let max_blocks = crate::attention::table_width(seqs);
    // Keyed by the sequences and rows taken: a call taking other rows of the step (not the
    // engine's, which takes the same at every layer) builds its own.
    let key = (seqs.len(), rows);
    let words = match uploaded.get() {
        Some((taken, words)) if *taken == key => words.clone(),
        _ => {
            let pool_blocks = keys.dim(0)? / block_size;
            let tables = crate::attention::row_tables(seqs, block_size, pool_blocks)?;
            let len = tables.len();
            let words = Tensor::from_vec(tables, len, q.device())?;
            let _ = uploaded.set((key, words.clone()));
            words
        }
    };
    let longest = seqs
        .iter()
        .map(|s| s.start + s.tokens.len())
        .max()
        .unwrap_or(1);
    let op = PagedAttention {
        words,
        seqs: seqs.len(),
        splits: crate::attention::decode_splits(heads * rows, longest),
        max_blocks,
        block_size,
        value_dim,
        scale: scale as f32,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(keys, values, &Gpu(op))?)
}

/// The launch's arguments that are not the queries, keys and values.
struct PagedAttention {
    /// On the device: every sequence's block table padded to `max_blocks`, then each row's
    /// position count (its own included), then each row's sequence.
    words: Tensor,
    seqs: usize,
    /// Shares each (row, head)'s positions are split into.
    splits: usize,
    max_blocks: usize,
    block_size: usize,
    value_dim: usize,
    scale: f32,
}

impl Launch<3> for PagedAttention {
    const NAME: &'static str = "pio-paged-attention";

    fn shape(&self, [q, ..]: [&Layout; 3]) -> Shape {
        let dims = q.dims();
        Shape::from((dims[0], dims[1], self.value_dim))
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [q, keys, values]: [(&CudaStorage, &Layout); 3],
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = q.0.device();
        let (rows, heads, head_dim) = q.1.shape().dims3()?;
        let (_, kv_heads, _) = keys.1.shape().dims3()?;
        let q = view(T::as_cuda_slice(q.0)?, q.1)?;
        let keys = view(T::as_cuda_slice(keys.0)?, keys.1)?;
        let values = view(T::as_cuda_slice(values.0)?, values.1)?;
        let (storage, layout) = self.words.storage_and_layout();
        let Storage::Cuda(words) = &*storage else {
            candle_core::bail!("pio-paged-attention: block tables off the GPU")
        };
        let words = view(words.as_cuda_slice::<u32>()?, layout)?;
        let tables = words.slice(..self.seqs * self.max_blocks);
        let lens = words.slice(self.seqs * self.max_blocks..self.seqs * self.max_blocks + rows);
        let row_seqs = words.slice(self.seqs * self.max_blocks + rows..);
        // SAFETY: every element is written by the kernel (one block per row and head), or with
        // several shares by the merge; every share writes its part of `part`.
        let out = unsafe { dev.alloc::<T>(rows * heads * self.value_dim)? };
        let part_len = if self.splits > 1 {
            rows * heads * self.splits * (self.value_dim + 2)
        } else {
            1
        };
        let part = unsafe { dev.alloc::<f32>(part_len)? };
        let kernel = format!("paged_attention_{suffix}");
        let func = dev.get_or_load_custom_func(&kernel, "pio_paged_attention", ptx()?)?;
        let ints = [
            heads,
            kv_heads,
            head_dim,
            self.value_dim,
            self.block_size,
            self.max_blocks,
        ]
        .map(|v| v as i32);
        let mut b = func.builder();
        b.arg(&out)
            .arg(&q)
            .arg(&keys)
            .arg(&values)
            .arg(&tables)
            .arg(&lens)
            .arg(&row_seqs)
            .arg(&part);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&self.scale);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, rows as u32, self.splits as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; `takes` bounded the head sizes to
        // the kernel's buffers, and the block tables index blocks of this pool and cover each
        // row's positions (`row_tables` checked both).
        unsafe { b.launch(cfg) }.w()?;
        if self.splits > 1 {
            let merge = format!("{kernel}_merge");
            let func = dev.get_or_load_custom_func(&merge, "pio_paged_attention", ptx()?)?;
            let ints = [heads, self.value_dim, self.splits].map(|v| v as i32);
            let mut b = func.builder();
            b.arg(&out).arg(&part);
            for v in &ints {
                b.arg(v);
            }
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, rows as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the merge's signature; `part` holds every share of every (row, head).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}
