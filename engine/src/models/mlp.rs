//! The SwiGLU feed-forward block every model family here uses: `down(silu(gate(x)) · up(x))`,
//! as a dense layer, a routed expert or a shared expert. Where the two input projections can
//! share one layer (same storage, no bias) they are stacked into one, so the activations are
//! read and quantized once, and SwiGLU runs as one pass over its output.

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::linear::{Linear, Quantization};
use crate::norm::{forward_all, LinearInput};
use crate::Result;

/// The gate and up projections.
#[derive(Debug, Clone)]
enum Input {
    /// One layer: the gate's `width` outputs, then the up projection's.
    Stacked(Linear),
    /// Two layers.
    Separate { gate: Linear, up: Linear },
}

/// One SwiGLU MLP.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    input: Input,
    down_proj: Linear,
    width: usize,
}

impl Mlp {
    /// Reads `gate_proj`, `up_proj` and `down_proj` under `vb`: `hidden` wide in and out, `width`
    /// wide inside.
    pub(crate) fn load(
        hidden: usize,
        width: usize,
        q: Quantization,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let gate = Linear::load(hidden, width, false, q, vb.pp("gate_proj"))?;
        let up = Linear::load(hidden, width, false, q, vb.pp("up_proj"))?;
        let input = match gate.stacked(&up)? {
            Some(both) => Input::Stacked(both),
            None => Input::Separate { gate, up },
        };
        Ok(Self {
            input,
            down_proj: Linear::load(width, hidden, false, q, vb.pp("down_proj"))?,
            width,
        })
    }

    /// Bytes its weights take.
    pub(crate) fn weight_bytes(&self) -> usize {
        let input = match &self.input {
            Input::Stacked(both) => both.weight_bytes(),
            Input::Separate { gate, up } => gate.weight_bytes() + up.weight_bytes(),
        };
        input + self.down_proj.weight_bytes()
    }

    /// The stacked gate/up weight (`(2·width, hidden)`) and the down weight (`(hidden, width)`)
    /// when both are plain values with no bias (what the GPU's expert kernels read in place).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn dense_weights(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.input, &self.down_proj) {
            (Input::Stacked(Linear::Dense(both)), Linear::Dense(down))
                if both.bias().is_none() && down.bias().is_none() =>
            {
                Some((both.weight(), down.weight()))
            }
            _ => None,
        }
    }

    /// The block on rows `x` (`(…, hidden)`).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_input(LinearInput::Rows(x))
    }

    /// The block on `x`, normalized on its way in where it says so (see [`forward_all`]).
    pub(crate) fn forward_input(&self, x: LinearInput<'_>) -> Result<Tensor> {
        let inner = match &self.input {
            Input::Stacked(both) => {
                let [y] = forward_all([both], x)?;
                swiglu(&y, self.width)?
            }
            Input::Separate { gate, up } => {
                let [gate, up] = forward_all([gate, up], x)?;
                (candle_nn::ops::silu(&gate)? * up)?
            }
        };
        Ok(self.down_proj.forward(&inner)?)
    }
}

/// `silu(gate) · up` of `y` = `(…, [gate | up])`, each `width` wide: one pass on the CPU, one
/// launch on a GPU.
fn swiglu(y: &Tensor, width: usize) -> Result<Tensor> {
    if let Some(out) = crate::cpu::swiglu(y, width)? {
        return Ok(out);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::fused::swiglu(y, width)? {
        return Ok(out);
    }
    let gate = y.narrow(D::Minus1, 0, width)?;
    let up = y.narrow(D::Minus1, width, width)?;
    Ok((candle_nn::ops::silu(&gate)? * up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// The stacked gate/up of a checkpoint are its own two tensors, not a copy made at load: the
    /// file's pages where it is mapped. Mapped or read, the block computes the same.
    #[test]
    fn gate_and_up_stack_without_a_copy() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
        let (hidden, width) = (64, 160);
        let load = |mapped: bool| {
            let checkpoint = crate::checkpoint::Checkpoint::open(&dir)
                .unwrap()
                .with_mapping(mapped);
            let vb = checkpoint.weights(DType::F32, &Device::Cpu).unwrap();
            Mlp::load(
                hidden,
                width,
                Quantization::None,
                vb.pp("model.layers.0.mlp"),
            )
            .unwrap()
        };
        let mapped_parts = |mlp: &Mlp| match &mlp.input {
            Input::Stacked(Linear::DenseStack(parts)) => {
                assert_eq!(parts.len(), 2);
                parts
                    .iter()
                    .filter(|w| crate::mapping::holds_mapped(w))
                    .count()
            }
            other => panic!("not a stack of the two tensors: {other:?}"),
        };
        let (mapped, read) = (load(true), load(false));
        assert_eq!(mapped_parts(&mapped), 2, "the file's pages");
        assert_eq!(mapped_parts(&read), 0, "read with mmap = false");
        let x = normal(0.0, 1.0, (3, hidden), &Device::Cpu, 7);
        let (a, b) = (mapped.forward(&x).unwrap(), read.forward(&x).unwrap());
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    /// The stacked layer and the one-pass SwiGLU give the separate layers' result, dense and
    /// quantized; rows that cannot stack stay separate and still compute the same.
    #[test]
    fn stacked_projections_compute_the_separate_block() {
        let device = Device::Cpu;
        for (q, width) in [
            (Quantization::None, 48),
            (Quantization::Q8, 48),
            (Quantization::Q8, 40),
            (Quantization::Q4, 64),
        ] {
            let hidden = 64;
            let w = |r, c, seed| normal(0.0, 0.2, (r, c), &device, seed);
            let tensors = HashMap::from([
                ("gate_proj.weight".to_string(), w(width, hidden, 1)),
                ("up_proj.weight".to_string(), w(width, hidden, 2)),
                ("down_proj.weight".to_string(), w(hidden, width, 3)),
            ]);
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
            let mlp = Mlp::load(hidden, width, q, vb.clone()).unwrap();
            let stacked = matches!(mlp.input, Input::Stacked(_));
            assert_eq!(
                stacked,
                q == Quantization::None || width % 16 == 0,
                "{q:?} {width}"
            );
            let gate = Linear::load(hidden, width, false, q, vb.pp("gate_proj")).unwrap();
            let up = Linear::load(hidden, width, false, q, vb.pp("up_proj")).unwrap();
            let x = normal(0.0, 1.0, (3, hidden), &device, 4);
            let inner = (candle_nn::ops::silu(&gate.forward(&x).unwrap()).unwrap()
                * up.forward(&x).unwrap())
            .unwrap();
            let want = mlp.down_proj.forward(&inner).unwrap();
            let got = mlp.forward(&x).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{q:?} {width}");
            assert_eq!(
                mlp.weight_bytes(),
                gate.weight_bytes() + up.weight_bytes() + mlp.down_proj.weight_bytes()
            );
        }
    }
}
