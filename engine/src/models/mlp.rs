//! The SwiGLU feed-forward block every model family here uses: `down(silu(gate(x)) · up(x))`,
//! as a dense layer, a routed expert or a shared expert.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::linear::{Linear, Quantization};
use crate::Result;

/// One SwiGLU MLP.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
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
        Ok(Self {
            gate_proj: Linear::load(hidden, width, false, q, vb.pp("gate_proj"))?,
            up_proj: Linear::load(hidden, width, false, q, vb.pp("up_proj"))?,
            down_proj: Linear::load(width, hidden, false, q, vb.pp("down_proj"))?,
        })
    }

    /// Bytes its weights take.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.gate_proj.weight_bytes() + self.up_proj.weight_bytes() + self.down_proj.weight_bytes()
    }

    /// The block on rows `x` (`(…, hidden)`).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        Ok(self
            .down_proj
            .forward(&(gate * self.up_proj.forward(x)?)?)?)
    }
}
