//! Qwen3-VL (`Qwen3VLForConditionalGeneration`), mirroring transformers' `modeling_qwen3_vl.py`:
//! a vision tower whose merged patches replace the image placeholders of a dense Qwen3 text model
//! with interleaved multimodal rotary positions (M-RoPE), and DeepStack features from early vision
//! blocks added after the first text layers.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::batch::{Batch, Output, Positions, Splice};
use crate::candle_core::{DType, Device};
use crate::candle_nn::Embedding;
use crate::checkpoint::Checkpoint;
use crate::generate::{CausalLm, Media};
use crate::images::RgbImage;
use crate::kv_pool::{KvPool, TokenLayout};
use crate::linear::Quantization;
use crate::models::head::{self, load_stack, tensor_bytes, Head, Stack};
use crate::models::qwen3::DecoderLayer;
use crate::models::rotary::Rotary;
use crate::norm::Residual;
use crate::{EngineError, Result};

mod config;
mod encodings;
mod inputs;
mod processor;
mod vision;

pub use config::{Config, VisionConfig};
pub use inputs::{expand, rope_index, ImageInput};
pub use processor::{smart_resize, Patches, Processor};
pub use vision::{Encoded, VisionTower};

/// The model.
#[derive(Debug, Clone)]
pub struct Qwen3Vl {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    head: Head,
    rotary: Rotary,
    mrope_section: [usize; 3],
    vision: VisionTower,
    processor: Processor,
    image_token: u32,
    context: usize,
    device: Device,
    encodings: Arc<encodings::Encodings>,
}

/// The most bytes of recent vision-tower outputs kept for reuse (a 1280 × 720 photo's is ~30 MB
/// in f32).
const ENCODINGS_BUDGET: usize = 128 << 20;

