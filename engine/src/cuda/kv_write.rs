//! Writes a step's new rows into the paged KV pool on the GPU in one launch per layer and vector
//! (`kv_write.cu`), where a copy per sequence and block would cost a driver call each.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, Layout, Storage, Tensor};

use crate::Result;

const SOURCE: &str = include_str!("kv_write.cu");

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    super::compiled(&PTX, "kv_write.cu", SOURCE)
}

/// Writes `rows` — `(n, …)`, contiguous, the pool's dtype — into `pool` — `(slots, …)` with the
/// same row shape — at `slots` (`n` u32 slot numbers on the pool's device), in place.
pub fn scatter_rows(pool: &Tensor, rows: &Tensor, slots: &Tensor) -> Result<()> {
    pool.inplace_op2(
        rows,
        &ScatterRows {
            slots: slots.clone(),
        },
    )?;
    Ok(())
}

/// The launch's slot numbers.
struct ScatterRows {
    slots: Tensor,
}

impl ScatterRows {
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        pool: &mut CudaSlice<T>,
        (pool_layout, rows, rows_layout): (&Layout, &CudaSlice<T>, &Layout),
    ) -> candle_core::Result<()> {
        let n = rows_layout.dims().first().copied().unwrap_or(0);
        let row_len = rows_layout.shape().elem_count() / n.max(1);
        let pool_rows = pool_layout.dims().first().copied().unwrap_or(0);
        if pool_layout.shape().elem_count() != pool_rows * row_len || self.slots.dims1()? != n {
            candle_core::bail!(
                "pio-scatter-rows: rows {:?} into a pool {:?} at {} slots",
                rows_layout.dims(),
                pool_layout.dims(),
                self.slots.elem_count()
            )
        }
        if n == 0 {
            return Ok(());
        }
        let Some((p0, p1)) = pool_layout.contiguous_offsets() else {
            candle_core::bail!("pio-scatter-rows takes a contiguous pool")
        };
        let (storage, slots_layout) = self.slots.storage_and_layout();
        let Storage::Cuda(slots) = &*storage else {
            candle_core::bail!("pio-scatter-rows: slot numbers off the GPU")
        };
        let slots = super::view(slots.as_cuda_slice::<u32>()?, slots_layout)?;
        let rows = super::view(rows, rows_layout)?;
        let func = dev.get_or_load_custom_func(kernel, "pio_kv_write", ptx()?)?;
        let mut pool = pool.slice_mut(p0..p1);
        let row_len = row_len as i32;
        let mut b = func.builder();
        b.arg(&mut pool).arg(&rows).arg(&slots).arg(&row_len);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256.min(row_len as u32).max(32), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the engine's slot numbers come from
        // block tables of this pool (`KvPool::write_batch` checks them against its size).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl candle_core::InplaceOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "pio-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("pio-scatter-rows runs on a GPU; the CPU pool writes its rows itself")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pool_layout: &Layout,
        rows: &CudaStorage,
        rows_layout: &Layout,
    ) -> candle_core::Result<()> {
        use CudaStorageSlice::{BF16, F16, F32};
        let dev = pool.device.clone();
        let dtypes = (rows.dtype(), pool.dtype());
        match (&mut pool.slice, &rows.slice) {
            (BF16(p), BF16(r)) => {
                self.launch(&dev, "scatter_rows_u16", p, (pool_layout, r, rows_layout))
            }
            (F16(p), F16(r)) => {
                self.launch(&dev, "scatter_rows_u16", p, (pool_layout, r, rows_layout))
            }
            (F32(p), F32(r)) => {
                self.launch(&dev, "scatter_rows_u32", p, (pool_layout, r, rows_layout))
            }
            _ => candle_core::bail!(
                "pio-scatter-rows: rows of {:?} into a pool of {:?}",
                dtypes.0,
                dtypes.1
            ),
        }
    }
}
