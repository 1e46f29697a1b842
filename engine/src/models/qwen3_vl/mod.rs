//! Qwen3-VL (`Qwen3VLForConditionalGeneration`), mirroring transformers' `modeling_qwen3_vl.py`:
//! a vision tower whose merged patches replace the image placeholders of a dense Qwen3 text model
//! with interleaved multimodal rotary positions (M-RoPE), and DeepStack features from early vision
//! blocks added after the first text layers.

mod config;
mod processor;
mod vision;

pub use config::{Config, VisionConfig};
pub use processor::{smart_resize, Patches, Processor};
pub use vision::{Encoded, VisionTower};
