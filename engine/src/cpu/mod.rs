//! The bridge from candle tensors on the CPU to `pio-kernels`, for the hot path: linear layers
//! and attention read tensors' memory in place and write fresh tensors, so models keep using
//! candle everywhere else and on other devices.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Storage, Tensor};

mod shared_input;
pub(crate) use shared_input::{tiled_linears, Norm};

use crate::batch::Batch;
use crate::generate::CausalLm;
use crate::kv_pool::KvPool;
use pio_kernels::{
    bf16, dequantize, f16, matmul, matmul_rows, packed_matmul, paged_attention, quantized_matmul,
    AttentionShape, CachedRow, Format, PackedMatrix, PagedKv, QuantMatrix, WeightRows,
};

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

/// The kernels' block format for a candle quantized dtype; `None` for formats they lack.
pub(crate) fn kernel_format(dtype: GgmlDType) -> Option<Format> {
    Some(match dtype {
        GgmlDType::Q8_0 => Format::Q8_0,
        GgmlDType::Q4_0 => Format::Q4_0,
        GgmlDType::Q4K => Format::Q4K,
        GgmlDType::Q6K => Format::Q6K,
        _ => return None,
    })
}

/// From how many activation rows on decoding each block once into f32 and running the packed
/// GEMM beats the integer dot products (which read each weight row once for all rows but do
/// more work per value). Measured with `cargo bench -p pio-kernels --bench quant` (AVX-512
/// machine, 2 threads, 1024 → 3072): see docs/decisions.md.
pub(crate) fn quantized_gemm_rows(format: Format) -> usize {
    // Every format is tiled on the CPU (see `tiled_linear`); these hold for blocks a caller
    // keeps as they are.
    match format {
        Format::Q4_0 => 24,
        Format::Q8_0 | Format::Q4K => 32,
        Format::Q6K => 128,
    }
}

/// `w` repacked into the kernels' 16-row tiles when it is a CPU tensor in a format they take;
/// `None` otherwise (it keeps its blocks).
pub(crate) fn packed(w: &QTensor) -> candle_core::Result<Option<PackedMatrix>> {
    let Some(format) = kernel_format(w.dtype()) else {
        return Ok(None);
    };
    if !w.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    tiles(format, &w.data()?, (n, k)).map(Some)
}

/// `n × k` weights of `format` from their blocks' bytes, in the kernels' tiles.
fn tiles(
    format: Format,
    bytes: &[u8],
    (n, k): (usize, usize),
) -> candle_core::Result<PackedMatrix> {
    let matrix = QuantMatrix::new(format, bytes, n, k).map_err(candle_core::Error::wrap)?;
    Ok(PackedMatrix::pack(&matrix))
}

