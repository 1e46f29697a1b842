//! Each row's best logits found on the GPU (`top_k.cu`), so that a top-k sampler's step copies
//! back k pairs rather than a row of the vocabulary (Qwen3's 151,936 floats: 600 KB a row).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use super::launch::{view, Gpu, Launch};
use crate::Result;

const SOURCE: &str = include_str!("top_k.cu");
/// The source's `TOP_K_THREADS` and `MAX_TOP_K`.
const THREADS: u32 = 256;
const MAX_TOP_K: usize = 64;
/// A grid's most blocks along x is 2^31 - 1; rows come in the tens.
const MAX_ROWS: usize = 1 << 20;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "top_k.cu", SOURCE)
}

/// A row's best entries, `(id, logit)`, best first.
pub type Best = Vec<(u32, f32)>;

/// Each row of `logits` (`(rows, vocab)`, f32, on a GPU) as its `k` best `(id, logit)`, best
/// first, ties to the lower id (the host's `sampling::top_k` order); `None` where the kernel does
/// not apply (off the GPU, another dtype, `k` of 0 or over its 64, or over the vocabulary).
pub fn best_entries(logits: &Tensor, k: usize) -> Result<Option<Vec<Best>>> {
    let Some(found) = on_device(logits, k)? else {
        return Ok(None);
    };
    Ok(Some(
        found
            .to_vec2::<u32>()?
            .iter()
            .map(|row| {
                let (ids, bits) = row.split_at(k);
                ids.iter()
                    .zip(bits)
                    .map(|(&id, &b)| (id, f32::from_bits(b)))
                    .collect()
            })
            .collect(),
    ))
}

/// [`best_entries`] left on the device: `(rows, 2k)` u32, each row's k ids then the k values'
/// bits; `None` where the kernel does not apply.
pub fn on_device(logits: &Tensor, k: usize) -> Result<Option<Tensor>> {
    let Ok((rows, vocab)) = logits.dims2() else {
        return Ok(None);
    };
    if !logits.device().is_cuda()
        || logits.dtype() != DType::F32
        || !(1..=MAX_TOP_K.min(vocab)).contains(&k)
        || rows > MAX_ROWS
        || vocab > u32::MAX as usize
    {
        return Ok(None);
    }
    Ok(Some(
        logits.contiguous()?.apply_op1_no_bwd(&Gpu(TopK { k }))?,
    ))
}

/// The launch's `k`.
struct TopK {
    k: usize,
}

impl Launch<1> for TopK {
    const NAME: &'static str = "pio-top-k";

    fn shape(&self, [logits]: [&Layout; 1]) -> Shape {
        Shape::from((logits.dims()[0], 2 * self.k))
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [(logits, layout)]: [(&CudaStorage, &Layout); 1],
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = logits.device();
        let (rows, vocab) = layout.shape().dims2()?;
        let logits = view(T::as_cuda_slice(logits)?, layout)?;
        // SAFETY: every element is written: one block per row, k ids and k logits each.
        let out = unsafe { dev.alloc::<u32>(rows * 2 * self.k)? };
        if rows > 0 {
            let func =
                dev.get_or_load_custom_func(&format!("top_k_{suffix}"), "pio_top_k", ptx()?)?;
            let (vocab, k) = (vocab as i32, self.k as i32);
            let mut b = func.builder();
            b.arg(&out).arg(&logits).arg(&vocab).arg(&k);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature; `best_entries` bounded `k` to
            // the kernel's lists and the vocabulary (so every round finds an entry).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(<u32 as CudaDType>::wrap_cuda_slice(out, dev.clone()))
    }
}
