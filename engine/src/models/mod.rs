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
