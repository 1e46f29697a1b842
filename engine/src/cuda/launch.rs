//! How the engine's kernels meet candle: a launch over a few tensors of one element type
//! ([`Launch`]) becomes candle's custom operation ([`Gpu`]), the kernel picked by dtype; the views
//! and launch sizes the kernels share.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// An engine kernel's launch over `N` tensors, for each element type it comes in.
pub(crate) trait Launch<const N: usize> {
    /// The operation's name in candle's errors.
    const NAME: &'static str;

    /// The output's shape for operands of these layouts.
    fn shape(&self, layouts: [&Layout; N]) -> Shape;

    /// The output, from the kernel for `T` (`suffix` its name's ending).
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        operands: [(&CudaStorage, &Layout); N],
        suffix: &str,
    ) -> Result<CudaStorage>;
}

/// A [`Launch`] as candle's custom operation: GPU only, the kernel picked by the first operand's
/// dtype.
pub(crate) struct Gpu<O>(pub(crate) O);

impl<O> Gpu<O> {
    fn forward<const N: usize>(
        &self,
        operands: [(&CudaStorage, &Layout); N],
    ) -> Result<(CudaStorage, Shape)>
    where
        O: Launch<N>,
    {
        let out = match operands[0].0.dtype() {
            DType::F32 => self.0.launch::<f32>(operands, "f32")?,
            DType::BF16 => self.0.launch::<bf16>(operands, "bf16")?,
            DType::F16 => self.0.launch::<f16>(operands, "f16")?,
            DType::U32 => self.0.launch::<u32>(operands, "u32")?,
            other => candle_core::bail!("{}: f32, bf16, f16 or u32, not {other:?}", O::NAME),
        };
        Ok((out, self.0.shape(operands.map(|(_, l)| l))))
    }
}

impl<O: Launch<1>> candle_core::CustomOp1 for Gpu<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on a GPU", O::NAME)
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.forward([(x, l)])
    }
}

impl<O: Launch<2>> candle_core::CustomOp2 for Gpu<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on a GPU", O::NAME)
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.forward([(a, la), (b, lb)])
    }
}

impl<O: Launch<3>> candle_core::CustomOp3 for Gpu<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on a GPU", O::NAME)
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        c: &CudaStorage,
        lc: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.forward([(a, la), (b, lb), (c, lc)])
    }
}

/// A grid's most blocks along y (rows, in three of the kernels): longer prompt chunks take
/// candle's operations.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// Threads for `work` items: whole warps, at least one, at most `max`.
pub(crate) fn warps_for(work: usize, max: usize) -> u32 {
    (work.div_ceil(32) * 32).clamp(32, max) as u32
}

/// The part of `slice` a contiguous `layout` covers.
pub(crate) fn view<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("the engine's GPU kernels take contiguous tensors"),
    }
}
