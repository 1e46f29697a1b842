//! Discovery and load-time checks: `pio list` and `pio check` on real libraries, each failure
//! produced for real, with every other plugin still loading.

use serde_json::Value;

use crate::support::*;

fn row<'a>(rows: &'a [Value], manifest_file: &str) -> &'a Value {
    rows.iter()
        .find(|r| {
            r["manifest"]
                .as_str()
                .is_some_and(|m| m.ends_with(manifest_file))
        })
        .unwrap_or_else(|| panic!("no row for {manifest_file} in {rows:#?}"))
}

fn error_of(row: &Value) -> &str {
    assert_eq!(row["status"], "error", "expected an error: {row:#}");
    row["error"].as_str().unwrap()
}

fn check_json(path: &std::path::Path) -> (bool, Value) {
    let out = pio(&repo_root(), &["check", "--json", path.to_str().unwrap()]);
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pio check --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), value)
}

#[test]
fn shipped_manifests_are_ready() {
    let deps = deps_dir();
    let out = pio(
        &repo_root(),
        &["list", "--json", "--library-dir", deps.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let echo = rows
        .iter()
        .find(|r| r["name"] == "echo")
        .expect("echo listed");
    assert_eq!(echo["status"], "ready", "{echo:#}");
    assert_eq!(echo["family"], "echo");
    let qwen3 = rows
        .iter()
        .find(|r| r["name"] == "qwen3-4b-instruct-2507")
        .expect("qwen3 listed");
    assert_eq!(qwen3["status"], "ready", "{qwen3:#}");
    assert_eq!(qwen3["family"], "Qwen3ForCausalLM");

    let out = pio(
        &repo_root(),
        &[
            "check",
            "manifests/echo.toml",
            "--library-dir",
            deps.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: echo 0.1.0"));
}

#[test]
fn a_good_library_reports_what_it_is() {
    let (ok, v) = check_json(&plugin_lib("pio_plugin_echo"));
    assert!(ok, "{v:#}");
    assert_eq!(v["name"], "echo");
    assert_eq!(v["api_version"], "1.13.0");
    assert_eq!(
        v["capabilities"],
        serde_json::json!(["text", "chat", "tools", "logprobs"])
    );
}

/// A library named bare, in the current folder, is that file (as for any command-line path),
/// not a name for the system's library search.
#[test]
fn a_library_named_bare_in_the_current_folder_is_that_file() {
    let lib = plugin_lib("pio_plugin_echo");
    let out = pio(
        lib.parent().unwrap(),
        &["check", lib.file_name().unwrap().to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("ok: echo"), "{said}");
    assert!(
        said.contains(&format!("library: {}", lib.display())),
        "{said}"
    );
}

#[test]
fn a_plugin_built_against_an_older_minor_loads() {
    let (ok, v) = check_json(&plugin_lib("pio_test_plugin_old_minor"));
    assert!(ok, "{v:#}");
    assert_eq!(v["api_version"], "1.0.0");
    assert_eq!(v["version"], "0.0.9");
}

#[test]
fn a_plugin_built_against_another_major_is_refused_naming_both_versions() {
    let (ok, v) = check_json(&plugin_lib("pio_test_plugin_next_major"));
    assert!(!ok);
    assert_eq!(v["error_kind"], "incompatible_api");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("plugin-api 2.0.0") && e.contains("plugin-api 1.13.0"),
        "{e}"
    );
    assert!(
        e.contains("rebuild the plugin against plugin-api 1.x"),
        "{e}"
    );
}

#[test]
fn a_foreign_layout_is_refused_with_a_one_line_summary() {
    let (ok, v) = check_json(&plugin_lib("pio_test_plugin_foreign_layout"));
    assert!(!ok);
    assert_eq!(v["error_kind"], "layout");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("expected PluginMod, found ForeignMod"), "{e}");
    assert!(!e.contains('\n'), "summary must be one line: {e}");
}

#[test]
fn a_plain_c_library_is_not_a_plugin() {
    let dir = PluginDir::new();
    let src = dir.write("plain.c", "int plain_answer(void) { return 42; }\n");
    let lib = dir.path().join("libplain.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(status.success());
    let (ok, v) = check_json(&lib);
    assert!(!ok);
    assert_eq!(v["error_kind"], "not_a_plugin", "{v:#}");
}

#[test]
fn a_truncated_library_is_refused_before_it_is_mapped() {
    let dir = PluginDir::new();
    let lib = dir.copy_lib("pio_plugin_echo", "libecho.so");
    let len = std::fs::metadata(&lib).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lib)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let (ok, v) = check_json(&lib);
    assert!(!ok);
    assert_eq!(v["error_kind"], "malformed", "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("truncated"), "{v:#}");
}

#[test]
fn check_fails_on_a_missing_path() {
    let out = pio(&repo_root(), &["check", "no/such/plugin.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/plugin.toml: no such file"));
}

/// Every manifest-level failure side by side with a good plugin, in one directory: each gets its
/// own error and the good one is still ready.
#[test]
fn each_failure_is_reported_and_the_rest_still_load() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.copy_lib("pio_test_plugin_next_major", "libnext.so");
    let real_sha = {
        let out = std::process::Command::new("sha256sum")
            .arg(dir.path().join("libecho.so"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };
    dir.write(
        "good.toml",
        &manifest(
            "echo",
            "0.1.0",
            "libecho.so",
            &format!("sha256 = \"{real_sha}\"\n"),
        ),
    );
    dir.write("bad-toml.toml", "name = \"broken\nversion = 1\n");
    dir.write(
        "unknown-key.toml",
        &manifest("unknown", "0.1.0", "libecho.so", "colour = \"blue\"\n"),
    );
    dir.write(
        "bad-tier.toml",
        &manifest("tiered", "0.1.0", "libecho.so", "").replace("\"low\"", "\"lowest\""),
    );
    dir.write(
        "no-lib.toml",
        &manifest("nolib", "0.1.0", "libnowhere.so", ""),
    );
    dir.write(
        "bad-sha.toml",
        &manifest(
            "shady",
            "0.1.0",
            "libecho.so",
            &format!("sha256 = \"{}\"\n", "0".repeat(64)),
        ),
    );
    dir.write(
        "api.toml",
        &manifest("future", "0.1.0", "libecho.so", "").replace("^1.0", "^1.14"),
    );
    dir.write(
        "wrong-name.toml",
        &manifest("echo-two", "0.1.0", "libecho.so", ""),
    );
    dir.write(
        "wrong-version.toml",
        &manifest("echo", "0.3.0", "libecho.so", ""),
    );
    // Served under a name of its own, with the plugin it is named: ready; naming the wrong
    // plugin is an identity error on `plugin`.
    dir.write(
        "alias.toml",
        &manifest("shout", "0.1.0", "libecho.so", "plugin = \"echo\"\n"),
    );
    dir.write(
        "wrong-plugin.toml",
        &manifest("whisper", "0.1.0", "libecho.so", "plugin = \"echo-two\"\n"),
    );
    dir.write("next.toml", &manifest("echo", "0.2.0", "libnext.so", ""));

    let rows = dir.list();
    assert_eq!(rows.len(), 12, "{rows:#?}");
    assert_eq!(row(&rows, "good.toml")["status"], "ready");

    let e = error_of(row(&rows, "bad-toml.toml"));
    assert!(e.contains("bad-toml.toml:1:"), "file and line: {e}");
    let e = error_of(row(&rows, "unknown-key.toml"));
    assert!(
        e.contains("unknown-key.toml:6:1") && e.contains("colour"),
        "{e}"
    );
    let e = error_of(row(&rows, "bad-tier.toml"));
    assert!(
        e.contains("bad-tier.toml:5:8") && e.contains("lowest") && e.contains("maximum"),
        "{e}"
    );
    let e = error_of(row(&rows, "no-lib.toml"));
    assert!(
        e.contains("no-lib.toml:3:11") && e.contains("libnowhere.so") && e.contains("not found"),
        "{e}"
    );
    let e = error_of(row(&rows, "bad-sha.toml"));
    assert!(
        e.contains(&real_sha) && e.contains(&"0".repeat(64)),
        "both digests: {e}"
    );
    let e = error_of(row(&rows, "api.toml"));
    assert!(
        e.contains("^1.14") && e.contains("1.13.0") && e.contains("upgrade PIO"),
        "{e}"
    );
    let e = error_of(row(&rows, "wrong-name.toml"));
    assert!(
        e.contains("name \"echo-two\"") && e.contains("reports \"echo\""),
        "{e}"
    );
    // The key that serves a plugin under another name is named.
    assert!(e.contains("plugin = \"echo\""), "{e}");
    assert_eq!(row(&rows, "alias.toml")["status"], "ready");
    let e = error_of(row(&rows, "wrong-plugin.toml"));
    assert!(
        e.contains("plugin \"echo-two\"") && e.contains("reports \"echo\""),
        "{e}"
    );
    let e = error_of(row(&rows, "wrong-version.toml"));
    assert!(
        e.contains("version \"0.3.0\"") && e.contains("reports \"0.1.0\""),
        "{e}"
    );
    let e = error_of(row(&rows, "next.toml"));
    assert!(e.contains("2.0.0") && e.contains("1.13.0"), "{e}");
}

#[test]
fn the_highest_compatible_version_wins() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.copy_lib("pio_test_plugin_old_minor", "libecho-old.so");
    dir.copy_lib("pio_test_plugin_next_major", "libecho-next.so");
    dir.write(
        "a-old.toml",
        &manifest("echo", "0.0.9", "libecho-old.so", ""),
    );
    dir.write(
        "b-current.toml",
        &manifest("echo", "0.1.0", "libecho.so", ""),
    );
    // Higher, but built for another plugin-api major: it must not win.
    dir.write(
        "c-next.toml",
        &manifest("echo", "0.2.0", "libecho-next.so", ""),
    );
    let rows = dir.list();
    assert_eq!(row(&rows, "b-current.toml")["status"], "ready");
    let old = row(&rows, "a-old.toml");
    assert_eq!(old["status"], "superseded");
    assert!(old["error"].as_str().unwrap().contains("0.1.0"));
    assert_eq!(row(&rows, "c-next.toml")["status"], "error");
}

#[test]
fn two_manifests_claiming_one_plugin_version_are_both_refused() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.copy_lib("pio_test_plugin_old_minor", "libecho-old.so");
    dir.write("one.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    dir.write("two.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    dir.write(
        "older.toml",
        &manifest("echo", "0.0.9", "libecho-old.so", ""),
    );
    let rows = dir.list();
    let e = error_of(row(&rows, "one.toml"));
    assert!(e.contains("two.toml") && e.contains("echo 0.1.0"), "{e}");
    assert!(error_of(row(&rows, "two.toml")).contains("one.toml"));
    // With the ambiguous pair refused, the remaining version is served.
    assert_eq!(row(&rows, "older.toml")["status"], "ready");
}

#[test]
fn a_library_is_found_next_to_the_pio_executable() {
    // As in a `cargo build` tree: `pio` and the libraries side by side, manifests elsewhere.
    let bin = PluginDir::new();
    let pio_copy = bin.path().join("pio");
    std::fs::copy(pio_bin(), &pio_copy).unwrap();
    bin.copy_lib("pio_plugin_echo", "libpio_plugin_echo.so");
    let manifests = PluginDir::new();
    // Written without prefix and suffix: the platform's file name is tried too.
    manifests.write(
        "echo.toml",
        &manifest("echo", "0.1.0", "pio_plugin_echo", ""),
    );
    let out = std::process::Command::new(&pio_copy)
        .current_dir(manifests.path())
        .args(["list", "--json", "--plugins", "."])
        .output()
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let echo = row(&rows, "echo.toml");
    assert_eq!(echo["status"], "ready", "{echo:#}");
    assert_eq!(
        echo["library"].as_str().unwrap(),
        bin.path().join("libpio_plugin_echo.so").to_str().unwrap()
    );
}

/// `pio check` and `pio list` plan the worker too: a `maximum` manifest that pins no sha256,
/// which the daemon would refuse to start, fails the check saying why.
#[test]
fn check_fails_a_manifest_its_tier_refuses() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    let text =
        manifest("echo", "0.1.0", "libecho.so", "").replace("tier = \"low\"", "tier = \"maximum\"");
    let path = dir.write("echo.toml", &text);
    let (ok, v) = check_json(&path);
    assert!(!ok, "{v:#}");
    assert_eq!(v["error_kind"], "confinement", "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("sha256"), "{v:#}");
    let plugins = dir.path().to_str().unwrap();
    let out = pio(&repo_root(), &["list", "--json", "--plugins", plugins]);
    assert!(!out.status.success(), "pio list fails as pio check does");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        error_of(row(&rows, "echo.toml")).contains("sha256"),
        "{rows:#?}"
    );
    let pinned = text.replace(
        "tier = \"maximum\"",
        &format!(
            "tier = \"maximum\"\nsha256 = \"{}\"",
            sha256_of(&dir.path().join("libecho.so"))
        ),
    );
    dir.write("echo.toml", &pinned);
    let (ok, v) = check_json(&path);
    assert!(ok, "{v:#}");
}

/// The daemon's configuration (`--config`) and `--min-tier` count: a `low` manifest without a
/// pin is ready alone, and fails where the daemon would raise it to `maximum` and refuse it.
#[test]
fn check_and_list_apply_the_daemons_minimum_tier() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    let path = dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    let config = dir.write("pio.toml", "[sandbox]\nmin_tier = \"maximum\"\n");
    let (p, c) = (path.to_str().unwrap(), config.to_str().unwrap());
    let plugins = dir.path().to_str().unwrap();
    assert!(check_json(&path).0, "ready under the defaults");
    let out = pio(&repo_root(), &["check", "--json", "--config", c, p]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "{v:#}");
    assert_eq!(v["error_kind"], "confinement", "{v:#}");
    for extra in [&["--config", c][..], &["--min-tier", "maximum"][..]] {
        let args = [&["list", "--json", "--plugins", plugins][..], extra].concat();
        let out = pio(&repo_root(), &args);
        assert!(!out.status.success(), "{extra:?}");
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            error_of(row(&rows, "echo.toml")).contains("sha256"),
            "{rows:#?}"
        );
    }
}

/// The plugin is asked whether it supports the manifest's `[model]`, as a load would: a
/// setting it refuses (an option it does not read, a quantization echo has no weights for) fails
/// `pio check` and `pio list` with the plugin's reason, not the first load.
#[test]
fn check_asks_the_plugin_about_the_manifests_model() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    let text = manifest(
        "echo",
        "0.1.0",
        "libecho.so",
        "[model]\nquantization = \"q4\"\n",
    );
    let path = dir.write("echo.toml", &text);
    let (ok, v) = check_json(&path);
    assert!(!ok, "{v:#}");
    assert_eq!(v["error_kind"], "unsupported", "{v:#}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("echo.toml") && error.contains("no weights to quantize"),
        "{v:#}"
    );
    let plugins = dir.path().to_str().unwrap();
    let out = pio(&repo_root(), &["list", "--json", "--plugins", plugins]);
    assert!(!out.status.success(), "pio list fails as pio check does");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        error_of(row(&rows, "echo.toml")).contains("no weights"),
        "{rows:#?}"
    );
    // A library that is not the manifest's plugin is named as such first.
    let other = manifest(
        "other",
        "0.1.0",
        "libecho.so",
        "[model]\nquantization = \"q4\"\n",
    );
    dir.write("echo.toml", &other);
    let (ok, v) = check_json(&path);
    assert!(!ok && v["error_kind"] == "identity", "{v:#}");
    dir.write(
        "echo.toml",
        &manifest(
            "echo",
            "0.1.0",
            "libecho.so",
            "[model.options]\ndelay_ms = 1\n",
        ),
    );
    let (ok, v) = check_json(&path);
    assert!(ok, "{v:#}");
}

/// `pio check --config FILE` looks the library up in the daemon's `library_dirs` as the daemon
/// does (a container's manifests name bare libraries installed elsewhere); a missing path in
/// `--json` mode is JSON too.
#[test]
fn check_reads_the_daemons_library_dirs_and_answers_json_for_a_missing_file() {
    let libs = PluginDir::new();
    libs.copy_lib("pio_plugin_echo", "libecho.so");
    let dir = PluginDir::new();
    let path = dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    let (ok, v) = check_json(&path);
    assert!(!ok && v["error_kind"] == "library_not_found", "{v:#}");
    let config = dir.write(
        "pio.toml",
        &format!("library_dirs = [\"{}\"]\n", libs.path().display()),
    );
    let out = pio(
        dir.path(),
        &[
            "check",
            "--json",
            "--config",
            config.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v:#}");
    assert_eq!(v["status"], "ready", "{v:#}");

    let out = pio(dir.path(), &["check", "--json", "nope.toml"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("no such file"),
        "{v:#}"
    );
}

/// `pio list | head` and friends: a reader gone before the output is written ends the command
/// quietly with the status a shell gives SIGPIPE, as `cat` would (println! panicked, exit 101).
#[test]
fn a_closed_output_pipe_ends_list_and_check_quietly() {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    for args in [
        "list --plugins .",
        "list --json --plugins .",
        "check --json echo.toml",
    ] {
        // The reader (`true`) is gone before pio starts writing.
        let script = format!(
            "(sleep 0.3; exec {} {args} 2>&1) | true; echo \"rc=${{PIPESTATUS[0]}}\"",
            pio_bin().display()
        );
        let out = std::process::Command::new("bash")
            .current_dir(dir.path())
            .args(["-c", &script])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said.trim(), "rc=141", "pio {args}: {said}");
    }
}
