//! Linear layers on the kernels: dense weights in f32, bf16 or f16, block-quantized ones as
//! stored (integer dot products) or repacked into the kernels' tiles.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use pio_kernels::{
    dequantize, matmul_rows, matmul_stacked, packed_matmul, quantized_matmul, Format, PackedMatrix,
    QuantMatrix, WeightRows,
};

use super::{
    activations, projected, supports, with_elements, with_f32, with_stack, Elements, Stack,
};

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

/// `x Wᵀ` for `x` of shape `(.., k)` and `w` of shape `(n, k)`, in `x`'s dtype; `None` when the
/// tensors are not on the CPU or not in a dtype the kernels take.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    linear_stacked(x, &[w])
}

/// [`linear`] plus `bias` on every row. Where `x` and `bias` are f32 (a vision tower's layers)
/// the bias is added into the product's output over the pool: the same sums as adding it after,
/// without candle's second pass writing a fresh tensor. Elsewhere candle adds it (a narrower
/// output is rounded first, as before).
pub(crate) fn biased_linear(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if x.dtype() == DType::F32 && bias.dims() == [w.dims2()?.0] {
        let fused = with_elements(bias, |b| match b {
            Elements::F32(b) => product(x, &[w], Some(b)),
            _ => Ok(None),
        });
        if let Some(y) = fused.transpose()?.flatten() {
            return Ok(Some(y));
        }
    }
    linear(x, w)?.map(|y| y.broadcast_add(bias)).transpose()
}

/// [`linear`] for the weights `parts` stacked (each `(n_i, k)`, outputs in order) without
/// copying them together: the output is `(.., Σ n_i)`, the same values as over the copy.
pub(crate) fn linear_stacked(x: &Tensor, parts: &[&Tensor]) -> candle_core::Result<Option<Tensor>> {
    product(x, parts, None)
}

/// `x · [parts]ᵀ`, plus `bias` (one value per output) on every row where given.
fn product(
    x: &Tensor,
    parts: &[&Tensor],
    bias: Option<&[f32]>,
) -> candle_core::Result<Option<Tensor>> {
    if !supports(x) || !parts.iter().all(|w| supports(w) && w.is_contiguous()) {
        return Ok(None);
    }
    let mut n = 0;
    let mut k = None;
    for w in parts {
        let (rows, cols) = w.dims2()?;
        if k.is_some_and(|k| k != cols) {
            return Ok(None);
        }
        (n, k) = (n + rows, Some(cols));
    }
    let Some(k) = k.filter(|&k| x.dims().last() == Some(&k)) else {
        // candle's product reports the mismatch with both shapes.
        return Ok(None);
    };
    let xf = activations(x)?;
    let m = xf.elem_count() / k.max(1);
    let mut out = vec![0f32; m * n];
    let done = with_f32(&xf, |xs| {
        with_stack(parts, |ws| match ws {
            Stack::F32(ws) => matmul_stacked(xs, &ws, m, k, n, &mut out),
            Stack::Bf16(ws) => matmul_stacked(xs, &ws, m, k, n, &mut out),
            Stack::F16(ws) => matmul_stacked(xs, &ws, m, k, n, &mut out),
        })
        .is_some()
    });
    if !done {
        return Ok(None);
    }
    if let Some(bias) = bias {
        debug_assert_eq!(bias.len(), n, "a bias per output");
        add_rows(&mut out, bias);
    }
    projected(out, x, n).map(Some)
}

/// `bias` added to each row of `out` (rows `bias.len()` wide), about 64K values per task.
fn add_rows(out: &mut [f32], bias: &[f32]) {
    use rayon::prelude::*;
    let rows = (1 << 16) / bias.len().max(1) + 1;
    out.par_chunks_mut(rows * bias.len().max(1))
        .for_each(|block| {
            for row in block.chunks_exact_mut(bias.len()) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        });
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
