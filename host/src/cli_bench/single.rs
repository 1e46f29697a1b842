//! `pio bench --single-stream`: one request at a time, as a person at a terminal runs a model —
//! prefill of the prompt, decode from an empty cache (depth 0) and decode after the prompt
//! (depth = the prompt) — beside the machine's memory bandwidth (a streaming read in this
//! process) and the decode limit it sets (the weights' bytes read once per token); with
//! `--compare-llama-cpp`, llama-batched-bench's single sequence on the same GGUF file.

use std::time::{Duration, Instant};

use pio_host::supervisor::Worker;

use super::{llama_cpp, one, prompt, request, BenchArgs, Timing};

/// Bytes of the streaming read: far more than any cache.
pub const READ_BYTES: usize = 1 << 30;

/// What one single-stream run measured, per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Prompt tokens of the prefill request.
    pub prompt_tokens: u32,
    /// Prompt tokens computed per second (the prompt over the time to its first token).
    pub prefill: f64,
    /// Tokens per second after the first, from a one-word prompt.
    pub decode_empty: Option<f64>,
    /// Tokens per second after the first, after the prompt.
    pub decode_deep: Option<f64>,
}

/// Decode tokens per second of one request: the tokens after the first over the time they took.
pub fn decode_rate(arrivals: &[Instant]) -> Option<f64> {
    let (first, last) = (arrivals.first()?, arrivals.last()?);
    let secs = last.duration_since(*first).as_secs_f64();
    (arrivals.len() > 1 && secs > 0.0).then(|| (arrivals.len() - 1) as f64 / secs)
}

/// Prompt tokens per second of one request.
fn prefill_rate(t: &Timing) -> f64 {
    f64::from(t.prompt_tokens) / t.ttft.max(Duration::from_micros(1)).as_secs_f64()
}

/// Runs the three requests, each alone, each prompt its own (nothing comes from the prefix
/// cache): the prompt with one output token, one word with the output, the prompt with the
/// output. The last request's engine profile comes back beside the figures.
pub async fn run(
    worker: &Worker,
    args: &BenchArgs,
) -> anyhow::Result<(Figures, Option<serde_json::Value>)> {
    let sampled = args.sampled;
    let prefill = one(worker, request(prompt(1, args.prompt_words, 0), 1, sampled)).await?;
    let empty = one(
        worker,
        request(prompt(2, 1, 0), args.output_tokens, sampled),
    )
    .await?;
    let deep = one(
        worker,
        request(prompt(3, args.prompt_words, 0), args.output_tokens, sampled),
    )
    .await?;
    let figures = Figures {
        prompt_tokens: prefill.prompt_tokens,
        prefill: prefill_rate(&prefill),
        decode_empty: decode_rate(&empty.arrivals),
        decode_deep: decode_rate(&deep.arrivals),
    };
    Ok((figures, deep.profile))
}

