//! RMSNorm, and the rows it produces on their way into linear layers: where every layer that
//! reads them holds the CPU kernels' tiles, the norm runs fused with their activation
//! quantization — the normalized rows are never written out, converted and read back — and
//! layers that could not stack into one matrix (a Q4_K_M file's Q6_K value projection beside
//! Q4_K queries and keys) share one quantization of their input.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::linear::Linear;
use crate::profile::{Op, PROFILE};

/// `x / √(mean(x²) + eps) · weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    norm: candle_nn::RmsNorm,
    /// The weight widened to f32, for the fused path.
    widened: Arc<[f32]>,
    eps: f64,
    dtype: DType,
}

impl RmsNorm {
    /// Reads `weight` (`size` wide) under `vb`.
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let widened = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?.into();
        Ok(Self {
            dtype: weight.dtype(),
            norm: candle_nn::RmsNorm::new(weight, eps),
            widened,
            eps,
        })
    }

    /// The weight, as stored.
    pub fn weight(&self) -> &Tensor {
        self.norm.weight()
    }

    /// Added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `(x + y, norm(x + y))` in one launch on a GPU; `None` elsewhere.
    #[cfg(feature = "cuda")]
    fn add_normed(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        crate::cuda::fused::add_rms_norm(x, y, self.norm.weight(), self.eps)
    }

    /// `(x + y, norm(x + y))` in one launch on a GPU; `None` elsewhere.
    #[cfg(not(feature = "cuda"))]
    fn add_normed(&self, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    fn fused(&self) -> crate::cpu::Norm<'_> {
        crate::cpu::Norm {
            weight: &self.widened,
            eps: self.eps as f32,
            dtype: self.dtype,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == self.dtype {
            if let Some(y) = crate::cpu::rms_norm(x, &self.widened, self.eps as f32)? {
                return Ok(y);
            }
        }
        self.norm.forward(x)
    }
}

/// Rows on their way into linear layers: as they are, or still to be normalized.
#[derive(Debug, Clone, Copy)]
pub enum LinearInput<'a> {
    /// The rows themselves.
    Rows(&'a Tensor),
    /// The rows normalized by the norm (computed by whoever reads them).
    Normed(&'a Tensor, &'a RmsNorm),
}

impl LinearInput<'_> {
    /// The rows before any norm (their shape is the input's).
    pub fn rows(&self) -> &Tensor {
        match self {
            Self::Rows(x) | Self::Normed(x, _) => x,
        }
    }

    /// The input as a tensor, normalized where asked.
    pub fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Rows(x) => Ok((*x).clone()),
            Self::Normed(x, norm) => norm.forward(x),
        }
    }
}

/// The residual stream between decoder layers: the rows so far, and the last layer's output not yet
/// added to them. The next norm makes the addition — on a GPU in the same launch as the norm,
/// which saves two of a layer's ~20 launches (a decode step there is bound by launches).
#[derive(Debug)]
pub struct Residual {
    rows: Tensor,
    pending: Option<Tensor>,
    normed: Option<Tensor>,
}

impl Residual {
    /// The stream starting at `rows` (the embeddings).
    pub fn new(rows: Tensor) -> Self {
        Self {
            rows,
            pending: None,
            normed: None,
        }
    }

    /// Adds `y` (a layer's output) to the stream, at the next norm.
    pub fn add(&mut self, y: Tensor) -> candle_core::Result<()> {
        self.settle()?;
        self.pending = Some(y);
        Ok(())
    }

    /// The rows with every addition made.
    pub fn rows(&mut self) -> candle_core::Result<&Tensor> {
        self.settle()?;
        Ok(&self.rows)
    }

    /// The rows with every addition made, as the stream's end.
    pub fn into_rows(mut self) -> candle_core::Result<Tensor> {
        self.settle()?;
        Ok(self.rows)
    }

    /// The rows, every addition made, on their way into linear layers through `norm`.
    pub fn normed<'a>(&'a mut self, norm: &'a RmsNorm) -> candle_core::Result<LinearInput<'a>> {
        self.normed = None;
        if let Some(y) = &self.pending {
            if let Some((sum, normed)) = norm.add_normed(&self.rows, y)? {
                self.rows = sum;
                self.pending = None;
                return Ok(LinearInput::Rows(self.normed.insert(normed)));
            }
        }
        self.settle()?;
        Ok(LinearInput::Normed(&self.rows, norm))
    }

    /// Makes the pending addition.
    fn settle(&mut self) -> candle_core::Result<()> {
        if let Some(y) = self.pending.take() {
            self.rows = crate::models::residual(&self.rows, &y)?;
        }
        Ok(())
    }
}

/// Each of `layers` applied to `input`, in order: on the CPU, when every layer holds tiles whose
/// formats read the same activations, the input is quantized once for all (and normalized in
/// the same pass); otherwise the normalized input is computed once and each layer runs on it.
pub fn forward_all<const N: usize>(
    layers: [&Linear; N],
    input: LinearInput<'_>,
) -> candle_core::Result<[Tensor; N]> {
    let outputs = match fused(&layers, input)? {
        Some(out) => out,
        None => {
            let x = input.tensor()?;
            layers
                .iter()
                .map(|l| l.forward(&x))
                .collect::<candle_core::Result<_>>()?
        }
    };
    outputs.try_into().map_err(|out: Vec<Tensor>| {
        candle_core::Error::Msg(format!("{N} linear layers gave {} outputs", out.len()))
    })
}

