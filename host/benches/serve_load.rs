//! Load test of `pio serve` on loopback: N concurrent streaming clients for a fixed time (and at
//! most a fixed number of requests) against the shipped tiny Qwen3 model. Prints requests/s,
//! tokens/s, time to first token (p50/p99), errors (must be 0), and the daemon's own memory
//! before and after (no growth expected).
//!
//! `cargo build --release && cargo bench -p pio-host --bench serve_load` (as root: workers run in
//! cgroups). `PIO_LOAD_CLIENTS` (default 8), `PIO_LOAD_SECS` (default 10),
//! `PIO_LOAD_MAX_REQUESTS` (default 5000) and `PIO_LOAD_MODEL` (default
//! `qwen3-4b-instruct-2507`; `echo` measures the server alone) change the run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// Resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Round {
    requests: usize,
    errors: usize,
    tokens: usize,
    ttft_ms: Vec<f64>,
    elapsed: f64,
}

/// One streaming request; returns (time to first token, tokens) or an error.
fn one(agent: &ureq::Agent, url: &str, model: &str, i: usize) -> Result<(f64, usize), String> {
    let body = serde_json::json!({
        "model": model,
        "stream": true,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("Request number {i}: tell me something.")}],
    });
    let started = Instant::now();
    let response = agent
        .post(url)
        .send_json(&body)
        .map_err(|e| e.to_string())?;
    if response.status().as_u16() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let (mut first, mut tokens, mut done) = (None, 0, false);
    for line in BufReader::new(response.into_body().into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        if data.contains("\"error\"") {
            return Err(data.to_string());
        }
        if data.contains("\"content\":\"") && !data.contains("\"content\":\"\"") {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
            tokens += 1;
        }
    }
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    Ok((first.unwrap_or(f64::NAN), tokens))
}

fn round(url: &str, model: &str, clients: usize, secs: u64, max_requests: usize) -> Round {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let issued = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new((0usize, 0usize, Vec::new())));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (issued, results, url, model) = (
                issued.clone(),
                results.clone(),
                url.to_string(),
                model.to_string(),
            );
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_config(
                    ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(120)))
                        .build(),
                );
                while Instant::now() < deadline {
                    let i = issued.fetch_add(1, Ordering::AcqRel);
                    if i >= max_requests {
                        break;
                    }
                    let outcome = one(&agent, &url, &model, i);
                    let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                    match outcome {
                        Ok((ttft, tokens)) => {
                            r.1 += tokens;
                            r.2.push(ttft);
                        }
                        Err(e) => {
                            eprintln!("request {i} failed: {e}");
                            r.0 += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (errors, tokens, mut ttft_ms) =
        std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    ttft_ms.sort_by(f64::total_cmp);
    Round {
        requests: ttft_ms.len() + errors,
        errors,
        tokens,
        ttft_ms,
        elapsed,
    }
}

fn main() {
    let clients = env_or("PIO_LOAD_CLIENTS", 8usize);
    let secs = env_or("PIO_LOAD_SECS", 10u64);
    let max_requests = env_or("PIO_LOAD_MAX_REQUESTS", 5000usize);
    let model = std::env::var("PIO_LOAD_MODEL").unwrap_or_else(|_| "qwen3-4b-instruct-2507".into());
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_pio"))
        .current_dir(repo_root())
        .args(["serve", "--plugins", "manifests", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,pio_host::serve=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pio serve");
    let (tx, rx) = mpsc::channel();
    let stderr = daemon.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("listening on http://") {
                let _ = tx.send(line[at + "listening on ".len()..].trim().to_string());
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("{line}");
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("pio serve did not start; build with `cargo build --release` first");
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let ready = Instant::now();
    while agent
        .get(format!("{base}/ready"))
        .call()
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "models did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("{base}/v1/chat/completions");
    // Warm-up, then the measured rounds: memory is read after each.
    let _ = round(&url, &model, clients, 1, 50);
    let before = rss_mib(daemon.id());
    println!("pio serve load test: {clients} streaming clients × {secs} s, model {model}, 16 tokens per request");
    println!("| round | requests | errors | requests/s | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | daemon RSS after (MiB) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut errors = 0;
    for n in 1..=2 {
        let r = round(&url, &model, clients, secs, max_requests);
        errors += r.errors;
        println!(
            "| {n} | {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
            r.requests,
            r.errors,
            r.requests as f64 / r.elapsed,
            r.tokens as f64 / r.elapsed,
            percentile(&r.ttft_ms, 0.5),
            percentile(&r.ttft_ms, 0.99),
            rss_mib(daemon.id())
        );
    }
    println!("daemon RSS after warm-up: {before:.1} MiB; errors in all: {errors}");
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    assert_eq!(errors, 0, "requests failed under load");
}
