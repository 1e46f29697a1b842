//! The `qwen3-coder-30b` plugin: serves Qwen3MoeForCausalLM checkpoints (Qwen3-Coder-30B-A3B-Instruct,
//! Qwen3-30B-A3B, ...) from a Hugging Face snapshot folder; the manifest's model path decides.

use pio_engine::models::qwen3::Qwen3Moe;
use pio_engine::runtime::ModelRuntime;
use pio_plugin_api::wire::{InferOutcome, InferRequest, ModelConfig, ModelInfo};
use pio_plugin_api::{export_plugin, Capabilities, PluginError, PluginImpl, Progress, Sink};

/// The plugin.
pub struct Qwen3CoderPlugin(ModelRuntime<Qwen3Moe>);

impl PluginImpl for Qwen3CoderPlugin {
    const NAME: &'static str = "qwen3-coder-30b";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILY: &'static str = "Qwen3MoeForCausalLM";
    const CAPABILITIES: Capabilities = Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS);

    fn new() -> Result<Self, PluginError> {
        Ok(Self(ModelRuntime::new(Some("qwen3_coder"))))
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

export_plugin!(Qwen3CoderPlugin);
