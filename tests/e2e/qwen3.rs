//! The shipped Qwen3 manifests (dense and MoE), end to end through the real `pio` binary and a
//! confined worker: the greedy tokens and logprobs transformers produced for the tiny checkpoints
//! come out of `pio run --json`.

use serde_json::Value;

use crate::support::*;
use crate::worker::confinement_available;

fn golden() -> Vec<Value> {
    golden_of("qwen3-tiny")
}

pub(crate) fn golden_of(checkpoint: &str) -> Vec<Value> {
    let path = repo_root().join(format!("tests/fixtures/golden/{checkpoint}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn run_json(extra: &[&str]) -> Vec<Value> {
    run_plugin_json("qwen3-4b-instruct-2507", extra)
}

pub(crate) fn run_plugin_json(plugin: &str, extra: &[&str]) -> Vec<Value> {
    let out = run_plugin(plugin, extra, 16);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `pio run PLUGIN EXTRA…` greedy, JSON lines with top-5 logprobs, at most `max_tokens`.
pub(crate) fn run_plugin(plugin: &str, extra: &[&str], max_tokens: usize) -> std::process::Output {
    let deps = deps_dir();
    let n = max_tokens.to_string();
    let mut args = vec!["run", plugin, "--library-dir", deps.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--temperature",
        "0",
        "--json",
        "--logprobs",
        "5",
        "--max-tokens",
        &n,
    ]);
    pio(&repo_root(), &args)
}

pub(crate) fn assert_matches(lines: &[Value], case: &Value) {
    let tokens: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["token_id"].as_u64())
        .collect();
    let want: Vec<u64> = case["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tokens, want);
    for (line, step) in lines.iter().zip(case["top5"].as_array().unwrap()) {
        let got = line["top_logprobs"].as_array().unwrap();
        for (g, (id, lp)) in got.iter().zip(
            step["ids"]
                .as_array()
                .unwrap()
                .iter()
                .zip(step["logprobs"].as_array().unwrap()),
        ) {
            assert_eq!(g["token_id"], *id);
            assert!((g["logprob"].as_f64().unwrap() - lp.as_f64().unwrap()).abs() < 2e-3);
        }
    }
    let summary = lines.last().unwrap();
    assert_eq!(summary["usage"]["completion_tokens"], 16);
    assert_eq!(
        summary["usage"]["prompt_tokens"],
        case["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(summary["finish_reason"], "length");
}

#[test]
fn the_shipped_manifest_serves_transformers_tokens_through_a_worker() {
    if !confinement_available() {
        return;
    }
    let golden = golden();
    assert_matches(
        &run_json(&["--prompt", golden[0]["prompt"].as_str().unwrap()]),
        &golden[0],
    );
    let chat = golden.iter().find(|c| c.get("messages").is_some()).unwrap();
    let messages = chat["messages"].to_string();
    assert_matches(&run_json(&["--messages", &messages]), chat);
}

#[test]
fn the_shipped_coder_manifest_serves_the_moe_model_with_its_chat_template() {
    if !confinement_available() {
        return;
    }
    let golden = golden_of("qwen3-moe-tiny");
    // The checkpoint's generation config sets a repetition penalty; transformers' goldens are
    // plain greedy.
    let run = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--repetition-penalty", "1"]);
        run_plugin_json("qwen3-coder-30b", &args)
    };
    assert_matches(
        &run(&["--prompt", golden[0]["prompt"].as_str().unwrap()]),
        &golden[0],
    );
    // The prompt tokens of a chat case come from Qwen3-Coder's own template.
    let chat = golden.iter().find(|c| c.get("messages").is_some()).unwrap();
    assert_matches(&run(&["--messages", &chat["messages"].to_string()]), chat);
}

#[test]
fn in_process_gives_the_same_tokens_for_debugging() {
    let golden = golden();
    let lines = run_json(&[
        "--prompt",
        golden[0]["prompt"].as_str().unwrap(),
        "--in-process",
    ]);
    assert_matches(&lines, &golden[0]);
}

/// A real candle-based plugin under the tightest confinement: an empty root holding only its
/// library and model, and a seccomp allow-list that kills on anything else.
#[test]
fn qwen3_runs_unchanged_at_the_maximum_tier() {
    if !confinement_available() {
        return;
    }
    let lib = plugin_lib("pio_plugin_qwen3");
    let dir = PluginDir::new();
    let model = repo_root().join("tests/fixtures/qwen3-tiny");
    let model = format!("path = \"{}\"\n", model.display());
    dir.write("qwen3.toml", &qwen3_manifest(&lib, "maximum", &model));
    let golden = golden();
    let args = [
        "run",
        "qwen3-4b-instruct-2507",
        "--plugins",
        ".",
        "--prompt",
        golden[0]["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--json",
        "--logprobs",
        "5",
        "--max-tokens",
        "16",
    ];
    let out = pio(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_matches(&lines, &golden[0]);
}

#[test]
fn the_coder_plugin_loads_quantized_from_the_manifest() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    let model = repo_root().join("tests/fixtures/qwen3-moe-tiny");
    let library = plugin_lib("pio_plugin_qwen3_coder");
    for q in ["q4", "q8"] {
        dir.write(
            "coder.toml",
            &manifest(
                "qwen3-coder-30b",
                "0.1.0",
                &library.display().to_string(),
                &format!(
                    "[model]\npath = \"{}\"\nquantization = \"{q}\"\n",
                    model.display()
                ),
            ),
        );
        let out = pio(
            dir.path(),
            &[
                "run",
                "qwen3-coder-30b",
                "--plugins",
                ".",
                "--prompt",
                "def add(a, b):",
            ],
        );
        assert!(
            out.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir.write(
        "coder.toml",
        &manifest(
            "qwen3-coder-30b",
            "0.1.0",
            &library.display().to_string(),
            &format!(
                "[model]\npath = \"{}\"\nquantization = \"q3\"\n",
                model.display()
            ),
        ),
    );
    let out = pio(
        dir.path(),
        &["run", "qwen3-coder-30b", "--plugins", ".", "--prompt", "x"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("q3"), "{stderr}");
}

/// `pio bench` on a GGUF file given with `--model-path`, with `--profile`: the workload's figures
/// and the engine's time per operation, which accounts for the forward passes it ran.
#[test]
fn bench_profiles_a_gguf_model() {
    if !confinement_available() {
        return;
    }
    let dir = tiny_qwen3_plugins();
    let gguf = repo_root().join("tests/fixtures/gguf/qwen3-wide.q4_k_m.gguf");
    let args = [
        "bench",
        "qwen3-4b-instruct-2507",
        "--plugins",
        ".",
        "--model-path",
        gguf.to_str().unwrap(),
        "--prompt-words",
        "20",
        "--output-tokens",
        "4",
        "--concurrency",
        "2",
        "--profile",
        "--json",
    ];
    let out = pio(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["output_tokens"], 8, "{f}");
    let p = &f["profile"];
    let us = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p}"));
    // Warm-up and both requests: every prompt token and every output token but the last.
    let mean = |k: &str| f[k].as_f64().unwrap();
    let prompts = (mean("prompt_tokens_mean") - mean("cached_tokens_mean")) * 2.0;
    assert!(us("tokens") >= prompts + 6.0, "{p}");
    // The file's Q4_K/Q6_K layers and head are quantized; nothing is dense.
    assert!(us("quantized_linear_us") > 0.0 && us("attention_us") > 0.0 && us("head_us") > 0.0);
    assert_eq!(us("dense_linear_us"), 0.0, "{p}");
    let parts = us("quantized_linear_us") + us("attention_us") + us("head_us") + us("other_us");
    assert!((parts - us("forward_us")).abs() <= 1.0, "{p}");
}

/// `pio bench --single-stream`: one request at a time through the confined worker — prefill of
/// the prompt, decode at depth 0 and after the prompt — beside a streaming read and the decode
/// limit the weights' bytes set, with the engine's profile of the run.
#[test]
fn bench_measures_a_single_stream_against_the_bandwidth_limit() {
    if !confinement_available() {
        return;
    }
    let dir = tiny_qwen3_plugins();
    let args = [
        "bench",
        "qwen3-4b-instruct-2507",
        "--plugins",
        ".",
        "--single-stream",
        "--prompt-words",
        "30",
        "--output-tokens",
        "6",
        "--profile",
        "--json",
    ];
    // An operator's cap on the kernels reaches the worker (its environment is otherwise
    // cleared): the model reports the capped level.
    let out = std::process::Command::new(pio_bin())
        .current_dir(dir.path())
        .args(args)
        .env("PIO_KERNELS", "avx2")
        .output()
        .expect("run pio");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    let capped = pio_kernels::Level::detected().min(pio_kernels::Level::Avx2);
    assert_eq!(f["kernels"], capped.name(), "{f}");
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("a number in {f}"));
    let ours = &f["pio"];
    assert!(num(&ours["prompt_tokens"]) >= 30.0, "{f}");
    for key in [
        "prefill_tokens_per_s",
        "decode_depth0_tokens_per_s",
        "decode_depth_prompt_tokens_per_s",
    ] {
        assert!(num(&ours[key]) > 0.0, "{key}: {f}");
    }
    // The limit is set by what a step reads (layers and head, not the embedding table's rows).
    let (read, bytes) = (num(&f["streaming_read_gb_per_s"]), num(&f["step_bytes"]));
    assert!(
        read > 0.0 && bytes > 0.0 && bytes <= num(&f["weight_bytes"]),
        "{f}"
    );
    let limit = num(&f["decode_limit_tokens_per_s"]);
    assert!((limit - read * 1e9 / bytes).abs() <= limit * 1e-9, "{f}");
    // Warm-up, prefill, both decodes: every token went through the profiled forward passes.
    assert!(
        num(&f["profile"]["tokens"]) >= num(&ours["prompt_tokens"]) * 2.0 + 10.0,
        "{f}"
    );
    assert!(
        num(&f["profile"]["other_us"]) >= 0.0,
        "the rest is reported too: {f}"
    );
    assert!(f.get("llama_cpp").is_none(), "not asked for");
    // Concurrency belongs to the other mode.
    let out = pio(
        dir.path(),
        &[
            "bench",
            "qwen3-4b-instruct-2507",
            "--plugins",
            ".",
            "--single-stream",
            "--concurrency",
            "4",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--concurrency"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plugin folder with the qwen3 plugin at the `low` tier on the tiny fixture.
fn tiny_qwen3_plugins() -> PluginDir {
    let dir = PluginDir::new();
    let model = format!(
        "path = \"{}\"\n",
        repo_root().join("tests/fixtures/qwen3-tiny").display()
    );
    dir.write(
        "qwen3.toml",
        &qwen3_manifest(&plugin_lib("pio_plugin_qwen3"), "low", &model),
    );
    dir
}

/// A manifest whose model is not there fails its check, yet `--model-path` brings a model of its
/// own: `pio run` serves it.
#[test]
fn model_path_runs_a_plugin_whose_manifest_model_is_missing() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.write(
        "qwen3.toml",
        &qwen3_manifest(
            &plugin_lib("pio_plugin_qwen3"),
            "low",
            "path = \"not-downloaded\"\n",
        ),
    );
    let run = |extra: &[&str]| {
        let args = [
            &[
                "run",
                "qwen3-4b-instruct-2507",
                "--plugins",
                ".",
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
            ][..],
            extra,
        ]
        .concat();
        pio(dir.path(), &args)
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not-downloaded does not exist"), "{err}");
    let fixture = repo_root().join("tests/fixtures/qwen3-tiny");
    let out = run(&["--model-path", fixture.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}

/// `pio run`'s text leaves the model's special tokens out, as llama.cpp's CLI does (the tiny
/// model draws `<think>`, special in its tokenizer, after "The"); `--special` prints them, and
/// `--json` always shows each token as it is.
#[test]
fn pio_run_text_leaves_special_tokens_out_unless_asked() {
    if !confinement_available() {
        return;
    }
    let deps = deps_dir();
    let text = |extra: &[&str]| {
        let args = [
            &[
                "run",
                "qwen3-4b-instruct-2507",
                "--library-dir",
                deps.to_str().unwrap(),
                "--prompt",
                "The",
                "--temperature",
                "0",
                "--max-tokens",
                "40",
            ][..],
            extra,
        ]
        .concat();
        let out = pio(&repo_root(), &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run_plugin("qwen3-4b-instruct-2507", &["--prompt", "The"], 40);
    let lines: Vec<Value> = (String::from_utf8_lossy(&out.stdout).lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tokens: Vec<(u64, &str)> = lines
        .iter()
        .filter_map(|l| Some((l["token_id"].as_u64()?, l["text"].as_str()?)))
        .collect();
    let special = 7; // `<think>`
    assert!(
        tokens.iter().any(|(id, _)| *id == special),
        "the greedy run draws <think>: {tokens:?}"
    );
    let all: String = tokens.iter().map(|(_, t)| *t).collect();
    let shown: String = (tokens.iter())
        .filter(|(id, _)| *id != special)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(text(&[]), format!("{shown}\n"));
    assert_eq!(text(&["--special"]), format!("{all}\n"));
}

/// vLLM's request extras on the real engine: `continue_final_message` and
/// `add_generation_prompt` shape the prompt (a continued assistant message is neither closed nor
/// followed by a new turn), and `include_stop_str_in_output` ends the text with the stop string
/// found instead of cutting it.
#[test]
fn vllm_request_extras_shape_the_prompt_and_the_text() {
    if !confinement_available() {
        return;
    }
    let d = crate::daemon::Daemon::start(tiny_qwen3_plugins(), "");
    d.wait_ready();
    let post = |path: &str, body: Value, extra: Value| {
        let body = merged(body, extra);
        let (status, r) = d.post(path, &body);
        assert_eq!(status, 200, "{r}");
        r
    };
    let chat = serde_json::json!({
        "model": "qwen3-4b-instruct-2507", "max_tokens": 1,
        "messages": [{"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "The colour is"}]});
    let prompt_tokens = |extra: Value| {
        post("/v1/chat/completions", chat.clone(), extra)["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
    };
    let new_turn = prompt_tokens(serde_json::json!({}));
    let closed = prompt_tokens(serde_json::json!({"add_generation_prompt": false}));
    let continued = prompt_tokens(serde_json::json!({"continue_final_message": true}));
    assert!(
        continued < closed && closed < new_turn,
        "{continued} {closed} {new_turn}"
    );

    let completion = serde_json::json!({
        "model": "qwen3-4b-instruct-2507", "prompt": "Hello world",
        "max_tokens": 12, "temperature": 0});
    let text = |extra: Value| {
        post("/v1/completions", completion.clone(), extra)["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let whole = text(serde_json::json!({}));
    let chars: Vec<char> = whole.chars().collect();
    assert!(chars.len() >= 6, "{whole:?}");
    let stop: String = chars[3..5].iter().collect();
    let at = whole.find(&stop).unwrap();
    let cut = text(serde_json::json!({"stop": [stop]}));
    assert_eq!(cut, whole[..at]);
    let kept = text(serde_json::json!({"stop": [stop], "include_stop_str_in_output": true}));
    assert_eq!(kept, whole[..at + stop.len()]);

    // `skip_special_tokens` (default true): a special token the sampler drew (`ignore_eos`
    // lets it go on past `<|im_end|>`) leaves the text, not the token count or the logprobs.
    let sampled = serde_json::json!({
        "model": "qwen3-4b-instruct-2507", "prompt": "Hi", "max_tokens": 200,
        "temperature": 2, "seed": 1, "ignore_eos": true, "logprobs": 0});
    let raw = post(
        "/v1/completions",
        sampled.clone(),
        serde_json::json!({"skip_special_tokens": false}),
    );
    let skipped = post("/v1/completions", sampled, serde_json::json!({}));
    let tokenizer: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/qwen3-tiny/tokenizer.json"))
            .unwrap(),
    )
    .unwrap();
    let specials: Vec<&str> = tokenizer["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"] == true)
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    let (raw_text, text) = (
        raw["choices"][0]["text"].as_str().unwrap(),
        skipped["choices"][0]["text"].as_str().unwrap(),
    );
    assert!(
        specials.iter().any(|s| raw_text.contains(s)),
        "the seeded run draws a special token: {raw_text:?}"
    );
    let without = specials
        .iter()
        .fold(raw_text.to_string(), |t, s| t.replace(s, ""));
    assert_eq!(text, without);
    assert_eq!(raw["usage"], skipped["usage"]);
    assert_eq!(
        raw["choices"][0]["logprobs"]["token_logprobs"],
        skipped["choices"][0]["logprobs"]["token_logprobs"]
    );
}

/// `pio bench --constrained`: each of its three runs sends prompts of its own, so none finds
/// another's in the prefix cache (the later runs skipped their prefill, biasing the overheads).
#[test]
fn bench_constrained_runs_share_no_prompt() {
    if !confinement_available() {
        return;
    }
    let dir = tiny_qwen3_plugins();
    let args = [
        "bench",
        "qwen3-4b-instruct-2507",
        "--plugins",
        ".",
        "--constrained",
        "--prompt-words",
        "40",
        "--output-tokens",
        "3",
        "--concurrency",
        "2",
        "--json",
    ];
    let out = pio(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &f["constrained"];
    for run in [&f, &c["figures"], &c["free_again"]] {
        assert_eq!(run["cached_tokens_mean"].as_f64(), Some(0.0), "{f}");
    }
}

/// `pio bench --single-stream --compare-llama-cpp` runs llama.cpp once its own worker is gone:
/// not two models in memory at once, nor two programs on the cores it measures (a stand-in
/// llama-batched-bench records whether the bench still had a worker beside it).
#[test]
fn single_stream_llama_cpp_runs_without_the_worker_beside_it() {
    if !confinement_available() {
        return;
    }
    let dir = tiny_qwen3_plugins();
    let seen = dir.path().join("seen");
    let script = dir.path().join("llama-batched-bench");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nkids=$(cat /proc/$PPID/task/*/children)\nfor k in $kids; do [ \"$k\" != \"$$\" ] && echo \"$k\" >> {seen}; done\ntouch {seen}\necho '{{\"pl\": 1, \"pp\": 8, \"tg\": 2, \"speed_pp\": 100.0, \"speed_tg\": 10.0, \"speed\": 20.0}}'\n",
            seen = seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let gguf = repo_root().join("tests/fixtures/gguf/qwen3-wide.q4_k_m.gguf");
    let args = [
        "bench",
        "qwen3-4b-instruct-2507",
        "--plugins",
        ".",
        "--single-stream",
        "--prompt-words",
        "8",
        "--output-tokens",
        "2",
        "--json",
        "--compare-llama-cpp",
        gguf.to_str().unwrap(),
        "--llama-batched-bench",
        script.to_str().unwrap(),
    ];
    let out = pio(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let beside = std::fs::read_to_string(&seen).expect("llama.cpp ran");
    assert!(beside.trim().is_empty(), "processes beside it: {beside}");
}

/// `pio bench` refuses a workload with nothing to measure, and one whose prompts pass the
/// model's context says which flag fits it.
#[test]
fn bench_says_what_to_change_when_the_workload_cannot_run() {
    if !confinement_available() {
        return;
    }
    let dir = tiny_qwen3_plugins();
    let bench = |extra: &[&str]| {
        let args = [
            &["bench", "qwen3-4b-instruct-2507", "--plugins", "."][..],
            extra,
        ]
        .concat();
        let out = pio(dir.path(), &args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = bench(&["--requests", "0"]);
    assert!(err.contains("nothing to measure"), "{err}");
    // 512 words are more tokens than the tiny model's 256.
    let err = bench(&["--output-tokens", "2", "--concurrency", "1"]);
    assert!(err.contains("--prompt-words"), "{err}");
}
