//! The engine's own GPU kernels (the `cuda` feature): decode attention that reads each sequence's
//! keys and values through its block table in place, for every sequence of a batch in one launch;
//! the KV pool's row writes; a decoder layer's small steps fused (`fused`). Each source is
//! compiled by NVRTC on first use, for the device at hand, behind `common.cuh`.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, Layout, Shape, Tensor};

use crate::batch::SeqStep;
use crate::Result;

pub mod fused;
mod kv_write;
pub use kv_write::scatter_rows;

/// What every source starts with.
const COMMON: &str = include_str!("common.cuh");
const SOURCE: &str = include_str!("paged_attention.cu");
/// Warps per block, as the source's `WARPS`.
const THREADS: u32 = 8 * 32;
/// The source's `MAX_HEAD_DIM` and `MAX_V_PER_LANE × 32`.
const MAX_HEAD_DIM: usize = 1024;
const MAX_VALUE_DIM: usize = 512;

/// The PTX of `source` behind [`COMMON`], compiled once per process into `cell` (or the
/// compiler's message).
fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    name: &str,
    source: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        let opts = nvrtc::CompileOptions {
            use_fast_math: Some(true),
            name: Some(name.into()),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{source}"), opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling {name}: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The paged attention kernel's PTX.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compiled(&PTX, "paged_attention.cu", SOURCE)
}

/// Whether [`paged_decode`] can read this pool for these queries: on a GPU, one dtype, keys and
/// values of one contiguous shape, head sizes the kernel's buffers hold.
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

/// Decode attention of `q` — `(seqs.len(), heads, head_dim)`, one query per sequence of `seqs` at
/// its position `start` — over the pool's `keys` and `values` (`(slots, kv_heads, head_dim)`,
/// the first `value_dim` of each value head read); the result is `(seqs.len(), heads,
/// value_dim)`. Check [`takes`] first; a block table that does not cover its sequence, or names a
/// block outside the pool, is an error here rather than a read out of bounds on the device. The
/// tables go to the device once into `uploaded` and are read from there by later calls with the
/// same `seqs` (the other layers of a step).
pub fn paged_decode(
    q: &Tensor,
    seqs: &[&SeqStep<'_>],
    keys: &Tensor,
    values: &Tensor,
    (block_size, value_dim): (usize, usize),
    scale: f64,
    uploaded: &OnceLock<Tensor>,
) -> Result<Tensor> {
    // Every layer of a step decodes the same sequences: the first builds, checks and uploads
    // their tables, the others read them from the device.
    let max_blocks = crate::attention::table_width(seqs);
    let words = match uploaded.get() {
        Some(words) if words.dims1()? == seqs.len() * (max_blocks + 1) => words.clone(),
        _ => {
            let pool_blocks = keys.dim(0)? / block_size;
            let (tables, _) = crate::attention::decode_tables(seqs, block_size, pool_blocks)?;
            let words = Tensor::from_vec(tables, seqs.len() * (max_blocks + 1), q.device())?;
            let _ = uploaded.set(words.clone());
            words
        }
    };
    let longest = seqs.iter().map(|s| s.start + 1).max().unwrap_or(1);
    let (_, heads, _) = q.dims3()?;
    let op = PagedDecode {
        words,
        splits: crate::attention::decode_splits(heads * seqs.len(), longest),
        max_blocks,
        block_size,
        value_dim,
        scale: scale as f32,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(keys, values, &op)?)
}

/// The launch's arguments that are not tensors.
struct PagedDecode {
    /// On the device: every sequence's block table, padded to `max_blocks`, then the positions
    /// each sequence attends over (its new one included).
    words: Tensor,
    /// Shares each (sequence, head)'s positions are split into.
    splits: usize,
    max_blocks: usize,
    block_size: usize,
    value_dim: usize,
    scale: f32,
}

impl PagedDecode {
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        [q, keys, values]: [CudaView<'_, T>; 3],
        (seqs, heads, kv_heads, head_dim): (usize, usize, usize, usize),
    ) -> candle_core::Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(kernel, "pio_paged_attention", ptx()?)?;
        let (storage, layout) = self.words.storage_and_layout();
        let candle_core::Storage::Cuda(words) = &*storage else {
            candle_core::bail!("pio-paged-decode: block tables off the GPU")
        };
        let words = view(words.as_cuda_slice::<u32>()?, layout)?;
        let tables = words.slice(..seqs * self.max_blocks);
        let lens = words.slice(seqs * self.max_blocks..);
        // SAFETY: every element is written by the kernel (one block per sequence and head), or
        // with several shares by the merge; every share writes its part of `part`.
        let out = unsafe { dev.alloc::<T>(seqs * heads * self.value_dim)? };
        let part_len = if self.splits > 1 {
            seqs * heads * self.splits * (self.value_dim + 2)
        } else {
            1
        };
        let part = unsafe { dev.alloc::<f32>(part_len)? };
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
            .arg(&part);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&self.scale);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, seqs as u32, self.splits as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; `takes` bounded the head sizes to
        // the kernel's buffers and the block tables index blocks of this pool.
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
                grid_dim: (heads as u32, seqs as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the merge's signature; `part` holds every share of every (sequence, head).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(out)
    }
}

impl candle_core::CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "pio-paged-decode"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("pio-paged-decode runs on a GPU; the CPU has its own kernels")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (seqs, heads, head_dim) = lq.shape().dims3()?;
        let (_, kv_heads, _) = lk.shape().dims3()?;
        let dims = (seqs, heads, kv_heads, head_dim);
        let dev = q.device();
        let layouts = [lq, lk, lv];
        use CudaStorageSlice::{BF16, F16, F32};
        let slice = match (&q.slice, &k.slice, &v.slice) {
            (F32(q), F32(k), F32(v)) => {
                F32(self.launch(dev, "paged_decode_f32", views([q, k, v], layouts)?, dims)?)
            }
            (BF16(q), BF16(k), BF16(v)) => {
                BF16(self.launch(dev, "paged_decode_bf16", views([q, k, v], layouts)?, dims)?)
            }
            (F16(q), F16(k), F16(v)) => {
                F16(self.launch(dev, "paged_decode_f16", views([q, k, v], layouts)?, dims)?)
            }
            _ => candle_core::bail!(
                "pio-paged-decode: queries {:?} over a pool of {:?}",
                q.dtype(),
                k.dtype()
            ),
        };
        let out = CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((out, Shape::from((seqs, heads, self.value_dim))))
    }
}

/// The parts of `slices` their contiguous `layouts` cover.
fn views<'a, T>(
    slices: [&'a CudaSlice<T>; 3],
    layouts: [&Layout; 3],
) -> candle_core::Result<[CudaView<'a, T>; 3]> {
    let ([a, b, c], [la, lb, lc]) = (slices, layouts);
    Ok([view(a, la)?, view(b, lb)?, view(c, lc)?])
}

/// The part of `slice` a contiguous `layout` covers.
fn view<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("the engine's GPU kernels take contiguous tensors"),
    }
}
