//! The `qwen3-coder-30b` plugin: serves Qwen3MoeForCausalLM checkpoints (Qwen3-Coder-30B-A3B-Instruct,
//! Qwen3-30B-A3B, ...) from a Hugging Face snapshot folder; the manifest's model path decides.

use pio_engine::models::qwen3::Qwen3Moe;
use pio_plugin_api::Capabilities;

pio_engine::text_model_plugin! {
    /// The plugin.
    pub struct Qwen3CoderPlugin(Qwen3Moe);
    name: "qwen3-coder-30b",
    family: "Qwen3MoeForCausalLM",
    capabilities: Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS)
        .union(Capabilities::STRUCTURED_OUTPUT),
    tool_call_format: Some("qwen3_coder"),
}
