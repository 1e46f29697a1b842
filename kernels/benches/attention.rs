//! Decode attention over the KV cache per cached type: one query (Qwen3-0.6B's 16 heads over 8
//! key/value heads of 128) attending over every layer's cache at several depths, as one decode
//! step does, with the KV bytes it reads per second beside a streaming read of as many bytes.
//! The 8-bit rows (`kv_cache_dtype = "q8_0"`) read about half of bf16's bytes.
//!
//! Run: `cargo bench -p pio-kernels --bench attention` (`RAYON_NUM_THREADS` sets the threads).

use pio_kernels::{bf16, f16, kv_q8, paged_attention, AttentionShape, CachedRow, PagedKv};

mod common;
use common::{seconds, streaming_read};

const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const D: usize = 128;
const LAYERS: usize = 28;
const BLOCK: usize = 16;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8388608.0 - 1.0
        })
        .collect()
}

/// Seconds of one decode step's attention over `LAYERS` pools of `depth` positions, and the
/// bytes of cache it reads.
fn step<T: CachedRow>(depth: usize, store: impl Fn(&[f32]) -> Vec<T>) -> (f64, usize) {
    let shape = AttentionShape {
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: D,
        value_dim: D,
        scale: 1.0 / (D as f32).sqrt(),
    };
    let len = depth + 1;
    let blocks: Vec<u32> = (0..len.div_ceil(BLOCK) as u32).collect();
    let slots = blocks.len() * BLOCK;
    let layers: Vec<(Vec<T>, Vec<T>)> = (0..LAYERS)
        .map(|l| {
            let kv = |seed| {
                let x = values(slots * KV_HEADS * D, seed);
                x.chunks(D).flat_map(&store).collect::<Vec<T>>()
            };
            (kv(2 * l as u32), kv(2 * l as u32 + 1))
        })
        .collect();
    let q = values(HEADS * D, 99);
    let mut out = vec![0f32; HEADS * D];
    let s = seconds(5, || {
        for (k, v) in &layers {
            let kv = PagedKv {
                keys: k,
                values: v,
                blocks: &blocks,
                block_size: BLOCK,
            };
            paged_attention(&shape, &q, &kv, depth, &mut out);
        }
    });
    let bytes = LAYERS * 2 * len * KV_HEADS * T::units(D) * std::mem::size_of::<T>();
    (s, bytes)
}

fn main() {
    let threads = rayon::current_num_threads();
    let read = streaming_read(&vec![1u8; 512 << 20]);
    println!(
        "decode attention, {HEADS} heads over {KV_HEADS} kv heads of {D}, {LAYERS} layers, {threads} threads; streaming read {read:.1} GB/s"
    );
    println!(
        "{:>6} {:>6} {:>10} {:>9} {:>8} {:>9}",
        "depth", "cache", "ms/step", "MB/step", "GB/s", "vs bf16"
    );
    for depth in [512, 2048, 8192] {
        let bf = step(depth, |r| r.iter().map(|&v| bf16::from_f32(v)).collect());
        let half = step(depth, |r| r.iter().map(|&v| f16::from_f32(v)).collect());
        let q8 = step(depth, |r| {
            let mut row = vec![0u8; kv_q8::row_bytes(r.len())];
            kv_q8::quantize_row(r, &mut row);
            row
        });
        for (name, (s, bytes)) in [("bf16", bf), ("f16", half), ("q8_0", q8)] {
            println!(
                "{depth:>6} {name:>6} {:>10.3} {:>9.1} {:>8.1} {:>8.2}x",
                s * 1e3,
                bytes as f64 / 1e6,
                bytes as f64 / s / 1e9,
                bf.0 / s
            );
        }
    }
}
