//! `pio bench --compare-llama-cpp`: llama.cpp's `llama-batched-bench` on the same model as GGUF,
//! with the same prompt length, output length, parallel sequences and threads, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

/// One line of `llama-batched-bench --output-format jsonl`.
#[derive(Debug, Deserialize)]
pub struct Row {
    /// Parallel sequences.
    pub pl: u32,
    /// Prompt tokens per sequence.
    pub pp: u32,
    /// Generated tokens per sequence.
    pub tg: u32,
    /// Prompt tokens per second (all sequences).
    pub speed_pp: f64,
    /// Generated tokens per second, all sequences together, after the prompts.
    pub speed_tg: f64,
    /// All tokens over the whole run, per second.
    pub speed: f64,
}

/// The workload, as llama-batched-bench takes it.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Prompt tokens per sequence.
    pub prompt: u32,
    /// Generated tokens per sequence.
    pub output: u32,
    /// Parallel sequences.
    pub parallel: usize,
    /// CPU threads.
    pub threads: usize,
}

/// Runs `binary` (llama-batched-bench) on `gguf`; its rows for one sequence and for `parallel`.
pub fn run(binary: &Path, gguf: &Path, w: Workload) -> anyhow::Result<Vec<Row>> {
    if !gguf.is_file() {
        bail!(
            "{}: no such GGUF file; convert the same checkpoint with llama.cpp's convert_hf_to_gguf.py (tests/bench/llama_cpp_bench.py does it for the bench checkpoints)",
            gguf.display()
        );
    }
    let parallel = if w.parallel > 1 {
        format!("1,{}", w.parallel)
    } else {
        "1".into()
    };
    // Every sequence holds its own prompt in the cache, as in pio's run.
    let context = (w.prompt + w.output) as usize * w.parallel + 64;
    let out = Command::new(binary)
        .arg("-m")
        .arg(gguf)
        .args(["-c", &context.to_string()])
        .args(["-b", "2048", "-ub", "512"])
        .args(["-npp", &w.prompt.to_string()])
        .args(["-ntg", &w.output.to_string()])
        .args(["-npl", &parallel])
        .args(["-t", &w.threads.to_string(), "-tb", &w.threads.to_string()])
        .args(["--output-format", "jsonl"])
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (build it with tests/bench/build_llama_cpp.sh, or name it with --llama-batched-bench)",
                binary.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let rows: Vec<Row> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("llama-batched-bench printed a line that is not its JSON row")?;
    if rows.is_empty() {
        bail!("llama-batched-bench printed no results");
    }
    Ok(rows)
}

/// The binary to run: the one named, else `llama-batched-bench` on the PATH.
pub fn binary(named: Option<&PathBuf>) -> PathBuf {
    named
        .cloned()
        .unwrap_or_else(|| PathBuf::from("llama-batched-bench"))
}
