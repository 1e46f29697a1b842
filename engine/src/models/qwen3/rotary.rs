//! Rotary position embedding (RoPE) with `rope_theta` and linear position scaling, applied to
//! position-major (batch, seq, heads, head_dim) queries and keys.

use crate::candle_core::{DType, Device, Tensor};
use crate::Result;

use super::Config;

/// Rotary position embedding. Angles are computed for the positions each forward pass covers:
/// a table for every position of a 262144-token context would hold 128 MiB.
#[derive(Debug, Clone)]
pub(super) struct Rotary {
    inv_freq: Vec<f32>,
    /// Linear position scaling (`rope_scaling.factor`), as its inverse.
    inv_scale: f32,
    dtype: DType,
    device: Device,
}

/// cos and sin of the rotary angles for a run of positions, each (positions, head_dim / 2).
#[derive(Debug)]
pub(super) struct Angles {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub(super) fn new(cfg: &Config, theta: f64, scale: f64, dtype: DType, device: &Device) -> Self {
        let dim = cfg.head_dim();
        Self {
            inv_freq: (0..dim)
                .step_by(2)
                .map(|i| (1.0 / theta.powf(i as f64 / dim as f64)) as f32)
                .collect(),
            inv_scale: (1.0 / scale) as f32,
            dtype,
            device: device.clone(),
        }
    }

    /// The angles of `positions` (one per row of a batch), in f32 as transformers computes them.
    pub(super) fn angles(&self, positions: &[usize]) -> Result<Angles> {
        let half = self.inv_freq.len();
        let len = positions.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for &pos in positions {
            let p = pos as f32 * self.inv_scale;
            for f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (len, half), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(Angles {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }
}

impl Angles {
    /// Rotates `x` of shape (batch, seq, heads, head_dim).
    pub(super) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::candle_nn::rotary_emb::rope_thd(
            &x.contiguous()?,
            &self.cos,
            &self.sin,
        )?)
    }
}
