//! Rotary position embedding (RoPE) with `rope_theta` and linear position scaling, applied to
//! position-major (batch, seq, heads, head_dim) queries and keys in the half-rotation layout
//! (transformers' `rotate_half`; models whose checkpoints interleave pairs permute their rows at
//! load).

use serde::Deserialize;

use crate::candle_core::{DType, Device, Tensor};
use crate::checkpoint::Checkpoint;
use crate::{EngineError, Result};

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// `default` or `linear`.
    #[serde(default)]
    pub rope_type: Option<String>,
    /// transformers 4's older spelling of `rope_type`, which its re-saved configs keep beside
    /// the new one (so one field cannot alias the other: serde calls that a duplicate).
    #[serde(default, rename = "type")]
    pub old_type: Option<String>,
    /// Base (transformers 5 keeps it here).
    pub rope_theta: Option<f64>,
    /// Position scaling factor for `linear`.
    pub factor: Option<f64>,
    /// Share of each head that rotates (transformers 5 keeps it here).
    pub partial_rotary_factor: Option<f64>,
    /// YaRN's attention-scale correction, which transformers applies to MLA's softmax scale for
    /// any scaled rotation (not supported: refused where it would count).
    pub mscale_all_dim: Option<f64>,
}

impl RopeParameters {
    /// The kind of scaling, in either spelling.
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.old_type.as_deref())
    }
}

/// The RoPE parameters of a config that may carry both transformers 5's `rope_parameters` and
/// transformers 4's `rope_scaling`: either, or both where they say the same (transformers 5
/// takes `rope_scaling` first, PIO read `rope_parameters` first: two that differ are refused,
/// naming both, rather than one of them run).
pub(crate) fn rope_params<'a>(
    checkpoint: &Checkpoint,
    parameters: Option<&'a RopeParameters>,
    scaling: Option<&'a RopeParameters>,
) -> Result<Option<&'a RopeParameters>> {
    if let (Some(p), Some(s)) = (parameters, scaling) {
        let theta = p.rope_theta.zip(s.rope_theta).is_some_and(|(a, b)| a != b);
        if p.kind() != s.kind() || p.factor != s.factor || theta {
            return Err(EngineError::BadField {
                path: checkpoint.config_path(),
                field: "rope_scaling".into(),
                reason: format!("says {s:?} where rope_parameters says {p:?}: keep one of them"),
            });
        }
    }
    Ok(parameters.or(scaling))
}

/// (theta, position scale) from whichever RoPE fields a `config.json` uses: a top-level
/// `rope_theta` (transformers 4) or the one in `params` (transformers 5), `default` or `linear`.
pub(crate) fn rope_base(
    checkpoint: &Checkpoint,
    rope_theta: Option<f64>,
    params: Option<&RopeParameters>,
) -> Result<(f64, f64)> {
    let bad = |field: &str, reason: String| EngineError::BadField {
        path: checkpoint.config_path(),
        field: field.into(),
        reason,
    };
    let theta = rope_theta
        .or(params.and_then(|p| p.rope_theta))
        .unwrap_or(10_000.0);
    let kind = match params.map(|p| (p.rope_type.as_deref(), p.old_type.as_deref())) {
        Some((Some(new), Some(old))) if new != old => {
            return Err(bad(
                "rope_scaling.type",
                format!("says `{old}` where rope_type says `{new}`: keep one of them"),
            ))
        }
        Some((new, old)) => new.or(old),
        None => None,
    };
    // A factor with no kind is refused as transformers refuses it, not run unscaled.
    if let (None, Some(factor)) = (kind, params.and_then(|p| p.factor)) {
        if factor != 1.0 {
            return Err(bad(
                "rope_scaling.rope_type",
                format!("is missing beside factor {factor}: say which scaling (supported: default, linear)"),
            ));
        }
    }
    if let (Some(kind), Some(m)) = (kind, params.and_then(|p| p.mscale_all_dim)) {
        if !matches!(kind, "default" | "mrope") && m != 0.0 {
            return Err(bad(
                "rope_scaling.mscale_all_dim",
                format!("{m} beside `{kind}` scaling changes the attention's scale, which is not supported yet"),
            ));
        }
    }
    // Qwen2-VL's `mrope` is transformers' default rotation (its sections are the model's).
    let scale = match kind {
        None | Some("default") | Some("mrope") => 1.0,
        Some("linear") => params.and_then(|p| p.factor).unwrap_or(1.0),
        Some(other) => {
            return Err(EngineError::BadField {
                path: checkpoint.config_path(),
                field: "rope_scaling.rope_type".into(),
                reason: format!("`{other}` is not supported yet (supported: default, linear)"),
            })
        }
    };
    // Zero, negative or not a number, either turns every angle into NaN: output without sense
    // and without an error.
    for (field, value) in [("rope_theta", theta), ("rope_scaling.factor", scale)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(EngineError::BadField {
                path: checkpoint.config_path(),
                field: field.into(),
                reason: format!("expected a positive number, found {value}"),
            });
        }
    }
    // Two bases that differ: transformers 5 takes the parameters', PIO took the top level's.
    if let (Some(top), Some(inner)) = (rope_theta, params.and_then(|p| p.rope_theta)) {
        if top != inner {
            return Err(bad(
                "rope_theta",
                format!("is {top} where rope_parameters.rope_theta is {inner}: keep one of them"),
            ));
        }
    }
    Ok((theta, scale))
}