/// The fused path of [`forward_all`]; `None` where it does not apply.
fn fused(layers: &[&Linear], input: LinearInput<'_>) -> candle_core::Result<Option<Vec<Tensor>>> {
    let Some(tiles) = layers.iter().map(|l| l.tiles()).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let _timed = PROFILE.scope(Op::QuantizedLinear);
    let norm = match input {
        LinearInput::Rows(_) => None,
        LinearInput::Normed(_, norm) => Some(norm.fused()),
    };
    crate::cpu::tiled_linears(input.rows(), norm, &tiles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Quantization;
    use crate::testing::normal;
    use candle_core::Device;
    use std::collections::HashMap;

    fn norm(width: usize, dtype: DType) -> RmsNorm {
        let w = normal(1.0, 0.2, width, &Device::Cpu, 1000);
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w.to_dtype(dtype).unwrap())]),
            dtype,
            &Device::Cpu,
        );
        RmsNorm::load(width, 1e-6, vb).unwrap()
    }

    fn layer(input: usize, output: usize, q: Quantization, dtype: DType) -> Linear {
        let w = normal(0.0, 1.0, (output, input), &Device::Cpu, output as u64);
        Linear::from_weight(w.to_dtype(dtype).unwrap(), None, q).unwrap()
    }

    /// The fused norm and the shared quantization give exactly what each layer gives on the
    /// normalized rows, in f32 and bf16, for one row and a prompt's; layers of one activation
    /// family (Q8_0 beside Q4_0) take the fused path, Q8_0 beside Q4_K falls back, and dense
    /// layers too.
    #[test]
    fn shared_input_layers_compute_each_layer_on_the_normalized_rows() {
        // (input width, the two layers' quantizations, whether they share one quantization):
        // 160 wide, Q8 and Q4 are Q8_0 and Q4_0; 256 wide, Q4 is Q4_K.
        let cases = [
            (160, Quantization::Q8, Quantization::Q4, true),
            (256, Quantization::Q8, Quantization::Q4, false),
            (256, Quantization::Q4, Quantization::Q4, true),
            (256, Quantization::None, Quantization::Q8, false),
        ];
        for dtype in [DType::F32, DType::BF16] {
            for (k, qa, qb, shared) in cases {
                let norm = norm(k, dtype);
                // Outputs that end inside a tile, and one whole tile.
                let (a, b) = (layer(k, 40, qa, dtype), layer(k, 16, qb, dtype));
                for m in [1, 9] {
                    let x = normal(0.0, 1.0, (1, m, k), &Device::Cpu, m as u64);
                    let x = x.to_dtype(dtype).unwrap();
                    let [ya, yb] = forward_all([&a, &b], LinearInput::Normed(&x, &norm)).unwrap();
                    let h = norm.forward(&x).unwrap();
                    let what = format!("{qa:?}/{qb:?} {dtype:?} m={m}");
                    for (got, l) in [(ya, &a), (yb, &b)] {
                        let want = l.forward(&h).unwrap();
                        assert_eq!(got.dims(), want.dims(), "{what}");
                        let values = |t: Tensor| {
                            let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                            t.to_vec1::<f32>().unwrap()
                        };
                        assert_eq!(values(got), values(want), "{what}");
                    }
                    let tiles = [&a, &b].map(|l| l.tiles());
                    let fused = match tiles {
                        [Some(ta), Some(tb)] => {
                            crate::cpu::tiled_linears(&x, Some(norm.fused()), &[ta, tb])
                                .unwrap()
                                .is_some()
                        }
                        _ => false,
                    };
                    assert_eq!(fused, shared, "{what}: fused path taken");
                }
            }
        }
    }

    /// The stream makes every addition exactly once, in order, whichever of its ends reads it:
    /// the next norm's input, the rows, or the end.
    #[test]
    fn the_residual_stream_adds_each_output_once_before_whoever_reads_it() {
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rand = |seed| normal(0.0, 1.0, (1, 3, 8), &Device::Cpu, seed);
        let (x, a, b, c) = (rand(1), rand(2), rand(3), rand(4));
        let norm = norm(8, DType::F32);
        let mut stream = Residual::new(x.clone());
        match stream.normed(&norm).unwrap() {
            LinearInput::Normed(rows, _) => assert_eq!(values(rows), values(&x)),
            LinearInput::Rows(_) => panic!("the CPU's norm is fused into the projections"),
        }
        stream.add(a.clone()).unwrap();
        let after_a = (&x + &a).unwrap();
        assert_eq!(
            values(stream.normed(&norm).unwrap().rows()),
            values(&after_a)
        );
        stream.add(b.clone()).unwrap();
        // A second addition before any norm makes the first one.
        stream.add(c.clone()).unwrap();
        let after_c = ((&after_a + &b).unwrap() + &c).unwrap();
        assert_eq!(values(stream.rows().unwrap()), values(&after_c));
        assert_eq!(values(&stream.into_rows().unwrap()), values(&after_c));
    }
}