/// `n × k` weights of `dtype` as `blocks` holds them (a CPU tensor of their bytes), repacked
/// into the kernels' tiles straight from those bytes; `None` where the kernels do not take
/// them (the caller makes a `QTensor`).
pub(crate) fn packed_bytes(
    blocks: &Tensor,
    dtype: GgmlDType,
    (n, k): (usize, usize),
) -> candle_core::Result<Option<PackedMatrix>> {
    let Some(format) = kernel_format(dtype) else {
        return Ok(None);
    };
    let (storage, layout) = blocks.storage_and_layout();
    let (Storage::Cpu(CpuStorage::U8(bytes)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    tiles(format, &bytes[start..end], (n, k)).map(Some)
}

/// `x Wᵀ` for `w` in tiles: integer products for every row count (the tiles keep 16 rows'
/// values in registers across four activation rows, which beats decoding to f32 for the GEMM
/// even at 512 rows: see docs/decisions.md).
pub(crate) fn tiled_linear(x: &Tensor, w: &PackedMatrix) -> candle_core::Result<Tensor> {
    let (n, k) = (w.rows(), w.cols());
    if x.dims().last() != Some(&k) {
        candle_core::bail!(
            "linear layer of {k} inputs and {n} outputs applied to activations of shape {:?}",
            x.dims()
        );
    }
    let xf = activations(x)?;
    let m = xf.elem_count() / k.max(1);
    let mut out = vec![0f32; m * n];
    let done = with_f32(&xf, |xs| {
        packed_matmul(xs, w, m, &mut out);
        true
    });
    if !done {
        candle_core::bail!("the tiled weights multiply f32 activations on the CPU only");
    }
    projected(out, x, n)
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
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    Some(f(match cpu {
        CpuStorage::F32(v) => Elements::F32(&v[start..end]),
        CpuStorage::BF16(v) => Elements::Bf16(&v[start..end]),
        CpuStorage::F16(v) => Elements::F16(&v[start..end]),
        _ => return None,
    }))
}

/// Whether the kernels can take this tensor (CPU, float dtype the kernels know).
pub(crate) fn supports(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `x` as contiguous f32 (activations are small next to the weights they meet).
fn activations(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?.contiguous()
}

/// The product of `x` `(.., k)` with `n` outputs, computed into `out`, as a tensor like `x`:
/// shape `(.., n)`, `x`'s dtype and device.
fn projected(out: Vec<f32>, x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())
}

/// Calls `f` on the f32 elements of `xf` (from [`activations`]); `false` when it cannot.
fn with_f32(xf: &Tensor, f: impl FnOnce(&[f32]) -> bool) -> bool {
    with_elements(xf, |xs| match xs {
        Elements::F32(xs) => f(xs),
        _ => false,
    })
    .unwrap_or(false)
}

/// `x Wᵀ` for `x` of shape `(.., k)` and `w` of shape `(n, k)`, in `x`'s dtype; `None` when the
/// tensors are not on the CPU or not in a dtype the kernels take.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !supports(x) || !supports(w) || !w.is_contiguous() {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.dims().last() != Some(&k) {
        // candle's product reports the mismatch with both shapes.
        return Ok(None);
    }
    let xf = activations(x)?;
    let m = xf.elem_count() / k.max(1);
    let mut out = vec![0f32; m * n];
    let done = with_f32(&xf, |xs| {
        with_elements(w, |ws| match ws {
            Elements::F32(ws) => matmul(xs, ws, m, k, n, &mut out),
            Elements::Bf16(ws) => matmul(xs, ws, m, k, n, &mut out),
            Elements::F16(ws) => matmul(xs, ws, m, k, n, &mut out),
        })
        .is_some()
    });
    if !done {
        return Ok(None);
    }
    projected(out, x, n).map(Some)
}

/// Rows of blocks, decoded by the kernels.
struct Blocks<'a>(QuantMatrix<'a>, &'a [u8]);

impl WeightRows for Blocks<'_> {
    fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]) {
        let row = self.0.format().row_bytes(k).unwrap_or(0);
        dequantize(
            self.0.format(),
            &self.1[rows.start * row..rows.end * row],
            out,
        );
    }
}

/// `x Wᵀ` for block-quantized `w` (`n × k`) on the engine's kernels: integer dot products on the
/// blocks as stored for a few rows (decode), the packed GEMM over decoded blocks from
/// [`quantized_gemm_rows`] rows on (prefill). `None` off the CPU or in formats the kernels lack
/// (the caller then uses candle's `QMatMul`).
pub(crate) fn quantized_linear(x: &Tensor, w: &QTensor) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = w.shape().dims2()?;
    let Some(format) = kernel_format(w.dtype()) else {
        return Ok(None);
    };
    if !supports(x) || x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let bytes = w.data()?;
    let matrix = QuantMatrix::new(format, &bytes, n, k).map_err(candle_core::Error::wrap)?;
    let xf = activations(x)?;
    let m = xf.elem_count() / k;
    let mut out = vec![0f32; m * n];
    let done = with_f32(&xf, |xs| {
        if m >= quantized_gemm_rows(format) {
            matmul_rows(xs, &Blocks(matrix, &bytes), m, k, n, &mut out);
        } else {
            quantized_matmul(xs, &matrix, m, &mut out);
        }
        true
    });
    if !done {
        return Ok(None);
    }
    projected(out, x, n).map(Some)
}

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
    Ok(Some(
        Tensor::from_vec(out, dims, y.device())?.to_dtype(y.dtype())?,
    ))
}

