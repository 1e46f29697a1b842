//! A projection of a decode step's few rows on the GPU (`gemv.cu`): `x · Wᵀ` for at most eight
//! rows of `x`, one launch reading the weights once, in place of cuBLAS's general product.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::launch::{view, Gpu, Launch};

const SOURCE: &str = include_str!("gemv.cu");
/// The source's `GEMV_WARPS` and `GEMV_ROWS`.
const WARPS: usize = 8;
const MAX_ROWS: usize = 8;

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "gemv.cu", SOURCE)
}

/// Few-row projections on this kernel rather than cuBLAS: on unless `PIO_GPU_GEMV=cublas` (and
/// only while [`super::KERNELS`] is on).
pub static GEMV: super::Switch = super::Switch::new("PIO_GPU_GEMV", "cublas");

/// Whether few-row projections take this kernel.
pub fn enabled() -> bool {
    GEMV.on() && super::KERNELS.on()
}

/// `x · wᵀ` — `x` `(…, k)`, `w` `(n, k)`, one float dtype on a GPU — when `x` has at most eight
/// rows; `None` where the kernel does not take them (more rows, `k` not a multiple of 8, a
/// tensor not contiguous or not 16-byte aligned, or the kernel switched off).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Ok((n, k)) = w.dims2() else {
        return Ok(None);
    };
    let rows = x.elem_count() / k.max(1);
    let aligned = |t: &Tensor| {
        let start = t.layout().start_offset() * t.dtype().size_in_bytes();
        t.is_contiguous() && start.is_multiple_of(16)
    };
    if !x.device().is_cuda()
        || !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        || w.dtype() != x.dtype()
        || x.dims().last() != Some(&k)
        || !(1..=MAX_ROWS).contains(&rows)
        || !k.is_multiple_of(8)
        || n == 0
        || !aligned(x)
        || !aligned(w)
        || !enabled()
    {
        return Ok(None);
    }
    Ok(Some(x.apply_op2_no_bwd(w, &Gpu(Gemv))?))
}

/// The launch (its shapes come from its operands).
struct Gemv;

impl Launch<2> for Gemv {
    const NAME: &'static str = "pio-gemv";

    fn shape(&self, [x, w]: [&Layout; 2]) -> Shape {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = w.dims()[0];
        }
        Shape::from(dims)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        [(x, xl), (w, wl)]: [(&CudaStorage, &Layout); 2],
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let (n, k) = wl.shape().dims2()?;
        let rows = xl.shape().elem_count() / k;
        let x = view(T::as_cuda_slice(x)?, xl)?;
        let w = view(T::as_cuda_slice(w)?, wl)?;
        // SAFETY: every (row, column) is written: one warp per column, every row.
        let y = unsafe { dev.alloc::<T>(rows * n)? };
        let func = dev.get_or_load_custom_func(&format!("gemv_{suffix}"), "pio_gemv", ptx()?)?;
        let ints = [rows, n, k].map(|v| v as i32);
        let mut b = func.builder();
        b.arg(&y).arg(&x).arg(&w);
        for v in &ints {
            b.arg(v);
        }
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(WARPS) as u32, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's signature; `linear` checked the shapes, `rows` ≤ its 8, `k` a
        // multiple of 8 and both operands 16-byte aligned (allocations are 256-byte aligned).
        unsafe { b.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    }
}
