//! Shared inference building blocks for PIO's model plugins: linked statically into each plugin,
//! so it is not an ABI and may change freely. Model families live in `models` (a checkpoint
//! family may be served by several plugins); `runtime` is the plugin side every text model
//! shares.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod attention;
pub mod batch;
pub mod chat;
pub mod checkpoint;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod generate;
pub mod generation_config;
pub mod gguf;
pub mod guide;
pub mod images;
pub mod kv_pool;
pub mod linear;
pub mod mapping;
pub mod models;
pub mod norm;
pub mod profile;
pub mod quant_cache;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod scoring;
pub mod sequence;
pub mod serving;
pub mod single;
pub mod stop;
#[cfg(test)]
mod testing;
pub mod text;
pub mod tokenizer_info;
pub mod weights;

/// Lets candle's tensors own checkpoint pages mapped in place (see [`mapping`]). A crate linking
/// the engine with its default features cannot declare another global allocator; without
/// `mapped-weights` it may, and checkpoints are read instead.
#[cfg(feature = "mapped-weights")]
#[global_allocator]
static ALLOCATOR: mapping::Allocator = mapping::Allocator;

pub use candle_core;
pub use candle_nn;
pub use error::{EngineError, Result};
/// The plugin API, for [`text_model_plugin!`].
pub use pio_plugin_api as plugin_api;
