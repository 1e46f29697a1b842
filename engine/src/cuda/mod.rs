//! The engine's own GPU kernels (the `cuda` feature): attention that reads each sequence's keys
//! and values through its block table in place, for a step's decode rows and short prompt chunks
//! in one launch (`paged`); the KV pool's row writes; a decoder layer's small steps fused
//! (`fused`); a sparse layer's routed experts in three launches (`experts`); a decode step's
//! projections (`gemv`); each row's best logits for a top-k sampler (`top_k`). Each source is
//! compiled by NVRTC on first use, for the device at hand, behind `common.cuh`.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::nvrtc;

pub mod experts;
pub mod fused;
pub mod gemv;
mod kv_write;
mod launch;
mod paged;
mod switch;
pub mod top_k;
pub use kv_write::scatter_rows;
pub(crate) use launch::{view, MAX_GRID_Y};
pub use paged::{paged_attention, takes};
pub use switch::Switch;

/// The engine's kernels wherever candle has an equivalent: the fused layer steps, prompt chunks'
/// attention, the routed experts, few-row projections (decode attention, the KV writes, the
/// arg-max and top-k always run). On unless `PIO_GPU_KERNELS=candle`: candle's operations, to
/// compare or to rule the kernels out.
pub static KERNELS: Switch = Switch::new("PIO_GPU_KERNELS", "candle");

/// What every source starts with.
const COMMON: &str = include_str!("common.cuh");

/// The PTX of `source` behind [`COMMON`], compiled once per process into `cell` (or the
/// compiler's message).
fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    name: &str,
    source: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        let opts = nvrtc::CompileOptions {
            use_fast_math: Some(true),
            name: Some(name.into()),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{source}"), opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling {name}: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}
