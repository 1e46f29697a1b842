//! Qwen3-VL's vision tower, as transformers' `Qwen3VLVisionModel`: patches embedded by a linear
//! map (the Conv3d), learned positions interpolated to the image's grid, 2-D rotary attention
//! within each image, and mergers that fold each 2 × 2 block of patches into one text-width token
//! — the last block's output through the main merger, some earlier blocks' through DeepStack's.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};

use super::config::VisionConfig;
use super::processor::{merge_block_cells, Patches};
use crate::linear::{Linear, Quantization};
use crate::Result;

const EPS: f64 = 1e-6;

/// Rows per pass through a block's MLP: enough for the products' tiles, few enough that the
/// intermediate stays small.
const MLP_ROWS: usize = 512;

// The tower computes in f32 over weights kept in the checkpoint's dtype: candle's elementwise
// bf16 operations (bias, residual, GELU) took a third of a bf16 tower's time. Norms and biases,
// which are small, are held in f32. A bf16 checkpoint's products take their inputs rounded to
// bf16, as transformers' bf16 tower computes them (its activations are bf16 throughout): the
// kernels then multiply on the AMX tiles where the CPU has them, several times the f32 GEMM's
// rate, and attention's scores likewise.

/// How the tower computes: whether products take bf16 inputs (a bf16 checkpoint's tower), and
/// the rows per pass through an MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Precision {
    bf16: bool,
    mlp_rows: usize,
}

impl Precision {
    /// `x` as this precision's products take it: rounded to bf16 values on the CPU for a bf16
    /// checkpoint; as it is otherwise.
    fn input(self, x: Tensor) -> Result<Tensor> {
        if self.bf16 {
            if let Some(rounded) = crate::cpu::encoder::bf16_values(&x)? {
                return Ok(rounded);
            }
        }
        Ok(x)
    }
}

fn norm(size: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    layer_norm(
        size,
        LayerNormConfig {
            eps: EPS,
            ..Default::default()
        },
        vb.to_dtype(DType::F32),
    )
}

fn linear(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get((o, i), "weight")?;
    let bias = vb.to_dtype(DType::F32).get(o, "bias")?;
    Linear::from_weight(weight, Some(bias), Quantization::None)
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            norm1: norm(h, vb.pp("norm1"))?,
            qkv: linear(h, 3 * h, vb.pp("attn.qkv"))?,
            proj: linear(h, h, vb.pp("attn.proj"))?,
            norm2: norm(h, vb.pp("norm2"))?,
            fc1: linear(h, cfg.intermediate_size, vb.pp("mlp.linear_fc1"))?,
            fc2: linear(cfg.intermediate_size, h, vb.pp("mlp.linear_fc2"))?,
            heads: cfg.num_heads,
        })
    }

    /// `x` is one image's patches `(n, hidden)`; it attends over all of them, not causally.
    fn forward(&self, x: &Tensor, (cos, sin): (&Tensor, &Tensor), p: Precision) -> Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let hd = hidden / self.heads;
        let qkv = self
            .qkv
            .forward(&p.input(self.norm1.forward(x)?)?)?
            .reshape((1, n, 3, self.heads, hd))?;
        let rotate = |t: Tensor| -> Result<Tensor> {
            let t = t.contiguous()?;
            let rotated = match crate::cpu::rope(&t, cos, sin)? {
                Some(r) => r,
                None => candle_nn::rotary_emb::rope_thd(&t, cos, sin)?,
            };
            Ok(rotated.squeeze(0)?)
        };
        let q = rotate(qkv.narrow(2, 0, 1)?.squeeze(2)?)?;
        let k = rotate(qkv.narrow(2, 1, 1)?.squeeze(2)?)?;
        let v = qkv.narrow(2, 2, 1)?.squeeze(2)?.squeeze(0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = match crate::cpu::encoder::attention((&q, &k, &v), scale, p.bf16)? {
            Some(a) => a,
            None => per_head_attention((&q, &k, &v), scale)?,
        };
        let x = (x + self.proj.forward(&p.input(attn)?)?)?;
        // The MLP a slice of rows at a time: its intermediate, four times as wide, stays under
        // glibc's mmap threshold (32 MB), so its buffers are reused instead of mapped and faulted
        // in afresh for every block (a 1280×720 image's 3,520 rows took 58 MB each).
        let slices = (0..n)
            .step_by(p.mlp_rows)
            .map(|at| self.mlp(&x.narrow(0, at, p.mlp_rows.min(n - at))?, p))
            .collect::<Result<Vec<_>>>()?;
        Ok((&x + Tensor::cat(&slices, 0)?)?)
    }

    fn mlp(&self, x: &Tensor, p: Precision) -> Result<Tensor> {
        let hidden = gelu(&self.fc1.forward(&p.input(self.norm2.forward(x)?)?)?)?;
        Ok(self.fc2.forward(&p.input(hidden)?)?)
    }
}

