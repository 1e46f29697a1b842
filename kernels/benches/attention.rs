//! Decode attention over the KV cache per cached type: one query (Qwen3-0.6B's 16 heads over 8
//! key/value heads of 128) attending over every layer's cache at several depths, as one decode
//! step does, with the KV bytes it reads per second beside a streaming read of as many bytes.
//! The 8-bit rows (`kv_cache_dtype = "q8_0"`) read about half of bf16's bytes.
//!
//! Run: `cargo bench -p pio-kernels --bench attention` (`RAYON_NUM_THREADS` sets the threads);
//! `-- --depth N` measures one depth only, `-- --cache bf16|f16|q8_0` one cached type. Each
//! step runs under `keep_awake`, as the engine's do. Then one layer's prefill attention (512 new
//! queries; `-- --prefill N` measures only that, for N queries). Last, the softmax's exponentials
//! alone, and SwiGLU's SiLU (the same exponential), the kernels' against libm's, in the same run.

use pio_kernels::{
    bf16, f16, keep_awake, kv_q8, paged_attention, AttentionShape, CachedRow, PagedKv,
};

mod common;
use common::{seconds, streaming_read, CYCLED};

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

/// Qwen3-0.6B's attention: 16 query heads over 8 key/value heads of 128.
const SHAPE: AttentionShape = AttentionShape {
    heads: HEADS,
    kv_heads: KV_HEADS,
    head_dim: D,
    value_dim: D,
    scale: 0.088_388_35, // 1/√128
};

/// Seconds of one decode step's attention over `LAYERS` pools of `depth` positions, and the
/// bytes of cache it reads; each step reads the next of as many copies as fill [`CYCLED`].
fn step<T: CachedRow>(depth: usize, store: impl Fn(&[f32]) -> Vec<T>) -> (f64, usize) {
    let shape = SHAPE;
    let len = depth + 1;
    let blocks: Vec<u32> = (0..len.div_ceil(BLOCK) as u32).collect();
    let slots = blocks.len() * BLOCK;
    let bytes = LAYERS * 2 * len * KV_HEADS * T::units(D) * std::mem::size_of::<T>();
    let copies = CYCLED.div_ceil(bytes);
    let layers: Vec<(Vec<T>, Vec<T>)> = (0..LAYERS * copies)
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
    let mut steps = layers.chunks_exact(LAYERS).cycle();
    let s = seconds(5, || {
        let layers = steps.next().unwrap_or_default();
        keep_awake(|| attend(&shape, layers, &blocks, depth, &q, &mut out))
    });
    (s, bytes)
}

/// One decode step's attention: the query over every layer's pool.
fn attend<T: CachedRow>(
    shape: &AttentionShape,
    layers: &[(Vec<T>, Vec<T>)],
    blocks: &[u32],
    depth: usize,
    q: &[f32],
    out: &mut [f32],
) {
    for (k, v) in layers {
        let kv = PagedKv {
            keys: k,
            values: v,
            blocks,
            block_size: BLOCK,
        };
        paged_attention(shape, q, &kv, depth, out);
    }
}

/// One layer's prefill attention: `seq` new queries at position 0 over a bf16 cache, as a fresh
/// prompt's chunk runs, in ms and in GFLOP/s of the causal work (the half of the scores and of
/// their products with the values that the mask leaves).
fn prefill(seq: usize) {
    let shape = SHAPE;
    let blocks: Vec<u32> = (0..seq.div_ceil(BLOCK) as u32).collect();
    let slots = blocks.len() * BLOCK;
    let kv = |seed| -> Vec<bf16> {
        let x = values(slots * KV_HEADS * D, seed);
        x.iter().map(|&v| bf16::from_f32(v)).collect()
    };
    let (k, v) = (kv(1), kv(2));
    let q: Vec<f32> = values(seq * HEADS * D, 3)
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    let mut out = vec![0f32; seq * HEADS * D];
    let kv = PagedKv {
        keys: &k,
        values: &v,
        blocks: &blocks,
        block_size: BLOCK,
    };
    let s = seconds(3, || paged_attention(&shape, &q, &kv, 0, &mut out));
    let flop = 4.0 * (HEADS * D) as f64 * (seq * (seq + 1) / 2) as f64;
    println!(
        "prefill attention, {seq} queries at position 0, bf16 cache: {:.2} ms per layer, {:.1} GFLOP/s of causal work",
        s * 1e3,
        flop / s / 1e9
    );
}

