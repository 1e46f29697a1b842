//! Helpers the model benchmarks share (included by path from each plugin's bench).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root, from a plugin crate's manifest directory.
pub fn repo_root(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("../..")
}

fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// This process's peak resident memory, bytes.
pub fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// This process's resident memory now, bytes.
pub fn rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// A number from one of the JSON lines the measurements print.
pub fn field(line: &str, key: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v[key].as_f64())
        .unwrap_or(f64::NAN)
}

/// Generates a random checkpoint of `shape` into `dir` with transformers, once.
pub fn ensure_checkpoint(root: &Path, dir: &Path, shape: &[&str]) {
    if dir.join("config.json").is_file() {
        return;
    }
    eprintln!("generating {} with transformers (once)...", dir.display());
    let ok = Command::new("python3")
        .arg(root.join("tests/bench/make_checkpoint.py"))
        .arg(dir)
        .args(shape)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "make_checkpoint.py failed: pip install -r tests/fixtures/requirements.txt"
    );
}

/// Runs one of the reference scripts in tests/bench/ with `args`: its JSON lines.
pub fn reference_script(root: &Path, script: &str, args: &[String]) -> Vec<String> {
    let out = Command::new("python3")
        .arg(root.join("tests/bench").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    if !out.status.success() {
        eprintln!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// What a reference engine runs: the same workload as ours.
pub struct Workload<'a> {
    /// Prompt tokens.
    pub prompt: usize,
    /// Greedy decode steps after the prompt.
    pub decode: usize,
    /// Threads.
    pub threads: usize,
    /// Comma-separated dtypes, e.g. `f32,bf16`.
    pub dtypes: &'a str,
    /// Also decode after a prompt this long (0: not measured).
    pub depth: usize,
    /// Also decode this many prompts at once (1: not measured).
    pub streams: usize,
}

impl Workload<'_> {
    /// The scripts' trailing arguments: PROMPT DECODE THREADS DTYPES DEPTH STREAMS.
    fn args(&self) -> [String; 6] {
        [
            self.prompt.to_string(),
            self.decode.to_string(),
            self.threads.to_string(),
            self.dtypes.to_string(),
            self.depth.to_string(),
            self.streams.to_string(),
        ]
    }
}

/// Runs transformers on `dir`: one JSON line per dtype.
pub fn transformers(root: &Path, dir: &Path, work: &Workload) -> Vec<String> {
    let mut args = vec![dir.display().to_string()];
    args.extend(work.args());
    reference_script(root, "transformers_bench.py", &args)
}

/// llama.cpp's `llama-bench`: `PIO_LLAMA_BENCH`, else where `tests/bench/build_llama_cpp.sh`
/// puts it; `None` when neither exists (the comparison is optional: llama.cpp is not a
/// dependency).
pub fn llama_bench(root: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PIO_LLAMA_BENCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/llama.cpp/bin/llama-bench"));
    path.is_file().then_some(path)
}

/// Runs llama.cpp's `bench` on `dir` (converted to GGUF once per dtype): one JSON line per dtype.
pub fn llama_cpp(root: &Path, bench: &Path, dir: &Path, work: &Workload) -> Vec<String> {
    let mut args = vec![dir.display().to_string(), bench.display().to_string()];
    args.extend(work.args());
    reference_script(root, "llama_cpp_bench.py", &args)
}

/// Decoder layers of a reduced-depth benchmark checkpoint: `PIO_BENCH_LAYERS`, default 4.
pub fn bench_layers() -> usize {
    std::env::var("PIO_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Bytes in GiB.
pub fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

/// Loads the checkpoint in `dir` as `M` in bf16, its linear layers stored as `mode` says (`bf16`,
/// `q8`, `q4`; `MODE+cache`: through the quantization cache in [`quantization_cache_dir`], as the
/// daemon's `quantization_cache` does); returns it and the seconds loading took (writing the
/// cache included).
pub fn load_timed<M: pio_engine::runtime::LoadModel>(dir: &Path, mode: &str) -> (M, f64) {
    use pio_engine::linear::Quantization;
    // `MODE+read`: every tensor read into memory of its own, none mapped (`mmap = false`).
    let (mode, read) = match mode.strip_suffix("+read") {
        Some(mode) => (mode, true),
        None => (mode, false),
    };
    let (mode, cached) = match mode.strip_suffix("+cache") {
        Some(mode) => (mode, true),
        None => (mode, false),
    };
    let quantization = match mode {
        "q8" => Quantization::Q8,
        "q4" => Quantization::Q4,
        _ => Quantization::None,
    };
    // `gguf-KIND`: the GGUF file llama.cpp's side of the bench made beside the checkpoint
    // (`DIR.KIND.gguf`), loaded as stored.
    let path = match mode.strip_prefix("gguf-") {
        Some(kind) => gguf_path(dir, kind),
        None => dir.to_owned(),
    };
    let t = std::time::Instant::now();
    let mut checkpoint = pio_engine::checkpoint::Checkpoint::open(&path)
        .expect("checkpoint")
        .with_mapping(!read);
    if cached {
        let cache = quantization_cache_dir(dir);
        std::fs::create_dir_all(&cache).expect("cache folder");
        checkpoint = checkpoint
            .with_quantization_cache(&cache, quantization.name())
            .expect("quantization cache");
    }
    let model = M::load(
        &checkpoint,
        pio_engine::candle_core::DType::BF16,
        quantization,
        &pio_engine::candle_core::Device::Cpu,
        &mut |_, _| {},
    )
    .expect("load");
    if let Some(cache) = checkpoint.quantization_cache() {
        cache.finish().expect("write the quantization cache");
    }
    (model, t.elapsed().as_secs_f64())
}

/// Loads `dir` in `mode` (see [`load_timed`]) and prints the time and memory: a bench's
/// `--load MODE`, run once per mode in turn to compare them.
pub fn print_load<M: pio_engine::runtime::LoadModel>(dir: &Path, mode: &str) {
    let (_model, load_s) = load_timed::<M>(dir, mode);
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{mode}: load {load_s:.2} s, peak RSS {:.2} GiB, RSS {:.2} GiB",
        gib(peak_rss()),
        gib(rss())
    );
}

/// Where `MODE+cache` keeps `dir`'s quantized weights: `DIR.quantization-cache` beside it.
pub fn quantization_cache_dir(dir: &Path) -> PathBuf {
    beside(dir, ".quantization-cache")
}

/// The GGUF file of `kind` (`q8_0`, `q4_k_m`) that llama_cpp_bench.py converts `dir` to.
pub fn gguf_path(dir: &Path, kind: &str) -> PathBuf {
    beside(dir, &format!(".{kind}.gguf"))
}

/// `dir`'s path with `suffix` appended: a file or folder beside it.
fn beside(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs this bench executable once per mode as `--measure MODE` on `threads` threads (each in its
/// own process, so its peak RSS is its own); their JSON lines, as `("pio", line)` rows.
pub fn measure_modes(modes: &[&str], threads: usize) -> Vec<(&'static str, String)> {
    let exe = std::env::current_exe().expect("bench executable");
    modes
        .iter()
        .map(|mode| {
            let out = Command::new(&exe)
                .args(["--measure", mode])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .expect("run measurement");
            if !out.status.success() {
                eprintln!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            (
                "pio",
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )
        })
        .collect()
}
