//! An encoder's steps on the kernels (the vision tower's): attention without a mask, GELU, and a
//! bf16 model's product inputs rounded as its bf16 products see them, so that they take the AMX
//! tiles.

use candle_core::{DType, Tensor};
use pio_kernels::{full_attention, AttentionShape, Probabilities};

use super::{supports, with_elements, with_f32, Elements};

/// `x`'s f32 values, contiguous, copied out; `None` off the CPU or in another dtype.
fn f32_values(x: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    if !supports(x) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(with_elements(&x, |e| match e {
        Elements::F32(v) => Some(v.to_vec()),
        _ => None,
    })
    .flatten())
}

/// `x` (f32) with every value rounded to bf16, still f32: a bf16 model's product input, which
/// the kernels then multiply on the AMX tiles where the CPU has them. `None` off the CPU or for
/// another dtype (the caller keeps `x`).
pub(crate) fn bf16_values(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(mut v) = f32_values(x)? else {
        return Ok(None);
    };
    pio_kernels::convert::round_to_bf16_values(&mut v);
    Tensor::from_vec(v, x.dims(), x.device()).map(Some)
}

/// GELU's tanh approximation (candle's `gelu`) on an f32 tensor, vectorized and split over the
/// pool ([`pio_kernels::exp::gelu_tanh`]); `None` off the CPU or for another dtype.
pub(crate) fn gelu_tanh(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    let Some(mut v) = f32_values(x)? else {
        return Ok(None);
    };
    v.par_chunks_mut(1 << 14)
        .for_each(pio_kernels::exp::gelu_tanh);
    Tensor::from_vec(v, x.dims(), x.device()).map(Some)
}

/// `softmax(q kᵀ · scale) v` per head, every query over every key, for f32 `q`, `k`, `v` of
/// shape `(n, heads, head_dim)` (a head's keys and values for each query head): the output
/// `(n, heads · head_dim)` in f32. With `bf16` the three are first rounded to bf16, as a bf16
/// model holds them, and so are the probabilities before they weigh the values, as PyTorch's
/// bf16 attention on the CPU rounds them: both products then take the AMX tiles. `None` off the
/// CPU or for other shapes or dtypes (the caller computes it with candle).
pub(crate) fn attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    bf16: bool,
) -> candle_core::Result<Option<Tensor>> {
    let Ok((n, heads, d)) = q.dims3() else {
        return Ok(None);
    };
    if n * heads * d == 0 || k.dims() != q.dims() || v.dims() != q.dims() {
        return Ok(None);
    }
    // The queries are copied (a bf16 model's are rounded in place); keys and values are read
    // where they lie, or rounded straight from there.
    let Some(mut qs) = f32_values(q)? else {
        return Ok(None);
    };
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let shape = AttentionShape {
        heads,
        kv_heads: heads,
        head_dim: d,
        value_dim: d,
        scale: scale as f32,
    };
    let mut out = vec![0f32; n * heads * d];
    let done = with_f32(&k, |ks| {
        with_f32(&v, |vs| {
            if bf16 {
                use pio_kernels::convert::{round_to_bf16_values, to_bf16};
                round_to_bf16_values(&mut qs);
                let (ks, vs) = (to_bf16(ks), to_bf16(vs));
                full_attention(&shape, &qs, &ks, &vs, Probabilities::Bf16, &mut out);
            } else {
                full_attention(&shape, &qs, ks, vs, Probabilities::Exact, &mut out);
            }
            true
        })
    });
    if !done {
        return Ok(None);
    }
    Tensor::from_vec(out, (n, heads * d), q.device()).map(Some)
}
