//! Structured output end to end: the daemon serving the tiny Qwen3, Qwen3-MoE (Qwen3-Coder's
//! markup) and GLM checkpoints, driven by the official `openai` client (`response_format`,
//! `chat.completions.parse` with a pydantic model, `guided_*`, forced tool calls in each
//! model's own markup), every output checked against its schema with `jsonschema`.

use crate::daemon::{echo_dir, python_client_available, run_python_checks, Daemon};
use crate::support::{manifest, plugin_lib, repo_root, PluginDir};
use crate::worker::confinement_available;

/// A copy of a tiny checkpoint in `dir` whose context is 2048 tokens instead of 256 (the weights
/// do not care; tool definitions in a 400-token vocabulary make long prompts).
fn long_context(dir: &PluginDir, fixture: &str) -> std::path::PathBuf {
    let from = repo_root().join("tests/fixtures").join(fixture);
    let to = dir.path().join(fixture);
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    let config = to.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = 2048.into();
    std::fs::write(&config, c.to_string()).unwrap();
    to
}

/// echo, plus the Qwen3, coder and GLM plugins over their tiny checkpoints.
fn three_formats() -> PluginDir {
    let dir = echo_dir("");
    for (name, lib, fixture) in [
        ("qwen3-4b-instruct-2507", "pio_plugin_qwen3", "qwen3-tiny"),
        (
            "qwen3-coder-30b",
            "pio_plugin_qwen3_coder",
            "qwen3-moe-tiny",
        ),
        ("glm-4.7-flash", "pio_plugin_glm", "glm4-moe-lite-tiny"),
    ] {
        let model = long_context(&dir, fixture);
        let extra = format!("[model]\npath = \"{}\"\ndtype = \"f32\"\n", model.display());
        let library = plugin_lib(lib).display().to_string();
        dir.write(
            &format!("{name}.toml"),
            &manifest(name, "0.1.0", &library, &extra),
        );
    }
    dir
}

#[test]
fn constrained_output_always_parses_and_validates() {
    if !confinement_available() {
        return;
    }
    if !python_client_available() {
        return;
    }
    let d = Daemon::start(three_formats(), "");
    d.wait_ready();
    run_python_checks(&d, "api/structured_output.py", &[&format!("{}/v1", d.base)]);
}

/// `pio run --json-schema FILE` and `--grammar FILE` hold the output as the API's fields do, and
/// refuse what the API refuses.
#[test]
fn pio_run_takes_a_schema_or_a_grammar_from_a_file() {
    if !confinement_available() {
        return;
    }
    let dir = crate::daemon::qwen_dir("");
    let schema = dir.write(
        "schema.json",
        r#"{"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["k", "n"], "additionalProperties": false}"#,
    );
    let grammar = dir.write("g.lark", "start: \"id-\" /[0-9]{4}/\n");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "qwen3-4b-instruct-2507",
            "--plugins",
            ".",
            "--max-tokens",
            "60",
        ];
        args.extend_from_slice(extra);
        crate::support::pio(dir.path(), &args)
    };
    let messages = r#"[{"role": "user", "content": "hi"}]"#;
    let out = run(&[
        "--messages",
        messages,
        "--json-schema",
        schema.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(["a", "b"].contains(&v["k"].as_str().unwrap()), "{v}");
    assert!((0..=9).contains(&v["n"].as_i64().unwrap()), "{v}");

    let out = run(&["--prompt", "x", "--grammar", grammar.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = text
        .trim()
        .strip_prefix("id-")
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        id.len() == 4 && id.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}"
    );

    let bad = dir.write("bad.json", r#"{"type": "array", "uniqueItems": true}"#);
    let out = run(&["--prompt", "x", "--json-schema", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("uniqueItems"),
        "{stderr}"
    );
}