/// GELU's tanh approximation (the config's `gelu_pytorch_tanh`): the kernels' on the CPU.
fn gelu(x: &Tensor) -> Result<Tensor> {
    match crate::cpu::encoder::gelu_tanh(x)? {
        Some(y) => Ok(y),
        None => Ok(x.gelu()?),
    }
}

/// Attention over all patches with candle, off the CPU: `q`, `k`, `v` `(n, heads, head_dim)`.
/// Heads on their own threads, as many at a time as there are threads: a 1280x720 image has
/// 3520 patches, and all 16 heads' scores at once would take 800 MB.
fn per_head_attention((q, k, v): (&Tensor, &Tensor, &Tensor), scale: f64) -> Result<Tensor> {
    use rayon::prelude::*;
    let heads = (0..q.dim(1)?)
        .into_par_iter()
        .map(|h| -> candle_core::Result<Tensor> {
            let head = |t: &Tensor| t.narrow(1, h, 1)?.squeeze(1)?.contiguous();
            let (q, k, v) = (head(q)?, head(k)?, head(v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?;
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&heads, D::Minus1)?)
}

/// Folds each 2 × 2 block of patches (consecutive rows) into one token: norm before the fold
/// (the main merger) or after it (DeepStack's), then an MLP with exact GELU.
#[derive(Debug, Clone)]
struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm_after_fold: bool,
    fold: usize,
}

impl Merger {
    fn new(cfg: &VisionConfig, norm_after_fold: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let fold = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let wide = cfg.hidden_size * fold;
        let norm_size = if norm_after_fold {
            wide
        } else {
            cfg.hidden_size
        };
        Ok(Self {
            norm: norm(norm_size, vb.pp("norm"))?,
            fc1: linear(wide, wide, vb.pp("linear_fc1"))?,
            fc2: linear(wide, cfg.out_hidden_size, vb.pp("linear_fc2"))?,
            norm_after_fold,
            fold,
        })
    }

    fn forward(&self, x: &Tensor, p: Precision) -> Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let folded = if self.norm_after_fold {
            self.norm
                .forward(&x.reshape((n / self.fold, hidden * self.fold))?)?
        } else {
            self.norm
                .forward(x)?
                .reshape((n / self.fold, hidden * self.fold))?
        };
        let hidden = self.fc1.forward(&p.input(folded)?)?.gelu_erf()?;
        Ok(self.fc2.forward(&p.input(hidden)?)?)
    }
}

/// One image's tokens for the text model.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `(tokens, text hidden)`: what replaces the image's placeholder tokens.
    pub embeddings: Tensor,
    /// DeepStack's features, one `(tokens, text hidden)` per early text layer, added after it.
    pub deepstack: Vec<Tensor>,
}

/// The tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Linear,
    /// The learned position table, `(side * side, hidden)` in f32 for the interpolation.
    pos_table: Vec<f32>,
    side: usize,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<(usize, Merger)>,
    inv_freq: Vec<f32>,
    /// From the checkpoint's dtype at load; a field so that tests can vary it.
    precision: Precision,
    cfg: VisionConfig,
    dtype: DType,
    device: Device,
}