impl Qwen3Vl {
    /// Loads a Qwen3VLForConditionalGeneration from `checkpoint` (its text model's linear weights
    /// quantized as asked; the vision tower stays in `dtype`).
    pub fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        checkpoint.expect_architecture("Qwen3VLForConditionalGeneration")?;
        let cfg = Config::load(checkpoint)?;
        let processor = Processor::load(checkpoint)?;
        let merge = cfg.vision.spatial_merge_size;
        if processor.patch_size != cfg.vision.patch_size
            || processor.merge_size != merge
            || processor.temporal_patch_size != cfg.vision.temporal_patch_size
        {
            return Err(EngineError::BadField {
                path: checkpoint.path("preprocessor_config.json"),
                field: "patch_size".into(),
                reason: "patch_size, merge_size and temporal_patch_size must match config.json's vision_config".into(),
            });
        }
        let text = &cfg.text;
        check_min_pixels(checkpoint, &processor, text.max_position_embeddings)?;
        let (theta, scale) = text.rope(checkpoint)?;
        let vb = checkpoint.weights(dtype, device)?;
        let ends = text.ends();
        let Stack {
            embed_tokens,
            layers,
            head,
        } = load_stack(
            checkpoint,
            &vb,
            "model.language_model",
            ends,
            quantization,
            progress,
            |i, vb| DecoderLayer::new(text, i, quantization, vb),
        )?;
        let vision = VisionTower::load(&cfg.vision, vb.pp("model.visual"))
            .map_err(|e| checkpoint.weight_error(e))?;
        Ok(Self {
            embed_tokens,
            layers,
            head,
            rotary: Rotary::new(text.head_dim(), theta, scale, dtype, device),
            mrope_section: cfg.mrope_section,
            vision,
            processor,
            image_token: cfg.image_token_id,
            context: text.max_position_embeddings,
            device: device.clone(),
            encodings: Arc::new(encodings::Encodings::new(ENCODINGS_BUDGET)),
        })
    }

    /// Bytes of all weights: text layers, embedding, head (unless tied) and vision tower.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(DecoderLayer::weight_bytes)
            .sum::<usize>()
            + tensor_bytes(self.embed_tokens.embeddings())
            + self.head.weight_bytes()
            + self.vision.weight_bytes()
    }

    /// The image processor (`preprocessor_config.json`).
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// The vision tower.
    pub fn vision(&self) -> &VisionTower {
        &self.vision
    }

    /// How many images' tower outputs were reused instead of computed again.
    pub fn encodings_reused(&self) -> u64 {
        self.encodings.reused()
    }

    /// Turns `prompt` (one image placeholder per image, in order) and its `images` into the
    /// engine's inputs: images run through the processor and the vision tower here, on the
    /// caller's thread, before the request joins a batch.
    pub fn prepare(
        &self,
        prompt: Vec<u32>,
        images: &[RgbImage],
    ) -> Result<(Vec<u32>, Option<Media>)> {
        self.prepare_until(prompt, images, &|| false)
    }

    /// [`Qwen3Vl::prepare`], stopping before the next image once `cancelled` says so.
    pub fn prepare_until(
        &self,
        prompt: Vec<u32>,
        images: &[RgbImage],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<u32>, Option<Media>)> {
        self.check_placeholders(&prompt, images)?;
        if images.is_empty() {
            return Ok((prompt, None));
        }
        let merge = self.processor.merge_size;
        let inputs = images
            .iter()
            .enumerate()
            .map(|(index, image)| {
                if cancelled() {
                    return Err(EngineError::Cancelled(
                        "cancelled while its images were encoded".into(),
                    ));
                }
                let patches = (self.processor.patches(image))
                    .map_err(|error| EngineError::Image { index, error })?;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                patches.grid.hash(&mut h);
                patches.values.iter().for_each(|v| v.to_bits().hash(&mut h));
                let content = h.finish();
                let [t, gh, gw] = patches.grid;
                Ok(ImageInput {
                    grid: [t, gh / merge, gw / merge],
                    encoded: (self.encodings)
                        .get_or_encode(content, || self.vision.encode(&patches))?,
                    content,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (prompt, media) = expand(&prompt, self.image_token, inputs);
        Ok((prompt, Some(media)))
    }

    /// The token ids [`Qwen3Vl::prepare`] gives for `prompt` and `images`, from the images'
    /// sizes alone (no vision tower run): what `/tokenize` counts.
    pub fn token_ids(&self, prompt: Vec<u32>, images: &[RgbImage]) -> Result<Vec<u32>> {
        self.check_placeholders(&prompt, images)?;
        let (p, m) = (self.processor.patch_size, self.processor.merge_size);
        let mut counts = Vec::with_capacity(images.len());
        for (index, image) in images.iter().enumerate() {
            let (h, w) = (self.processor.target_size(image.height, image.width))
                .map_err(|error| EngineError::Image { index, error })?;
            counts.push((h as usize / p) * (w as usize / p) / (m * m));
        }
        let mut counts = counts.into_iter();
        let mut out = Vec::with_capacity(prompt.len());
        for id in prompt {
            let n = if id == self.image_token {
                counts.next().unwrap_or(1)
            } else {
                1
            };
            out.extend(std::iter::repeat_n(id, n));
        }
        Ok(out)
    }

    /// One placeholder per image, or an error saying where images go.
    fn check_placeholders(&self, prompt: &[u32], images: &[RgbImage]) -> Result<()> {
        let pads = prompt.iter().filter(|&&t| t == self.image_token).count();
        if pads != images.len() {
            return Err(EngineError::InvalidInput(format!(
                "the prompt holds {pads} image placeholders (token {}) for {} images: send images as image parts of user (or tool) messages, which the chat template places (it leaves out those of system and assistant messages), not as placeholder text or token ids",
                self.image_token,
                images.len()
            )));
        }
        Ok(())
    }

    /// Every new row's (temporal, height, width) position, checking the batch's shape.
    fn positions(&self, batch: &Batch<'_>) -> Result<Vec<[u32; 3]>> {
        let mut out = Vec::with_capacity(batch.rows());
        for seq in &batch.seqs {
            let end = head::extent(seq, self.context)?;
            match seq.positions {
                Positions::Linear => out.extend((seq.start..end).map(|p| [p as u32; 3])),
                Positions::Sections(p) if p.len() == seq.tokens.len() => out.extend(p),
                Positions::Sections(p) => {
                    return Err(EngineError::Internal(format!(
                        "{} positions for {} new tokens",
                        p.len(),
                        seq.tokens.len()
                    )))
                }
            }
            if seq
                .splices
                .iter()
                .any(|s| s.at + s.len() > seq.tokens.len())
            {
                return Err(EngineError::Internal(
                    "an embedding splice past a sequence's new tokens".into(),
                ));
            }
        }
        Ok(out)
    }
}

/// Refuses a `min_pixels` whose smallest image alone fills the context: every image, however
/// small, is scaled up to it, and the resize would allocate for it before any length check.
fn check_min_pixels(checkpoint: &Checkpoint, processor: &Processor, context: usize) -> Result<()> {
    let factor = (processor.patch_size * processor.merge_size) as u64;
    let tokens = processor.min_pixels / (factor * factor);
    if tokens >= context as u64 {
        return Err(EngineError::BadField {
            path: checkpoint.path("preprocessor_config.json"),
            field: "min_pixels".into(),
            reason: format!(
                "{} pixels make every image at least {tokens} tokens, no fewer than the model's context of {context} tokens (config.json's max_position_embeddings): expected a minimum an image fits the context with, such as 65536",
                processor.min_pixels
            ),
        });
    }
    Ok(())
}

/// Every splice of `batch` with the row it starts at among the batch's new rows.
fn splice_rows<'a>(batch: &'a Batch<'_>) -> Vec<(usize, &'a Splice)> {
    let mut rows = Vec::new();
    let mut offset = 0;
    for seq in &batch.seqs {
        rows.extend(seq.splices.iter().map(|s| (offset + s.at, s)));
        offset += seq.tokens.len();
    }
    rows
}

impl CausalLm for Qwen3Vl {
    fn kv_layout(&self) -> TokenLayout {
        let (kv_heads, head_dim) = self.layers.first().map_or((0, 0), DecoderLayer::kv_shape);
        TokenLayout::keys_values(self.layers.len(), kv_heads, head_dim)
    }

    fn kv_dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Output>> {
        let positions = self.positions(batch)?;
        let splices = splice_rows(batch);
        let mut x = head::embed(&self.embed_tokens, batch, &self.device)?;
        for &(row, s) in &splices {
            x = x.slice_scatter(&s.values.unsqueeze(0)?, 1, row)?;
        }
        let mut x = Residual::new(x);
        let angles = self.rotary.angles_mrope(&positions, self.mrope_section)?;
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(&mut x, &angles, batch, pool, i)?;
            // DeepStack: early vision features join the image rows after the first layers.
            for &(row, s) in &splices {
                if let Some(deep) = s.deep.get(i) {
                    let rows = x.rows()?;
                    let sum = (rows.narrow(1, row, s.len())? + deep.unsqueeze(0)?)?;
                    x = Residual::new(rows.slice_scatter(&sum, 1, row)?);
                }
            }
        }
        self.head.logits(&x.into_rows()?, batch)
    }

    fn context_length(&self) -> usize {
        self.context
    }
}

impl crate::runtime::LoadModel for Qwen3Vl {
    fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Qwen3Vl::load(checkpoint, dtype, quantization, device, progress)
    }

    fn weight_bytes(&self) -> Option<u64> {
        Some(Qwen3Vl::weight_bytes(self) as u64)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.embed_tokens.embeddings().dims()[0])
    }

    fn step_bytes(&self) -> Option<u64> {
        // A generated token runs the text model only; the vision tower ran at prefill.
        let layers = self
            .layers
            .iter()
            .map(DecoderLayer::step_bytes)
            .sum::<usize>();
        Some((layers + self.head.step_bytes()) as u64)
    }

    fn prepare(
        &self,
        prompt: Vec<u32>,
        images: &[RgbImage],
    ) -> Result<(Vec<u32>, Option<Arc<Media>>)> {
        let (prompt, media) = Qwen3Vl::prepare(self, prompt, images)?;
        Ok((prompt, media.map(Arc::new)))
    }

    fn prepare_until(
        &self,
        prompt: Vec<u32>,
        images: &[RgbImage],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<u32>, Option<Arc<Media>>)> {
        let (prompt, media) = Qwen3Vl::prepare_until(self, prompt, images, cancelled)?;
        Ok((prompt, media.map(Arc::new)))
    }

    fn token_ids(&self, prompt: Vec<u32>, images: &[RgbImage]) -> Result<Vec<u32>> {
        Qwen3Vl::token_ids(self, prompt, images)
    }
}
