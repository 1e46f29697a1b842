//! The `qwen3-4b-instruct-2507` plugin: serves any Qwen3ForCausalLM checkpoint (Qwen3-4B-Instruct-2507,
//! Qwen3-0.6B, Qwen3-8B, ...) from a Hugging Face snapshot folder; the manifest's model path decides.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub use pio_engine::models::qwen3 as model;
pub use pio_engine::runtime::plugin_error;

use pio_plugin_api::Capabilities;

use crate::model::Qwen3;

pio_engine::text_model_plugin! {
    /// The plugin.
    pub struct Qwen3Plugin(Qwen3);
    name: "qwen3-4b-instruct-2507",
    family: "Qwen3ForCausalLM",
    capabilities: Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS)
        .union(Capabilities::STRUCTURED_OUTPUT),
    tool_call_format: Some("hermes"),
}
