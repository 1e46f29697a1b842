//! The `qwen3-4b-instruct-2507` plugin: serves any Qwen3ForCausalLM checkpoint (Qwen3-4B-Instruct-2507,
//! Qwen3-0.6B, Qwen3-8B, ...) from a Hugging Face snapshot folder; the manifest's model path decides.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub use pio_engine::models::qwen3 as model;
pub use pio_engine::runtime::plugin_error;

use pio_engine::runtime::ModelRuntime;
use pio_plugin_api::wire::{InferOutcome, InferRequest, ModelConfig, ModelInfo};
use pio_plugin_api::{export_plugin, Capabilities, PluginError, PluginImpl, Progress, Sink};

use crate::model::Qwen3;

/// The plugin.
pub struct Qwen3Plugin(ModelRuntime<Qwen3>);

impl PluginImpl for Qwen3Plugin {
    const NAME: &'static str = "qwen3-4b-instruct-2507";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILY: &'static str = "Qwen3ForCausalLM";
    const CAPABILITIES: Capabilities = Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS);

    fn new() -> Result<Self, PluginError> {
        Ok(Self(ModelRuntime::new(Some("hermes"))))
    }

    fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError> {
        self.0.supports_config(config)
    }

    fn load_model(
        &mut self,
        config: ModelConfig,
        progress: &mut Progress,
    ) -> Result<ModelInfo, PluginError> {
        self.0.load_model(&config, progress)
    }

    fn infer(&self, request: InferRequest, sink: &mut Sink) -> Result<InferOutcome, PluginError> {
        self.0.infer(&request, sink)
    }

    fn cleanup(&mut self) -> Result<(), PluginError> {
        self.0.cleanup();
        Ok(())
    }
}

export_plugin!(Qwen3Plugin);