/// Causal attention of `q` `(seq, heads, head_dim)` at positions `start..` over one sequence's
/// keys and values in the paged pool (`(slots, kv_heads, head_dim)` each, read through its block
/// table); the result is `(seq, heads, head_dim)` in `q`'s dtype. `None` off the CPU.
pub(crate) fn attention(
    q: &Tensor,
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let (keys, values) = (kv.keys, kv.values);
    let eight_bit = keys.dtype() == DType::U8;
    if !supports(q) || !(eight_bit || supports(keys)) || keys.dtype() != values.dtype() {
        return Ok(None);
    }
    let (seq, heads, head_dim) = q.dims3()?;
    let kv_heads = checked_pool(q, kv, start)?;
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim,
        value_dim: kv.value_dim,
        scale,
    };
    let qf = activations(q)?;
    let mut out = vec![0f32; seq * heads * kv.value_dim];
    if !with_f32(&qf, |qs| attend_into(&shape, qs, kv, start, &mut out)) {
        return Ok(None);
    }
    Ok(Some(
        Tensor::from_vec(out, (seq, heads, kv.value_dim), q.device())?.to_dtype(q.dtype())?,
    ))
}

/// The pool's key/value heads, once its shapes are checked against `q`'s: head sizes match,
/// query heads are a multiple of key/value heads, the block table covers every position
/// `..start + seq` and stays inside the pool.
fn checked_pool(
    q: &Tensor,
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
) -> candle_core::Result<usize> {
    let (keys, values) = (kv.keys, kv.values);
    let (seq, heads, head_dim) = q.dims3()?;
    let (slots, kv_heads, key_units) = keys.dims3()?;
    let units = match keys.dtype() == DType::U8 {
        true => pio_kernels::kv_q8::row_bytes(head_dim),
        false => head_dim,
    };
    let bs = kv.block_size;
    let blocks_fit = kv.blocks[..(start + seq).div_ceil(bs.max(1)).min(kv.blocks.len())]
        .iter()
        .all(|&b| (b as usize + 1) * bs <= slots);
    if key_units != units
        || values.dims() != keys.dims()
        || kv.value_dim == 0
        || kv.value_dim > head_dim
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || bs == 0
        || kv.blocks.len() * bs < start + seq
        || !blocks_fit
    {
        candle_core::bail!(
            "attention of {seq} queries {:?} at position {start} over a pool of {:?} keys and {:?} values: \
             head sizes must match, query heads be a multiple of key/value heads, and the block table cover every position inside the pool",
            q.dims(),
            keys.dims(),
            values.dims()
        );
    }
    Ok(kv_heads)
}