/// The cached types measured, as `--cache` names them.
const CACHES: [&str; 3] = ["bf16", "f16", "q8_0"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        let i = args.iter().position(|a| a == name)?;
        Some(args.get(i + 1).cloned().unwrap_or_default())
    };
    let only = flag("--depth").map(|d| {
        d.parse::<usize>().unwrap_or_else(|_| {
            eprintln!("--depth {d:?}: expected a number of cached positions, such as 512");
            std::process::exit(2)
        })
    });
    let cache = flag("--cache");
    if let Some(c) = cache.as_deref().filter(|c| !CACHES.contains(c)) {
        eprintln!("--cache {c:?}: expected one of {CACHES:?}");
        std::process::exit(2);
    }
    if let Some(seq) = flag("--prefill") {
        return prefill(seq.parse().unwrap_or(512));
    }
    let threads = rayon::current_num_threads();
    let read = streaming_read(&vec![1u8; 512 << 20]);
    println!(
        "decode attention, {HEADS} heads over {KV_HEADS} kv heads of {D}, {LAYERS} layers, {threads} threads; streaming read {read:.1} GB/s"
    );
    println!(
        "{:>6} {:>6} {:>10} {:>9} {:>8} {:>9}",
        "depth", "cache", "ms/step", "MB/step", "GB/s", "vs bf16"
    );
    for depth in only.map_or(vec![512, 2048, 8192], |d| vec![d]) {
        let mut bf = None;
        for name in CACHES {
            if cache.as_ref().is_some_and(|c| c != name) {
                continue;
            }
            let (s, bytes) = match name {
                "bf16" => step(depth, |r| r.iter().map(|&v| bf16::from_f32(v)).collect()),
                "f16" => step(depth, |r| r.iter().map(|&v| f16::from_f32(v)).collect()),
                _ => step(depth, |r| {
                    let mut row = vec![0u8; kv_q8::row_bytes(r.len())];
                    kv_q8::quantize_row(r, &mut row);
                    row
                }),
            };
            let base = *bf.get_or_insert(s);
            println!(
                "{depth:>6} {name:>6} {:>10.3} {:>9.1} {:>8.1} {:>8.2}x",
                s * 1e3,
                bytes as f64 / 1e6,
                bytes as f64 / s / 1e9,
                base / s
            );
        }
    }
    prefill(512);
    exponentials();
    silu();
}

/// The softmax's exponentials alone, one thread, in the same run: the kernels' (`exp_shifted`,
/// at the level in use) against libm's scalar `expf`, as the attention kernels took before, over
/// one decode step's scores at depth 8192 (16 heads).
fn exponentials() {
    let scores: Vec<f32> = values(HEADS * 8192, 7).iter().map(|x| 8.0 * x).collect();
    let mut row = scores.clone();
    let mut sink = 0.0;
    let libm = seconds(20, || {
        row.copy_from_slice(&scores);
        for x in row.iter_mut() {
            *x = (*x - 8.0).exp();
            sink += *x;
        }
    });
    let ours = seconds(20, || {
        row.copy_from_slice(&scores);
        sink += pio_kernels::exp::exp_shifted(&mut row, 8.0);
    });
    let per = |s: f64| s / scores.len() as f64 * 1e9;
    println!(
        "softmax exponentials ({} scores, one thread): libm {:.2} ns each, kernels ({}) {:.2} ns each: {:.1}x{}",
        scores.len(),
        per(libm),
        pio_kernels::Level::current().name(),
        per(ours),
        libm / ours,
        if sink.is_nan() { " (NaN)" } else { "" }
    );
}

/// SwiGLU's SiLU alone, one thread, in the same run: the kernels' (`exp::silu`) against the
/// scalar `x / (1 + e^−x)` the engine took before, over a 512-token prefill chunk of Qwen3-0.6B's
/// gate (512 × 3072 values; one such chunk per layer).
fn silu() {
    let gate: Vec<f32> = values(512 * 3072, 11).iter().map(|x| 6.0 * x).collect();
    let mut row = gate.clone();
    let libm = seconds(10, || {
        row.copy_from_slice(&gate);
        for x in row.iter_mut() {
            *x /= 1.0 + (-*x).exp();
        }
    });
    let before = row.iter().sum::<f32>();
    let ours = seconds(10, || {
        row.copy_from_slice(&gate);
        pio_kernels::exp::silu(&mut row);
    });
    let per = |s: f64| s / gate.len() as f64 * 1e9;
    println!(
        "SwiGLU's SiLU ({} values, one thread): libm {:.2} ns each, kernels ({}) {:.2} ns each: {:.1}x (sums {before:.3} and {:.3})",
        gate.len(),
        per(libm),
        pio_kernels::Level::current().name(),
        per(ours),
        libm / ours,
        row.iter().sum::<f32>()
    );
}
