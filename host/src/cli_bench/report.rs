//! The table (or JSON object) of a concurrent `pio bench` run, with llama.cpp's rows beside.

use super::{constrained, llama_cpp, profile, BenchArgs};

/// Prints the run's figures `f`, with llama.cpp's `llama` rows and ratios when compared.
pub(super) fn print(
    args: &BenchArgs,
    mut f: serde_json::Value,
    llama: Option<&[llama_cpp::Row]>,
) -> Result<(), crate::cli_run::OutputClosed> {
    if let Some(rows) = llama {
        add_llama(args, &mut f, rows);
    }
    if args.json {
        return outln!("{f}");
    }
    print_ours(args, &f)?;
    if args.profile {
        profile::print(f.get("profile").filter(|p| !p.is_null()))?;
    }
    if let Some(rows) = llama {
        print_llama(args, &f, rows)?;
    }
    constrained::print(&f)
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// llama.cpp's `rows` into `f`, with the ratios at this run's concurrency.
fn add_llama(args: &BenchArgs, f: &mut serde_json::Value, rows: &[llama_cpp::Row]) {
    f["llama_cpp"] = serde_json::json!(rows
        .iter()
        .map(
            |r| serde_json::json!({"parallel": r.pl, "prompt": r.pp, "output": r.tg,
            "prompt_tokens_per_s": r.speed_pp, "decode_tokens_per_s": r.speed_tg,
            "total_tokens_per_s": r.speed})
        )
        .collect::<Vec<_>>());
    if let Some(r) = rows.iter().find(|r| r.pl as usize == args.concurrency) {
        f["ratio_decode"] =
            serde_json::json!(f["decode_tokens_per_s"].as_f64().map(|d| d / r.speed_tg));
        f["ratio_total"] = serde_json::json!(num(&f["total_tokens_per_s"]) / r.speed);
    }
}

/// PIO's own figures: throughputs, the KV cache, latency percentiles.
fn print_ours(args: &BenchArgs, f: &serde_json::Value) -> Result<(), crate::cli_run::OutputClosed> {
    outln!(
        "{} requests, {} at once: {:.0} prompt tokens each ({:.0} from the prefix cache), {} output tokens in {:.2} s{}",
        f["requests"],
        args.concurrency,
        num(&f["prompt_tokens_mean"]),
        num(&f["cached_tokens_mean"]),
        f["output_tokens"],
        num(&f["wall_s"]),
        if args.sampled { ", sampled with the model's defaults" } else { "" }
    )?;
    outln!(
        "output throughput  {:>9.2} tokens/s",
        num(&f["output_tokens_per_s"])
    )?;
    match f["decode_tokens_per_s"].as_f64() {
        Some(v) => outln!(
            "decode throughput  {v:>9.2} tokens/s (all requests decoding: after the last first token, before the first end)"
        )?,
        None => outln!("decode throughput        n/a (the requests never all decoded at once)")?,
    }
    outln!(
        "total throughput   {:>9.2} tokens/s (prompt tokens computed + output)",
        num(&f["total_tokens_per_s"])
    )?;
    let kv = &f["kv_cache"];
    if !kv.is_null() {
        outln!(
            "KV cache           peak {} of {} blocks of {} tokens ({:.1} MiB at {} bytes a token); {} preemptions; {:.1} sequences per step",
            kv["blocks_peak"],
            kv["blocks_total"],
            kv["block_size"],
            num(&kv["peak_bytes"]) / f64::from(1 << 20),
            kv["bytes_per_token"],
            kv["preemptions"],
            num(&kv["mean_batch"])
        )?;
    }
    outln!("                      p50       p90       p99")?;
    for (name, key) in [("TTFT ms", "ttft_ms"), ("ITL ms", "itl_ms")] {
        let v = &f[key];
        outln!(
            "{name:<16} {:>9.1} {:>9.1} {:>9.1}",
            num(&v["p50"]),
            num(&v["p90"]),
            num(&v["p99"])
        )?;
    }
    Ok(())
}

/// llama.cpp's rows and the ratios.
fn print_llama(
    args: &BenchArgs,
    f: &serde_json::Value,
    rows: &[llama_cpp::Row],
) -> Result<(), crate::cli_run::OutputClosed> {
    outln!("llama.cpp (llama-batched-bench, same prompt and output lengths):")?;
    outln!("  parallel   prompt tok/s   decode tok/s   total tok/s")?;
    for r in rows {
        outln!(
            "  {:>8} {:>14.2} {:>14.2} {:>13.2}",
            r.pl,
            r.speed_pp,
            r.speed_tg,
            r.speed
        )?;
    }
    if f.get("ratio_total").is_some() {
        let decode = f["ratio_decode"]
            .as_f64()
            .map_or("n/a".to_string(), |r| format!("{r:.2}x"));
        outln!(
            "pio / llama.cpp at {} parallel: decode {decode}, total {:.2}x",
            args.concurrency,
            num(&f["ratio_total"])
        )?;
    }
    if args.shared_prefix > 0.0 {
        outln!(
            "note: llama-batched-bench computes every prompt in full; pio's total includes its prefix cache"
        )?;
    }
    Ok(())
}