/// Paged attention of the queries `qs` into `out`, over the pool in whichever element type it
/// holds (8-bit rows, f32, bf16, f16); false if its storage is none of them.
fn attend_into(
    shape: &AttentionShape,
    qs: &[f32],
    kv: &crate::attention::PagedKv<'_>,
    start: usize,
    out: &mut [f32],
) -> bool {
    fn run<T: CachedRow>(
        shape: &AttentionShape,
        (qs, keys, values): (&[f32], &[T], &[T]),
        kv: &crate::attention::PagedKv<'_>,
        start: usize,
        out: &mut [f32],
    ) -> bool {
        let view = PagedKv {
            keys,
            values,
            blocks: kv.blocks,
            block_size: kv.block_size,
        };
        paged_attention(shape, qs, &view, start, out);
        true
    }
    let (keys, values) = (kv.keys, kv.values);
    if keys.dtype() == DType::U8 {
        return with_bytes(keys, |k| {
            with_bytes(values, |v| run(shape, (qs, k, v), kv, start, out)).unwrap_or(false)
        })
        .unwrap_or(false);
    }
    with_elements(keys, |ks| {
        with_elements(values, |vs| match (ks, vs) {
            (Elements::F32(k), Elements::F32(v)) => run(shape, (qs, k, v), kv, start, out),
            (Elements::Bf16(k), Elements::Bf16(v)) => run(shape, (qs, k, v), kv, start, out),
            (Elements::F16(k), Elements::F16(v)) => run(shape, (qs, k, v), kv, start, out),
            _ => false,
        })
        .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// Calls `f` on the bytes of `t` when it is a contiguous CPU tensor of bytes (the 8-bit KV
/// cache's rows).
fn with_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::U8(v)) => Some(f(&v[start..end])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;
    use candle_core::Device;

    /// The kernels read candle's (ggml's) blocks byte for byte: the same values decoded, for
    /// every format both know, and the integer products within the activations' 8-bit rounding.
    /// The 8-bit KV cache's rows are ggml's Q8_0 blocks byte for byte too.
    #[test]
    fn the_kernels_read_ggml_blocks_as_ggml_does() {
        let rows = normal(0.0, 1.0, (5, 128), &Device::Cpu, 1);
        let ggml = QTensor::quantize(&rows, GgmlDType::Q8_0).unwrap();
        let mut ours = vec![0u8; 5 * pio_kernels::kv_q8::row_bytes(128)];
        let values = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, row) in values.chunks(128).zip(ours.chunks_mut(136)) {
            pio_kernels::kv_q8::quantize_row(x, row);
        }
        assert_eq!(ours, *ggml.data().unwrap(), "KV cache rows");

        let device = Device::Cpu;
        let (n, k) = (24, 512);
        // Seeded: over 40 seeds Q4K's error ran 0.0053-0.0090 (median 0.0071), but one unseeded
        // CI draw gave 0.0103.
        let w = normal(0.0, 1.0, (n, k), &device, 2);
        let x = normal(0.0, 1.0, (3, k), &device, 3);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let format = kernel_format(dtype).unwrap();
            let bytes = q.data().unwrap();
            let mut ours = vec![0f32; n * k];
            dequantize(format, &bytes, &mut ours);
            let theirs = q.dequantize(&device).unwrap().flatten_all().unwrap();
            assert_eq!(ours, theirs.to_vec1::<f32>().unwrap(), "{dtype:?}");

            let decoded = Tensor::from_vec(ours, (n, k), &device).unwrap();
            let exact = x.matmul(&decoded.t().unwrap()).unwrap();
            let got = quantized_linear(&x, &q).unwrap().unwrap();
            let err = (got - &exact).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = exact.sqr().unwrap().sum_all().unwrap();
            let rel = (err.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            assert!(rel < 0.01, "{dtype:?}: {rel}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let device = Device::Cpu;
        let x = Tensor::zeros((2, 5), DType::F32, &device).unwrap();
        let w = Tensor::zeros((3, 4), DType::F32, &device).unwrap();
        // The kernels decline; candle's own product then names the shapes.
        assert!(linear(&x, &w).unwrap().is_none());

        let q = Tensor::zeros((1, 4, 8), DType::F32, &device).unwrap();
        let pool = Tensor::zeros((8, 2, 8), DType::F32, &device).unwrap();
        let paged = |t: &'static [u32], keys: &Tensor| -> String {
            let kv = crate::attention::PagedKv {
                keys,
                values: keys,
                blocks: t,
                block_size: 4,
                value_dim: 8,
            };
            attention(&q, &kv, 3, 1.0).unwrap_err().to_string()
        };
        // Block 2 would start past the pool's 8 slots.
        assert!(paged(&[2], &pool).contains("inside the pool"));
        let odd = Tensor::zeros((8, 3, 8), DType::F32, &device).unwrap();
        assert!(paged(&[0], &odd).contains("multiple of key/value heads"));
    }

    #[test]
    fn bf16_linear_matches_candle() {
        let device = Device::Cpu;
        let x = normal(0.0, 1.0, (1, 7, 64), &device, 1);
        let w = normal(0.0, 1.0, (40, 64), &device, 2);
        for rows in [1, 7] {
            let x = x.narrow(1, 0, rows).unwrap().to_dtype(DType::BF16).unwrap();
            let w = w.to_dtype(DType::BF16).unwrap();
            let ours = linear(&x, &w).unwrap().unwrap();
            assert_eq!(ours.dims(), &[1, rows, 40]);
            assert_eq!(ours.dtype(), DType::BF16);
            let reference = x
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            // Only the final rounding to bf16 differs: at most half a bf16 step (2⁻⁸ of the
            // value; randn inputs give sums past 32, where a fixed bound flaked).
            let excess = ((ours.to_dtype(DType::F32).unwrap() - &reference)
                .unwrap()
                .abs()
                .unwrap()
                - (reference.abs().unwrap() * (1.0 / 256.0)).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert!(excess < 1e-4, "{rows} rows: {excess} past half a bf16 step");
        }
    }

    /// The half-precision add gives candle's sums bit for bit (f32 sum, one rounding), in any
    /// shape, including a transposed (non-contiguous) operand; f32 and mismatches are left to
    /// candle.
    #[test]
    fn half_precision_sums_are_candles() {
        let device = Device::Cpu;
        let a = normal(0.0, 4.0, (3, 40_000), &device, 1);
        let b = normal(0.0, 1.0, (3, 40_000), &device, 2);
        for dtype in [DType::BF16, DType::F16] {
            let (a, b) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
            let ours = add(&a, &b).unwrap().unwrap();
            let theirs = (&a + &b).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(&ours), bits(&theirs), "{dtype:?}");
            let (at, bt) = (a.t().unwrap(), b.t().unwrap());
            assert_eq!(
                bits(&add(&at, &bt).unwrap().unwrap()),
                bits(&(&at + &bt).unwrap())
            );
        }
        assert!(add(&a, &b).unwrap().is_none(), "f32 stays with candle");
        let half = a.to_dtype(DType::BF16).unwrap();
        assert!(add(&half, &b).unwrap().is_none(), "mixed dtypes");
        assert!(
            add(&half, &half.narrow(1, 0, 5).unwrap())
                .unwrap()
                .is_none(),
            "shapes"
        );
    }

    /// Rotary positions give candle's `rope_thd` bit for bit in f32, bf16 and f16, for one
    /// sequence and a batch of two sharing the table.
    #[test]
    fn rotary_positions_are_candles() {
        let device = Device::Cpu;
        for (batch, seq, heads, dim) in [(1, 7, 3, 16), (2, 5, 2, 8), (1, 1, 4, 128)] {
            let seed = 3 * dim as u64;
            let x = normal(0.0, 3.0, (batch, seq, heads, dim), &device, seed);
            let cos = normal(0.0, 1.0, (seq, dim / 2), &device, seed + 1);
            let sin = normal(0.0, 1.0, (seq, dim / 2), &device, seed + 2);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let [x, cos, sin] = [&x, &cos, &sin].map(|t| t.to_dtype(dtype).unwrap());
                let ours = rope(&x, &cos, &sin).unwrap().unwrap();
                let theirs = crate::candle_nn::rotary_emb::rope_thd(&x, &cos, &sin).unwrap();
                let values = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>().unwrap()
                };
                assert_eq!(values(&ours), values(&theirs), "{dtype:?} {:?}", x.dims());
            }
        }
        let x = Tensor::zeros((1, 2, 1, 8), DType::F32, &device).unwrap();
        let table = Tensor::zeros((3, 4), DType::F32, &device).unwrap();
        assert!(
            rope(&x, &table, &table).unwrap().is_none(),
            "a table of other positions"
        );
    }
}