impl VisionTower {
    /// Reads `model.visual` (as `vb`).
    pub fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, c, t, p) = (
            cfg.hidden_size,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
        );
        // The Conv3d's kernel equals its stride: a matrix product over flattened patches.
        let pe = vb.pp("patch_embed.proj");
        let weight = pe
            .get((h, c, t, p, p), "weight")?
            .reshape((h, c * t * p * p))?;
        let bias = pe.to_dtype(DType::F32).get(h, "bias")?;
        let patch_embed = Linear::from_weight(weight, Some(bias), Quantization::None)?;
        let side = (cfg.num_position_embeddings as f64).sqrt() as usize;
        let pos_table = vb
            .get((cfg.num_position_embeddings, h), "pos_embed.weight")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let merger = Merger::new(cfg, false, vb.pp("merger"))?;
        let deepstack = cfg
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(j, &block)| {
                Merger::new(cfg, true, vb.pp(format!("deepstack_merger_list.{j}")))
                    .map(|m| (block, m))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dim = h / cfg.num_heads / 2;
        let inv_freq = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / 10_000f64.powf(i as f64 / dim as f64)) as f32)
            .collect();
        Ok(Self {
            patch_embed,
            pos_table,
            side,
            blocks,
            merger,
            deepstack,
            inv_freq,
            precision: Precision {
                bf16: vb.dtype() == DType::BF16,
                mlp_rows: MLP_ROWS,
            },
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Bytes of its weights.
    pub fn weight_bytes(&self) -> usize {
        let block = |b: &Block| {
            [&b.qkv, &b.proj, &b.fc1, &b.fc2]
                .iter()
                .map(|l| l.weight_bytes())
                .sum::<usize>()
        };
        let merger = |m: &Merger| m.fc1.weight_bytes() + m.fc2.weight_bytes();
        self.patch_embed.weight_bytes()
            + self.pos_table.len() * self.dtype.size_in_bytes()
            + self.blocks.iter().map(block).sum::<usize>()
            + merger(&self.merger)
            + self.deepstack.iter().map(|(_, m)| merger(m)).sum::<usize>()
    }

    /// The learned positions bilinearly interpolated (corners aligned) from the square table to
    /// a `gh × gw` grid, in f32, one row per patch.
    fn positions(&self, cells: &[(usize, usize)], gh: usize, gw: usize) -> Result<Tensor> {
        let (side, hidden) = (self.side, self.cfg.hidden_size);
        let taps = |i: usize, n: usize| {
            let x = if n > 1 {
                i as f32 * (side - 1) as f32 / (n - 1) as f32
            } else {
                0.0
            };
            let lo = x as usize;
            (lo, (lo + 1).min(side - 1), x - lo as f32)
        };
        let mut out = Vec::with_capacity(cells.len() * hidden);
        for &(r, c) in cells {
            let (h0, h1, dh) = taps(r, gh);
            let (w0, w1, dw) = taps(c, gw);
            let corners = [
                (h0 * side + w0, (1.0 - dh) * (1.0 - dw)),
                (h0 * side + w1, (1.0 - dh) * dw),
                (h1 * side + w0, dh * (1.0 - dw)),
                (h1 * side + w1, dh * dw),
            ];
            for j in 0..hidden {
                out.push(
                    corners
                        .iter()
                        .map(|&(i, w)| self.pos_table[i * hidden + j] * w)
                        .sum::<f32>(),
                );
            }
        }
        Ok(Tensor::from_vec(out, (cells.len(), hidden), &self.device)?)
    }

    /// cos and sin `(patches, head_dim / 2)` of the 2-D rotary angles: the row's angles, then
    /// the column's.
    fn rotary(&self, cells: &[(usize, usize)]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len() * 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(cells.len() * half),
            Vec::with_capacity(cells.len() * half),
        );
        for &(r, c) in cells {
            for p in [r, c] {
                for f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let t = |v| Tensor::from_vec(v, (cells.len(), half), &self.device);
        Ok((t(cos)?, t(sin)?))
    }

    /// Encodes one image.
    pub fn encode(&self, patches: &Patches) -> Result<Encoded> {
        let [t, gh, gw] = patches.grid;
        let n = t * gh * gw;
        let pixels =
            Tensor::from_slice(&patches.values, (n, patches.values.len() / n), &self.device)?;
        let cells: Vec<(usize, usize)> = (0..t)
            .flat_map(|_| merge_block_cells(gh, gw, self.cfg.spatial_merge_size))
            .collect();
        let pos = self.positions(&cells, gh, gw)?;
        let p = self.precision;
        let mut x = (self.patch_embed.forward(&p.input(pixels)?)? + pos)?;
        let (cos, sin) = self.rotary(&cells)?;
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, (&cos, &sin), p)?;
            for (at, merger) in &self.deepstack {
                if *at == i {
                    deepstack.push(merger.forward(&x, p)?.to_dtype(self.dtype)?);
                }
            }
        }
        // The text model's dtype for what joins it.
        Ok(Encoded {
            embeddings: self.merger.forward(&x, p)?.to_dtype(self.dtype)?,
            deepstack,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_values, max_abs_diff, normal};

    /// The largest magnitude among a tensor's values.
    fn top(t: &Tensor) -> f32 {
        f32_values(t).iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// The kernels' attention over all patches is candle's per-head softmax(q kᵀ) v: in f32, and
    /// with `bf16` on the inputs rounded to bf16 (heads 64 deep, which the AMX tiles take where
    /// the CPU has them; more patches than one slice of queries), the probabilities' rounding
    /// moving each output by at most 2⁻⁹ of the largest value.
    #[test]
    fn the_kernels_attention_is_candles_per_head_attention() {
        let shape = (150, 3, 64);
        let random = |seed| normal(0.0, 1.0, shape, &Device::Cpu, seed);
        let (q, k, v) = (random(1), random(2), random(3));
        let scale = 0.125;
        let expected = per_head_attention((&q, &k, &v), scale).unwrap();
        let got = crate::cpu::encoder::attention((&q, &k, &v), scale, false)
            .unwrap()
            .expect("the kernels take f32 on the CPU");
        assert!(max_abs_diff(&got, &expected) < 1e-5);
        let rounded = |t: &Tensor| crate::cpu::encoder::bf16_values(t).unwrap().unwrap();
        let (qr, kr, vr) = (rounded(&q), rounded(&k), rounded(&v));
        assert!(max_abs_diff(&qr, &q) > 0.0, "nothing was rounded");
        let expected = per_head_attention((&qr, &kr, &vr), scale).unwrap();
        let got = crate::cpu::encoder::attention((&q, &k, &v), scale, true)
            .unwrap()
            .unwrap();
        let bound = top(&vr) / 512.0 + 1e-5;
        assert!(max_abs_diff(&got, &expected) <= bound);
    }

    /// The kernels' GELU is candle's within f32 rounding.
    #[test]
    fn the_kernels_gelu_is_candles() {
        let x = normal(0.0, 1.5, (64, 33, 3), &Device::Cpu, 5);
        let got = gelu(&x).unwrap();
        assert!(max_abs_diff(&got, &x.gelu().unwrap()) < 2e-6);
        assert!(max_abs_diff(&got, &x) > 0.1, "nothing was computed");
    }

    /// The MLP a few rows at a time gives what it gives over all rows at once, the last slice
    /// short, on the tiny checkpoint in f32 and bf16; and a bf16 checkpoint rounds its
    /// products' inputs.
    #[test]
    fn mlp_slices_change_nothing_and_bf16_rounds_inputs() {
        use crate::checkpoint::Checkpoint;
        use crate::linear::Quantization;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/qwen3-vl-tiny");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let image = std::fs::read(dir.join("../images/photo.jpg")).unwrap();
        let image = crate::images::decode(&image, &Default::default()).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let model = crate::models::qwen3_vl::Qwen3Vl::load(
                &checkpoint,
                dtype,
                Quantization::None,
                &Device::Cpu,
                &mut |_, _| {},
            )
            .unwrap();
            let patches = model.processor().patches(&image).unwrap();
            let all = model.vision().encode(&patches).unwrap();
            // A bf16 checkpoint's tower rounds its product inputs: without, it computes
            // something else (an f32 one never rounds).
            assert_eq!(model.vision().precision.bf16, dtype == DType::BF16);
            if dtype == DType::BF16 {
                let mut unrounded = model.vision().clone();
                unrounded.precision.bf16 = false;
                let other = unrounded.encode(&patches).unwrap();
                let d = max_abs_diff(&all.embeddings, &other.embeddings);
                assert!(d > 0.0, "the bf16 tower did not round its inputs");
            }
            let mut sliced = model.vision().clone();
            sliced.precision.mlp_rows = 5;
            let rows = patches.grid.iter().product::<usize>();
            assert!(rows > 10 && rows % 5 != 0, "{rows} rows");
            let got = sliced.encode(&patches).unwrap();
            for (a, b) in std::iter::once((&all.embeddings, &got.embeddings))
                .chain(all.deepstack.iter().zip(&got.deepstack))
            {
                // The products pick their kernel by row count (5 rows stream, more block or
                // take the tiles) and sum in another order: f32 rounding, which in bf16 can
                // flip a product input's rounding by one step. A slice lost or repeated
                // would move rows by their whole size.
                let bound = match dtype {
                    DType::F32 => 2e-5,
                    _ => top(a) / 128.0,
                };
                let d = max_abs_diff(a, b);
                assert!(d <= bound, "{dtype:?}: {d}");
            }
        }
    }

    /// Rounded values are bf16's: converting to bf16 and back changes none of them.
    #[test]
    fn bf16_inputs_are_bf16_values() {
        let x = normal(0.0, 0.5, (7, 5, 3), &Device::Cpu, 4);
        let r = crate::cpu::encoder::bf16_values(&x).unwrap().unwrap();
        let back = r
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_abs_diff(&r, &back), 0.0);
        assert!(max_abs_diff(&r, &x) < 2.0 * 2f32.powi(-8));
    }
}
