//! PIO's CPU kernels: the hot path of inference on plain slices, with no tensor library around.
//!
//! - [`matmul`]: `y = x Wᵀ` for weights stored as f32, bf16 or f16 and f32 activations. A few
//!   rows (decode) stream the weights once through SIMD dot products, converting in registers;
//!   many rows (prefill) go through a packed, cache-blocked GEMM (`matrixmultiply`).
//!   [`matmul_stacked`] takes the weights as parts lying apart ([`StackedRows`]: a layer stacked
//!   from several checkpoint tensors, multiplied without copying them together).
//! - [`quant`]: the same for weights in ggml's block formats (Q8_0, Q4_0, Q4_K, Q6_K), with the
//!   activations quantized to 8 bits once per product and integer dot products.
//! - [`attention`]: causal grouped-query attention of new queries over a paged, position-major KV
//!   pool read through a sequence's block table, without copying or repeating keys and values;
//!   decode splits the positions over threads (flash-decoding); the pool holds f32, bf16, f16 or
//!   the Q8_0 rows of [`kv_q8`].
//! - [`convert`]: whole activations between f32 and bf16 or f16; [`norm`]: RMSNorm as candle's.
//!
//! SIMD paths (AVX2 + FMA, F16C for f16) are chosen at run time; every kernel has a portable
//! fallback that the tests check against the same reference. Work is split over rayon's global
//! pool (the one candle uses), so `RAYON_NUM_THREADS` bounds both.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
pub mod attention;
pub mod convert;
mod element;
pub mod exp;
pub mod kv_q8;
pub mod matmul;
pub mod norm;
mod parallel;
pub mod quant;
mod simd;
pub mod stacked;

pub use attention::{
    full_attention, paged_attention, AttentionShape, CachedRow, PagedKv, Probabilities,
};
pub use element::Element;
pub use half::{bf16, f16};
pub use matmul::{matmul, matmul_rows, matmul_stacked, WeightRows};
pub use parallel::keep_awake;
pub use quant::{
    dequantize, packed_matmul, quantized_matmul, Format, PackedMatrix, QuantMatrix, QuantizedRows,
    RmsNormSpec,
};
pub use simd::Level;
pub use stacked::StackedRows;

#[cfg(test)]
mod test_data {
    use rand::{Rng, SeedableRng};

    /// `n` reproducible values in [-1, 1).
    pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// [`data`] rounded to bf16 values, as a bf16 model's activations are.
    pub(crate) fn bf16_values(n: usize, seed: u64) -> Vec<f32> {
        data(n, seed)
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    }
}
