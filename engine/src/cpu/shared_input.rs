//! Several tiled linear layers over one input, quantized once — and, when an RMSNorm produces
//! that input, normalized and quantized in one pass (see `pio_kernels::QuantizedRows`).

use candle_core::{DType, Tensor};
use pio_kernels::{bf16, f16, PackedMatrix, QuantizedRows, RmsNormSpec};

use super::{activations, projected, with_elements, Elements};

/// An RMSNorm to apply on the way in: its weight widened to f32, its epsilon, and its dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Norm<'a> {
    /// The weight, widened to f32 (exact: it is stored in `dtype`).
    pub weight: &'a [f32],
    /// Added to the mean square.
    pub eps: f32,
    /// The dtype the norm computes in (the model's).
    pub dtype: DType,
}

/// `x · Wᵀ` for each `W` of `tiles`, `x` first normalized by `norm` where given, the activations
/// quantized once for all; `None` where that cannot be done here (not on the CPU, layers whose
/// formats read different activations, a dtype the kernels lack), and the caller runs each layer
/// on its own.
pub(crate) fn tiled_linears(
    x: &Tensor,
    norm: Option<Norm<'_>>,
    tiles: &[&PackedMatrix],
) -> candle_core::Result<Option<Vec<Tensor>>> {
    let Some(first) = tiles.first() else {
        return Ok(Some(Vec::new()));
    };
    let (k, format) = (first.cols(), first.format());
    let same_input = tiles
        .iter()
        .all(|t| t.cols() == k && t.format().block_values() == format.block_values());
    let round: fn(f32) -> f32 = match x.dtype() {
        DType::F32 => |v| v,
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        _ => return Ok(None),
    };
    let norm_fits = norm.is_none_or(|n| n.dtype == x.dtype() && n.weight.len() == k);
    if !x.device().is_cpu() || x.dims().last() != Some(&k) || !same_input || !norm_fits {
        return Ok(None);
    }
    let xf = activations(x)?;
    let rows = with_elements(&xf, |e| match e {
        Elements::F32(xs) => Some(match norm {
            Some(n) => {
                let spec = RmsNormSpec {
                    weight: n.weight,
                    eps: n.eps,
                    round,
                };
                QuantizedRows::rms_normed(xs, k, &spec, format)
            }
            None => QuantizedRows::new(xs, k, format),
        }),
        _ => None,
    })
    .flatten();
    let Some(rows) = rows else {
        return Ok(None);
    };
    tiles
        .iter()
        .map(|w| {
            let mut out = vec![0f32; rows.rows() * w.rows()];
            rows.matmul(w, &mut out);
            projected(out, x, w.rows())
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}
