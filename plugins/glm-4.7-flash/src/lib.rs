//! The `glm-4.7-flash` plugin: serves Glm4MoeLiteForCausalLM checkpoints (zai-org/GLM-4.7-Flash)
//! from a Hugging Face snapshot folder; the manifest's model path decides. The model thinks
//! before it answers (`<think>…</think>`, which the host returns as `reasoning_content`) and
//! writes tool calls in GLM's `<arg_key>`/`<arg_value>` form.

use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_plugin_api::Capabilities;

pio_engine::text_model_plugin! {
    /// The plugin.
    pub struct GlmPlugin(Glm4MoeLite);
    name: "glm-4.7-flash",
    family: "Glm4MoeLiteForCausalLM",
    capabilities: Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS)
        .union(Capabilities::STRUCTURED_OUTPUT),
    tool_call_format: Some("glm47"),
    reasoning_format: Some("glm45"),
}