/// Rotary position embedding. Angles are computed for the positions each forward pass covers:
/// a table for every position of a 262144-token context would hold 128 MiB.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    inv_freq: Vec<f32>,
    /// Linear position scaling (`rope_scaling.factor`), as its inverse.
    inv_scale: f32,
    dtype: DType,
    device: Device,
}

/// cos and sin of the rotary angles for a run of positions, each (positions, head_dim / 2).
#[derive(Debug)]
pub(crate) struct Angles {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Angles over `dim` rotated values per head, base `theta`, positions divided by `scale`.
    pub(crate) fn new(dim: usize, theta: f64, scale: f64, dtype: DType, device: &Device) -> Self {
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
    pub(crate) fn angles(&self, positions: &[usize]) -> Result<Angles> {
        self.table(positions.len(), |row, _| positions[row] as f32)
    }

    /// The angles of multimodal (temporal, height, width) positions, one triple per row, as
    /// transformers' interleaved M-RoPE assigns frequencies to axes: frequency `j` follows the
    /// height for `j ≡ 1 (mod 3)` below `3 * section[1]`, the width for `j ≡ 2` below
    /// `3 * section[2]`, and the temporal position otherwise.
    pub(crate) fn angles_mrope(
        &self,
        positions: &[[u32; 3]],
        section: [usize; 3],
    ) -> Result<Angles> {
        let axis = |j: usize| match j % 3 {
            1 if j < 3 * section[1] => 1,
            2 if j < 3 * section[2] => 2,
            _ => 0,
        };
        let axes: Vec<usize> = (0..self.inv_freq.len()).map(axis).collect();
        self.table(positions.len(), |row, j| positions[row][axes[j]] as f32)
    }

    /// cos and sin of `position(row, frequency) * inv_freq[frequency]` for `rows` rows.
    fn table(&self, rows: usize, position: impl Fn(usize, usize) -> f32) -> Result<Angles> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(rows * half),
            Vec::with_capacity(rows * half),
        );
        for row in 0..rows {
            for (j, f) in self.inv_freq.iter().enumerate() {
                let angle = position(row, j) * self.inv_scale * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (rows, half), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(Angles {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }
}

impl Angles {
    /// The cos and sin tables, each (positions, head_dim / 2).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` of shape (batch, seq, heads, head_dim).
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(rotated) = crate::cpu::rope(x, &self.cos, &self.sin)? {
            return Ok(rotated);
        }
        Ok(crate::candle_nn::rotary_emb::rope_thd(
            &x.contiguous()?,
            &self.cos,
            &self.sin,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(scaling: serde_json::Value) -> Result<(f64, f64)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let params: RopeParameters = serde_json::from_value(scaling).unwrap();
        rope_base(&checkpoint, Some(1e6), Some(&params))
    }

    /// transformers 4 re-saves `type` beside `rope_type`: both are read, and must agree.
    #[test]
    fn both_spellings_of_the_rope_type_are_read() {
        let both = json!({"type": "linear", "rope_type": "linear", "factor": 2.0});
        assert_eq!(base(both).unwrap(), (1e6, 2.0));
        assert_eq!(
            base(json!({"type": "linear", "factor": 4.0})).unwrap().1,
            4.0
        );
        assert_eq!(
            base(json!({"type": "mrope", "mrope_section": [1, 1]}))
                .unwrap()
                .1,
            1.0
        );
        let e = base(json!({"type": "yarn", "rope_type": "linear", "factor": 2.0})).unwrap_err();
        assert!(e.to_string().contains("rope_scaling.type"), "{e}");
        let e = base(json!({"type": "yarn", "factor": 2.0})).unwrap_err();
        assert!(e.to_string().contains("`yarn` is not supported"), "{e}");
    }

    /// A factor with no kind of scaling is refused, not run unscaled.
    #[test]
    fn a_factor_without_a_rope_type_is_refused() {
        let e = base(json!({"factor": 2.0})).unwrap_err();
        assert!(
            e.to_string().contains("rope_type") && e.to_string().contains("factor 2"),
            "{e}"
        );
        assert_eq!(base(json!({"factor": 1.0})).unwrap().1, 1.0);
    }

    /// Two sources that say different things are refused, naming both: transformers 5 would
    /// take the other one.
    #[test]
    fn rope_fields_that_disagree_are_refused() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let params = |v: serde_json::Value| serde_json::from_value::<RopeParameters>(v).unwrap();
        let theta = params(json!({"rope_type": "default", "rope_theta": 1e6}));
        let e = rope_base(&checkpoint, Some(1e4), Some(&theta)).unwrap_err();
        assert!(e.to_string().contains("rope_theta"), "{e}");
        assert_eq!(
            rope_base(&checkpoint, Some(1e6), Some(&theta)).unwrap().0,
            1e6
        );
        let linear = params(json!({"type": "linear", "factor": 4.0}));
        let e = rope_params(&checkpoint, Some(&theta), Some(&linear)).unwrap_err();
        assert!(e.to_string().contains("keep one"), "{e}");
        let same = params(json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}));
        assert!(rope_params(&checkpoint, Some(&same), Some(&linear)).is_ok());
        let e =
            base(json!({"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 1.0})).unwrap_err();
        assert!(e.to_string().contains("mscale_all_dim"), "{e}");
    }

    use serde_json::json;
}
