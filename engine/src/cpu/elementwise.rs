//! Element-wise steps of a layer on the kernels: the residual add in half precision, rotary
//! positions, SwiGLU; each split over the threads where candle's is not.

use candle_core::{DType, Tensor};
use pio_kernels::{bf16, f16};

use super::{supports, with_elements, Elements};

/// `a + b` for bf16 or f16 tensors of one shape on the CPU: each sum computed in f32 and rounded
/// once, as candle's element-wise add does, but in one vectorizable pass split over the threads
/// (candle's half-precision add took a tenth of a bf16 prefill). `None` for other dtypes or
/// devices (candle's add then runs).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !supports(a) || a.dtype() == DType::F32 || a.dtype() != b.dtype() || a.dims() != b.dims() {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    fn sum<T: Copy + Send + Sync>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
        let mut out = x.to_vec();
        out.par_chunks_mut(1 << 14)
            .zip(y.par_chunks(1 << 14))
            .for_each(|(o, y)| o.iter_mut().zip(y).for_each(|(o, &y)| *o = f(*o, y)));
        out
    }
    let summed = with_elements(&a, |x| {
        with_elements(&b, |y| match (x, y) {
            (Elements::Bf16(x), Elements::Bf16(y)) => Some(Tensor::from_vec(
                sum(x, y, |a, b| bf16::from_f32(a.to_f32() + b.to_f32())),
                a.dims(),
                a.device(),
            )),
            (Elements::F16(x), Elements::F16(y)) => Some(Tensor::from_vec(
                sum(x, y, |a, b| f16::from_f32(a.to_f32() + b.to_f32())),
                a.dims(),
                a.device(),
            )),
            _ => None,
        })
    });
    summed.flatten().flatten().transpose()
}

/// Rotary positions on `x` `(batch, seq, heads, head_dim)` with `cos`/`sin` `(seq, head_dim / 2)`
/// (the first and second halves of each head rotated together), as candle's `rope_thd` computes
/// them — each product and the sum rounded to the dtype, as transformers' ops in that dtype do —
/// but split over positions (candle splits over the batch, which is one sequence here) and
/// vectorizable. `None` off the CPU or in other layouts (candle's then runs).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    let Ok((_, seq, heads, dim)) = x.dims4() else {
        return Ok(None);
    };
    let half = dim / 2;
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.dims() == [seq, half];
    if !supports(x) || heads * dim == 0 || dim % 2 != 0 || !same(cos) || !same(sin) {
        return Ok(None);
    }
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    fn rotate<T: Copy + Send + Sync>(
        x: &[T],
        (cos, sin): (&[T], &[T]),
        (seq, heads, dim): (usize, usize, usize),
        to: impl Fn(T) -> f32 + Sync,
        from: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let half = dim / 2;
        let mut out = x.to_vec();
        out.par_chunks_mut(heads * dim)
            .zip(x.par_chunks(heads * dim))
            .enumerate()
            .for_each(|(row, (out, x))| {
                let at = (row % seq) * half;
                let (cos, sin) = (&cos[at..at + half], &sin[at..at + half]);
                let round = |v: f32| to(from(v));
                for (out, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                    let (x1, x2) = x.split_at(half);
                    let (o1, o2) = out.split_at_mut(half);
                    for j in 0..half {
                        let (a, b, c, s) = (to(x1[j]), to(x2[j]), to(cos[j]), to(sin[j]));
                        o1[j] = from(round(a * c) - round(b * s));
                        o2[j] = from(round(a * s) + round(b * c));
                    }
                }
            });
        out
    }
    let shape = (seq, heads, dim);
    let (dims, device) = (x.dims(), x.device());
    let rotated = with_elements(&x, |xs| {
        with_elements(&cos, |cs| {
            with_elements(&sin, |ss| match (xs, cs, ss) {
                (Elements::F32(x), Elements::F32(c), Elements::F32(s)) => {
                    let out = rotate(x, (c, s), shape, |v| v, |v| v);
                    Some(Tensor::from_vec(out, dims, device))
                }
                (Elements::Bf16(x), Elements::Bf16(c), Elements::Bf16(s)) => {
                    let out = rotate(x, (c, s), shape, bf16::to_f32, bf16::from_f32);
                    Some(Tensor::from_vec(out, dims, device))
                }
                (Elements::F16(x), Elements::F16(c), Elements::F16(s)) => {
                    let out = rotate(x, (c, s), shape, f16::to_f32, f16::from_f32);
                    Some(Tensor::from_vec(out, dims, device))
                }
                _ => None,
            })
        })
    });
    rotated.flatten().flatten().flatten().transpose()
}

/// `silu(gate) · up` for `y` of shape `(.., 2·width)` holding `[gate | up]` in each row, in one
/// pass, in `y`'s dtype (computed in f32, rounded once); `None` off the CPU.
pub(crate) fn swiglu(y: &Tensor, width: usize) -> candle_core::Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !supports(y) || width == 0 || y.dims().last() != Some(&(2 * width)) {
        return Ok(None);
    }
    let y = y.contiguous()?;
    let mut out = vec![0f32; y.elem_count() / 2];
    fn run<T: Copy + Sync>(ys: &[T], width: usize, out: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
        out.par_chunks_mut(width)
            .zip(ys.par_chunks(2 * width))
            .for_each(|(o, y)| {
                let (gate, up) = y.split_at(width);
                for (o, &g) in o.iter_mut().zip(gate) {
                    *o = f(g);
                }
                pio_kernels::exp::silu(o);
                for (o, &u) in o.iter_mut().zip(up) {
                    *o *= f(u);
                }
            });
    }
    let done = with_elements(&y, |e| match e {
        Elements::F32(v) => run(v, width, &mut out, |x| x),
        Elements::Bf16(v) => run(v, width, &mut out, bf16::to_f32),
        Elements::F16(v) => run(v, width, &mut out, f16::to_f32),
    });
    if done.is_none() {
        return Ok(None);
    }
    let mut dims = y.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    Ok(Some(super::in_dtype(out, &dims, y.dtype())?))
}

/// RMSNorm of `x` over its last dimension with `weight` (widened to f32) in `x`'s dtype, as
/// candle's computes it, bit for bit ([`pio_kernels::norm`]) when the weight is stored in `x`'s
/// dtype (the caller's to check: the widened values do not say); `None` off the CPU or for a
/// dtype, width or layout the kernel does not take.
pub(crate) fn rms_norm(
    x: &Tensor,
    weight: &[f32],
    eps: f32,
) -> candle_core::Result<Option<Tensor>> {
    use pio_kernels::norm::{rms_norm, Rounding};
    let fits = !weight.is_empty() && x.dims().last() == Some(&weight.len());
    if !supports(x) || !x.is_contiguous() || !fits {
        return Ok(None);
    }
    fn run<T: Rounding>(x: &[T], weight: &[f32], eps: f32) -> Vec<T> {
        let mut out = vec![T::store(0.0); x.len()];
        rms_norm(x, weight, eps, &mut out);
        out
    }
    let cpu = &candle_core::Device::Cpu;
    with_elements(x, |e| match e {
        Elements::F32(v) => Tensor::from_vec(run(v, weight, eps), x.dims(), cpu),
        Elements::Bf16(v) => Tensor::from_vec(run(v, weight, eps), x.dims(), cpu),
        Elements::F16(v) => Tensor::from_vec(run(v, weight, eps), x.dims(), cpu),
    })
    .transpose()
}
