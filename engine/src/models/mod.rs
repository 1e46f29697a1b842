//! Model families, each a config struct, its layers and a forward pass, in the manner of
//! candle-transformers. Plugins pick one and serve it; the parts two families share (the SwiGLU
//! MLP, routed experts, rotary positions, the output head) live beside them.

pub mod glm4_moe_lite;
pub mod qwen3;
pub mod qwen3_vl;

mod experts;
mod head;
mod mlp;
mod outputs;
mod rotary;

pub use rotary::RopeParameters;

/// Why `max_position_embeddings` cannot be a context length (`None`: it can): 0 refuses every
/// prompt, blaming the client, and past `u32::MAX` the pool's sizing overflows.
pub(crate) fn context_fault(context: usize) -> Option<String> {
    (!(1..=u32::MAX as usize).contains(&context)).then(|| {
        format!(
            "expected the context length, from 1 to {}, found {context}",
            u32::MAX
        )
    })
}

/// The most decoder layers a config may name: several times the deepest published model's
/// (~128), and few enough that the per-layer tables built before the weights are read stay small.
pub(crate) const MAX_LAYERS: usize = 1024;

/// Why `num_hidden_layers` cannot be a layer count (`None`: it can): 0 is no model, and a
/// count in the billions was allocated per layer before a weight said otherwise.
pub(crate) fn layers_fault(layers: usize) -> Option<String> {
    (!(1..=MAX_LAYERS).contains(&layers)).then(|| {
        format!("expected the number of decoder layers, from 1 to {MAX_LAYERS}, found {layers}")
    })
}

/// The residual stream plus a block's output: the engine's half-precision add on the CPU,
/// candle's elsewhere.
pub(crate) fn residual(
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    match crate::cpu::add(x, y)? {
        Some(sum) => Ok(sum),
        None => x + y,
    }
}
