//! The `qwen3-vl-2b` plugin: serves Qwen3VLForConditionalGeneration checkpoints
//! (Qwen/Qwen3-VL-2B-Instruct) from a Hugging Face snapshot folder. Chat messages carry images as
//! `image_url` parts with base64 data URLs (the daemon reads files under its image root into
//! them); the worker decodes them — never the daemon — and the vision tower turns them into the
//! text model's inputs.

use pio_engine::models::qwen3_vl::Qwen3Vl;
use pio_plugin_api::Capabilities;

pio_engine::text_model_plugin! {
    /// The plugin.
    pub struct Qwen3VlPlugin(Qwen3Vl);
    name: "qwen3-vl-2b",
    family: "Qwen3VLForConditionalGeneration",
    capabilities: Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::VISION)
        .union(Capabilities::LOGPROBS)
        .union(Capabilities::STRUCTURED_OUTPUT),
    tool_call_format: Some("hermes"),
}
