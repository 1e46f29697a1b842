//! Where streaming the weights stops beating the packed GEMM: `matmul` (which picks its path by
//! the number of rows) against `matmul_rows` (always the GEMM) for 1 to 32 activation rows, on a
//! Qwen3-0.6B-sized projection (1024 → 3072), f32 and bf16 weights, all threads of rayon's pool.
//! From 8 rows bf16 weights take AMX tiles where the CPU has them (`PIO_KERNELS=avx512` turns
//! them off): the right column is then the f32 GEMM they replace.
//!
//! First, decode from memory: one activation row against weights cycled through far more bytes
//! than any cache holds, as GB/s of weights beside a plain streaming read of the same bytes
//! (`-- --decode` stops after it).
//!
//! Last, a prompt's products at larger shapes (`-- --prefill` runs only those; `--rows N` sets
//! the prompt's length, 512 by default).
//!
//! Run: `cargo bench -p pio-kernels --bench matmul` (`RAYON_NUM_THREADS` sets the threads).

use std::time::Instant;

use pio_kernels::{bf16, keep_awake, matmul, matmul_rows, Element, WeightRows};

mod common;
use common::{seconds, streaming_read, CYCLED};

const K: usize = 1024;
const N: usize = 3072;

/// Weights the GEMM path widens itself.
struct Rows<'a, T>(&'a [T]);

impl<T: Element> WeightRows for Rows<'_, T> {
    fn as_f32(&self) -> Option<&[f32]> {
        T::as_f32(self.0)
    }
    fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]) {
        T::widen(&self.0[rows.start * k..rows.end * k], out);
    }
}

/// GFLOP/s of `f` on `m` rows, best of a few runs.
fn gflops(m: usize, mut f: impl FnMut()) -> f64 {
    f();
    let reps = (64 / m).max(4);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    2.0 * (m * K * N) as f64 / best / 1e9
}

fn run<T: Element>(name: &str, w: &[T]) {
    println!("{name} weights, {K} → {N}: GFLOP/s (matmul's choice | always GEMM)");
    for m in [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 512] {
        // bf16 values, as a bf16 model's activations are (the AMX path takes only those).
        let x: Vec<f32> = (0..m * K)
            .map(|i| bf16::from_f32((i % 13) as f32 * 0.01).to_f32())
            .collect();
        let mut out = vec![0f32; m * N];
        let chosen = gflops(m, || matmul(&x, w, m, K, N, &mut out));
        let gemm = gflops(m, || matmul_rows(&x, &Rows(w), m, K, N, &mut out));
        println!("  m = {m:>2}: {chosen:>7.1} | {gemm:>7.1}");
    }
}

/// One activation row against `CYCLED` of `T` weights, matrix after matrix.
fn decode<T: Element>(name: &str, value: impl Fn(usize) -> T) {
    let size = std::mem::size_of::<T>();
    let copies = CYCLED / (K * N * size);
    let w: Vec<T> = (0..K * N * copies).map(value).collect();
    // SAFETY: the elements are plain numbers; the read only sums their bytes.
    let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * size) };
    let read = streaming_read(bytes);
    let x: Vec<f32> = (0..K).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut out = vec![0f32; N];
    let mut next = 0;
    // As the engine runs a decode step: on a pool thread, the others kept awake between products.
    let s = keep_awake(|| {
        seconds(copies, || {
            let m = &w[(next % copies) * K * N..][..K * N];
            matmul(&x, m, 1, K, N, &mut out);
            next += 1;
        })
    });
    let gbs = (K * N * size) as f64 / s / 1e9;
    println!(
        "{name} decode from memory: {gbs:>5.1} GB/s of weights = {:>3.0}% of a streaming read ({read:.1} GB/s)",
        100.0 * gbs / read
    );
}

/// Qwen3-0.6B's and Qwen3-4B's MLP shapes, `(k, n)`.
const PREFILL_SHAPES: [(usize, usize); 4] =
    [(1024, 3072), (3072, 1024), (2560, 9728), (9728, 2560)];

/// A prompt's products on bf16 weights (the AMX path where the CPU has it) at 512 rows, whose
/// weight panels outgrow L1 and whose activations outgrow L2 at the larger depths; beside them
/// PyTorch's bf16 `linear` on the same shapes in the same run (`tests/bench/torch_linear.py`),
/// where python3 has torch.
fn prefill() {
    // `--rows N`: another prompt length (a vision tower's 1280×720 image is 3,520 patches).
    let args: Vec<String> = std::env::args().collect();
    let m = (args.iter().position(|a| a == "--rows"))
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(512);
    let torch = torch_linear(m);
    println!("bf16 prefill, {m} rows: GFLOP/s (matmul's choice | always GEMM | PyTorch's linear)");
    for (i, &(k, n)) in PREFILL_SHAPES.iter().enumerate() {
        let w: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32(((i % 17) as f32 - 8.0) * 0.01))
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| bf16::from_f32((i % 13) as f32 * 0.01).to_f32())
            .collect();
        let mut out = vec![0f32; m * n];
        let flop = 2.0 * (m * k * n) as f64;
        let chosen = flop / seconds(3, || matmul(&x, &w, m, k, n, &mut out)) / 1e9;
        let gemm = flop / seconds(1, || matmul_rows(&x, &Rows(&w), m, k, n, &mut out)) / 1e9;
        let reference = torch.get(i).map_or("-".to_string(), |g| format!("{g:.1}"));
        println!("  {k:>5} → {n:>5}: {chosen:>7.1} | {gemm:>7.1} | {reference:>7}");
    }
}

/// PyTorch's GFLOP/s for [`PREFILL_SHAPES`] at `m` rows on as many threads as rayon's pool;
/// empty (and a note) where python3 or torch is missing.
fn torch_linear(m: usize) -> Vec<f64> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/bench/torch_linear.py"
    );
    let shapes = PREFILL_SHAPES.iter().map(|(k, n)| format!("{k}:{n}"));
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(rayon::current_num_threads().to_string())
        .arg(m.to_string())
        .args(shapes)
        .stderr(std::process::Stdio::null())
        .output();
    let figures: Vec<f64> = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if figures.is_empty() {
        println!("(no PyTorch figures: pip install -r tests/fixtures/requirements.txt)");
    }
    figures
}

fn main() {
    if std::env::args().any(|a| a == "--prefill") {
        return prefill();
    }
    println!("{K} → {N}, {} threads", rayon::current_num_threads());
    decode("bf16", |i| bf16::from_f32(((i % 17) as f32 - 8.0) * 0.01));
    decode("f32", |i| ((i % 17) as f32 - 8.0) * 0.01);
    if std::env::args().any(|a| a == "--decode") {
        return;
    }
    let w: Vec<f32> = (0..K * N).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    run("f32", &w);
    let w: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    run("bf16", &w);
    prefill();
}