/// GB/s of a streaming read of `size` bytes over the threads the model uses: what bounds
/// decode, which reads every weight once per token.
pub fn streaming_read(size: usize, threads: usize) -> f64 {
    let bytes = vec![1u8; size];
    let chunk = bytes.len().div_ceil(threads.max(1));
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in bytes.chunks(chunk) {
                s.spawn(move || {
                    // Eight independent sums: the loop vectorizes and the read is the limit.
                    let mut acc = [0u64; 8];
                    for line in part.chunks_exact(64) {
                        for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
                            let word = u64::from_le_bytes(w.try_into().unwrap_or_default());
                            *a = a.wrapping_add(word);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes.len() as f64 / best / 1e9
}

/// llama-batched-bench's single sequence on `gguf`: after the same prompt, and after one token.
pub fn llama(
    binary: &std::path::Path,
    gguf: &std::path::Path,
    prompt_tokens: u32,
    output: u32,
    threads: usize,
) -> anyhow::Result<Figures> {
    let single = |prompt| -> anyhow::Result<llama_cpp::Row> {
        let rows = llama_cpp::run(
            binary,
            gguf,
            llama_cpp::Workload {
                prompt,
                output,
                parallel: 1,
                threads,
            },
        )?;
        rows.into_iter()
            .find(|r| r.pl == 1)
            .ok_or_else(|| anyhow::anyhow!("llama-batched-bench printed no single-sequence row"))
    };
    let deep = single(prompt_tokens.max(1))?;
    let empty = single(1)?;
    Ok(Figures {
        prompt_tokens: deep.pp,
        prefill: deep.speed_pp,
        decode_empty: Some(empty.speed_tg),
        decode_deep: Some(deep.speed_tg),
    })
}

/// The figures as `--json` prints them: pio's, the limit's, and llama.cpp's when compared.
pub fn json(
    ours: &Figures,
    bandwidth: Option<f64>,
    (step_bytes, weight_bytes): (Option<u64>, Option<u64>),
    llama: Option<&Figures>,
) -> serde_json::Value {
    // What one step reads when the model says; all its resident weights otherwise.
    let limit = step_bytes
        .or(weight_bytes)
        .zip(bandwidth)
        .map(|(b, gb_per_s)| gb_per_s * 1e9 / b as f64);
    let side = |f: &Figures| {
        serde_json::json!({
            "prompt_tokens": f.prompt_tokens,
            "prefill_tokens_per_s": f.prefill,
            "decode_depth0_tokens_per_s": f.decode_empty,
            "decode_depth_prompt_tokens_per_s": f.decode_deep,
        })
    };
    let mut out = serde_json::json!({
        "pio": side(ours),
        "streaming_read_gb_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "step_bytes": step_bytes,
        "decode_limit_tokens_per_s": limit,
    });
    if let Some(l) = llama {
        out["llama_cpp"] = side(l);
    }
    out
}

/// The table's first line: threads, kernels, the read bandwidth, the bytes and the limit.
fn print_heading(
    f: &serde_json::Value,
    threads: usize,
    limit: Option<f64>,
) -> Result<(), crate::cli_run::OutputClosed> {
    let gib = |v: &serde_json::Value| {
        v.as_f64().map_or("unknown".into(), |b| {
            format!("{:.2} GiB", b / f64::from(1 << 30))
        })
    };
    outln!(
        "single stream, {threads} threads{}; {}; resident weights {}, read per token {}: decode limit {}",
        f["kernels"]
            .as_str()
            .map_or(String::new(), |k| format!(", {k} kernels")),
        f["streaming_read_gb_per_s"]
            .as_f64()
            .map_or("on a GPU (no host-memory limit)".into(), |b| {
                format!("streaming read {b:.1} GB/s")
            }),
        gib(&f["weight_bytes"]),
        gib(&f["step_bytes"]),
        limit.map_or("unknown".into(), |l| format!("{l:.1} tokens/s")),
    )?;
    Ok(())
}

/// The table.
pub fn print(f: &serde_json::Value, threads: usize) -> Result<(), crate::cli_run::OutputClosed> {
    let num = |v: &serde_json::Value| v.as_f64();
    let limit = num(&f["decode_limit_tokens_per_s"]);
    print_heading(f, threads, limit)?;
    let llama = f.get("llama_cpp");
    outln!(
        "                          pio tok/s   of the limit{}",
        if llama.is_some() {
            "   llama.cpp tok/s   pio / llama.cpp"
        } else {
            ""
        }
    )?;
    let prompt = f["pio"]["prompt_tokens"].as_u64().unwrap_or(0);
    let rows = [
        (
            format!("prefill ({prompt} tokens)"),
            "prefill_tokens_per_s",
            false,
        ),
        (
            "decode at depth 0".into(),
            "decode_depth0_tokens_per_s",
            true,
        ),
        (
            format!("decode at depth {prompt}"),
            "decode_depth_prompt_tokens_per_s",
            true,
        ),
    ];
    for (name, key, decode) in rows {
        let ours = num(&f["pio"][key]);
        let cell = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
        let share = match (decode, ours, limit) {
            (true, Some(v), Some(l)) => format!("{:.0}%", 100.0 * v / l),
            _ => String::new(),
        };
        let mut line = format!("{name:<24} {:>11} {share:>14}", cell(ours));
        if let Some(l) = llama {
            let theirs = num(&l[key]);
            let ratio = ours.zip(theirs).map(|(a, b)| format!("{:.2}x", a / b));
            line += &format!(" {:>17} {:>17}", cell(theirs), ratio.unwrap_or_default());
        }
        outln!("{line}")?;
    }
    if limit.is_some() {
        outln!(
            "(the limit is the bytes a decode step reads from the weights — every layer, the routed experts' share, the output \
             head — over the streaming read; attention over the cache and activations come on top)"
        )?;
    }
    Ok(())
}

/// Reports `--single-stream`: the figures, the bandwidth and limit, llama.cpp's when asked.
pub fn report(
    args: &BenchArgs,
    (ours, engine_profile): (Figures, Option<serde_json::Value>),
    info: &pio_plugin_api::wire::ModelInfo,
) -> anyhow::Result<u8> {
    let threads = super::threads(args);
    // A model on a GPU reads its weights from device memory: the host's streaming read bounds
    // nothing there (engine/benches/gpu.rs measures the device's bandwidth).
    let on_gpu = info.device_memory_bytes.is_some();
    let bandwidth = (!on_gpu).then(|| streaming_read(READ_BYTES, threads));
    let llama = match &args.compare_llama_cpp {
        Some(gguf) => Some(llama(
            &llama_cpp::binary(args.llama_batched_bench.as_ref()),
            gguf,
            ours.prompt_tokens,
            args.output_tokens,
            threads,
        )?),
        None => None,
    };
    let mut f = json(
        &ours,
        bandwidth,
        (info.step_bytes, info.weight_bytes),
        llama.as_ref(),
    );
    f["kernels"] = info.kernels.clone().into();
    if args.profile {
        f["profile"] = super::profile::latest(engine_profile.iter()).unwrap_or_default();
    }
    if args.json {
        outln!("{f}")?;
    } else {
        print(&f, threads)?;
        if args.profile {
            super::profile::print(f.get("profile").filter(|p| !p.is_null()))?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_counts_the_tokens_after_the_first() {
        let t0 = Instant::now();
        let arrivals: Vec<Instant> = (0..=10)
            .map(|i| t0 + Duration::from_millis(500 + 100 * i))
            .collect();
        let rate = decode_rate(&arrivals).expect("ten gaps");
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
        assert_eq!(decode_rate(&arrivals[..1]), None, "one token has no decode");
        assert_eq!(decode_rate(&[]), None);
    }

    #[test]
    fn the_limit_is_the_bandwidth_over_the_bytes_a_step_reads() {
        let ours = Figures {
            prompt_tokens: 512,
            prefill: 200.0,
            decode_empty: Some(50.0),
            decode_deep: Some(40.0),
        };
        let theirs = Figures {
            decode_deep: Some(80.0),
            ..ours
        };
        // A step's bytes when the model counts them, its resident weights otherwise.
        let f = json(
            &ours,
            Some(20.0),
            (Some(200_000_000), Some(400_000_000)),
            None,
        );
        assert_eq!(f["decode_limit_tokens_per_s"], 100.0);
        let f = json(&ours, Some(20.0), (None, Some(400_000_000)), Some(&theirs));
        assert_eq!(f["decode_limit_tokens_per_s"], 50.0);
        assert_eq!(f["pio"]["decode_depth_prompt_tokens_per_s"], 40.0);
        assert_eq!(f["llama_cpp"]["decode_depth_prompt_tokens_per_s"], 80.0);
        let f = json(&ours, Some(20.0), (None, None), None);
        assert!(f["decode_limit_tokens_per_s"].is_null() && f.get("llama_cpp").is_none());
        // On a GPU no host bandwidth is measured, so no limit is claimed.
        let f = json(&ours, None, (Some(200_000_000), None), None);
        assert!(f["decode_limit_tokens_per_s"].is_null() && f["streaming_read_gb_per_s"].is_null());
    }

    #[test]
    fn a_streaming_read_measures_something() {
        assert!(streaming_read(64 << 20, 2) > 0.1);
    }
}
