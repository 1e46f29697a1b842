//! The bridge from candle tensors on the CPU to `pio-kernels`, for the hot path: linear layers
//! and attention read tensors' memory in place and write fresh tensors, so models keep using
//! candle everywhere else and on other devices.

use candle_core::{CpuStorage, DType, Storage, Tensor};

mod elementwise;
pub(crate) mod encoder;
mod paged;
mod products;
mod shared_input;
#[cfg(test)]
mod tests;

pub(crate) use elementwise::{add, rms_norm, rope, swiglu};
pub(crate) use paged::attention;
pub(crate) use products::{
    biased_linear, linear, linear_stacked, packed, packed_bytes, quantized_linear, tiled_linear,
};
pub(crate) use shared_input::{tiled_linears, Norm};

use crate::batch::Batch;
use crate::generate::CausalLm;
use crate::kv_pool::KvPool;
use pio_kernels::{bf16, f16};

/// One forward pass of `model` over `batch`. On the CPU it runs on a thread of the current
/// rayon pool with the pool kept awake through it ([`pio_kernels::keep_awake`]): called from a
/// thread outside the pool, every product would also hand its work over and sleep until done.
pub(crate) fn step<M: CausalLm + ?Sized>(
    model: &M,
    batch: &Batch<'_>,
    pool: &mut KvPool,
) -> crate::Result<Vec<crate::batch::Output>> {
    if model.device().is_cpu() {
        pio_kernels::keep_awake(|| model.forward(batch, pool))
    } else {
        model.forward(batch, pool)
    }
}

/// A contiguous tensor's elements, as stored.
enum Elements<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Calls `f` on the elements of `t` when it is a contiguous CPU tensor of a float dtype the
/// kernels take; `None` otherwise (the caller falls back to candle).
fn with_elements<R>(t: &Tensor, f: impl FnOnce(Elements<'_>) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    Some(f(elements(&storage, layout)?))
}

/// The elements `layout` places in `storage`, when they are contiguous on the CPU in a float
/// dtype the kernels take.
fn elements<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Option<Elements<'a>> {
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = storage else {
        return None;
    };
    Some(match cpu {
        CpuStorage::F32(v) => Elements::F32(&v[start..end]),
        CpuStorage::BF16(v) => Elements::Bf16(&v[start..end]),
        CpuStorage::F16(v) => Elements::F16(&v[start..end]),
        _ => return None,
    })
}

/// Several tensors' elements, as stored, all of one dtype.
enum Stack<'a> {
    F32(Vec<&'a [f32]>),
    Bf16(Vec<&'a [bf16]>),
    F16(Vec<&'a [f16]>),
}

/// Calls `f` on the elements of every tensor of `ts` when each is a contiguous CPU tensor and
/// all are of one float dtype the kernels take; `None` otherwise.
fn with_stack<R>(ts: &[&Tensor], f: impl FnOnce(Stack<'_>) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut stack = match ts.first()?.dtype() {
        DType::F32 => Stack::F32(Vec::new()),
        DType::BF16 => Stack::Bf16(Vec::new()),
        DType::F16 => Stack::F16(Vec::new()),
        _ => return None,
    };
    for (storage, layout) in &guards {
        match (&mut stack, elements(storage, layout)?) {
            (Stack::F32(v), Elements::F32(e)) => v.push(e),
            (Stack::Bf16(v), Elements::Bf16(e)) => v.push(e),
            (Stack::F16(v), Elements::F16(e)) => v.push(e),
            _ => return None,
        }
    }
    Some(f(stack))
}

/// Whether the kernels can take this tensor (CPU, float dtype the kernels know).
pub(crate) fn supports(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `x` as contiguous f32 (activations are small next to the weights they meet), widened over
/// the pool ([`pio_kernels::convert`]).
fn activations(x: &Tensor) -> candle_core::Result<Tensor> {
    let widened = with_elements(x, |xs| match xs {
        Elements::F32(_) => None,
        Elements::Bf16(xs) => Some(pio_kernels::convert::widened(xs)),
        Elements::F16(xs) => Some(pio_kernels::convert::widened(xs)),
    });
    match widened.flatten() {
        Some(v) => Tensor::from_vec(v, x.dims(), x.device()),
        None => x.to_dtype(DType::F32)?.contiguous(),
    }
}

/// f32 results `out` as a tensor of shape `dims` in `dtype` on the CPU, rounded over the pool
/// ([`pio_kernels::convert`]) for bf16 and f16.
fn in_dtype(out: Vec<f32>, dims: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
    let cpu = &candle_core::Device::Cpu;
    match dtype {
        DType::BF16 => Tensor::from_vec(pio_kernels::convert::to_bf16(&out), dims, cpu),
        DType::F16 => Tensor::from_vec(pio_kernels::convert::to_f16(&out), dims, cpu),
        _ => Tensor::from_vec(out, dims, cpu)?.to_dtype(dtype),
    }
}

/// The product of `x` `(.., k)` with `n` outputs, computed into `out`, as a tensor like `x`:
/// shape `(.., n)`, `x`'s dtype (on the CPU, where the kernels run).
fn projected(out: Vec<f32>, x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    in_dtype(out, &dims, x.dtype())
}

/// Calls `f` on the f32 elements of `xf` (from [`activations`]); `false` when it cannot.
fn with_f32(xf: &Tensor, f: impl FnOnce(&[f32]) -> bool) -> bool {
    with_elements(xf, |xs| match xs {
        Elements::F32(xs) => f(xs),
        _ => false,
    })
    .unwrap_or(false)
}
