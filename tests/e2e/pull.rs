//! `pio pull` against a local stand-in for the Hub ([`crate::hub::FakeHub`]) serving the tiny
//! fixture checkpoints: a download that breaks off resumes where it stopped, a corrupted one is
//! refused by its SHA-256, the manifest written serves the snapshot, and an architecture no
//! plugin serves is refused with the list of those that are.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::daemon::{echo_dir, qwen_dir};
use crate::hub::FakeHub;
use crate::support::{copy_fixture, pio_bin, plugin_lib, repo_root};
use crate::worker::confinement_available;

/// `pio pull` under `umask 077` (a hardened root's): what it makes must still be readable to
/// the workers' uids.
fn pull(hub: &FakeHub, cwd: &Path, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(pio_bin());
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            Ok(())
        });
    }
    command
        .current_dir(cwd)
        .arg("pull")
        .args(args)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_TOKEN", "hf_secret")
        .output()
        .expect("run pio pull")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A folder the workers' unprivileged uid can read.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_pulled_snapshot_resumes_checks_and_serves() {
    if !confinement_available() {
        return;
    }
    let fixture = repo_root().join("tests/fixtures/qwen3-tiny");
    let hub = FakeHub::start(&[("tiny/qwen3", fixture.clone())]);
    let shard = "model-00001-of-00005.safetensors";
    // The first connection breaks off after 4000 bytes, the next three bring nothing.
    hub.script.lock().unwrap().cuts = [(shard, 4000), (shard, 0), (shard, 0), (shard, 0)]
        .map(|(f, n)| (f.to_string(), n))
        .into();
    let plugins = qwen_dir("");
    let models = open_dir();
    let m = models.path().to_str().unwrap();
    let dir = plugins.path().to_str().unwrap();

    // The weights break off after 4000 bytes and three tries in a row bring no more: the run
    // fails, saying how to go on (with --force: the plugin's manifest here points elsewhere).
    let first = pull(
        &hub,
        plugins.path(),
        &["tiny/qwen3", "--plugins", dir, "--models", m, "--force"],
    );
    assert!(!first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("run `pio pull` again to resume"),
        "{}",
        stderr(&first)
    );
    let partial = models.path().join(format!(
        "tiny/qwen3/.pio-pull-{}/model-00001-of-00005.safetensors.incomplete",
        crate::hub::COMMIT
    ));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 4000);

    // Again: the download resumes at byte 4000 (and, broken off after 2000 more bytes, asks for
    // the rest at once); the plugin's manifest here points at the fixture, so only --force
    // moves it to the snapshot.
    // Then the rest arrives whole but the connection breaks after its last byte: nothing is
    // asked for past the end.
    let size = std::fs::metadata(fixture.join(shard)).unwrap().len() as usize;
    hub.script.lock().unwrap().cuts =
        [(shard.to_string(), 2000), (shard.to_string(), size - 6000)].into();
    let fetched_before = hub.script.lock().unwrap().downloads.len();
    let refused = pull(
        &hub,
        plugins.path(),
        &["tiny/qwen3", "--plugins", dir, "--models", m],
    );
    assert!(stderr(&refused).contains("--force"), "{}", stderr(&refused));
    {
        // Refused before the weights: only the config was needed to know.
        let s = hub.script.lock().unwrap();
        let fetched: Vec<&str> = s.downloads[fetched_before..]
            .iter()
            .map(|(f, _)| f.as_str())
            .collect();
        assert!(fetched.iter().all(|f| *f == "config.json"), "{fetched:?}");
    }
    let second = pull(
        &hub,
        plugins.path(),
        &[
            "tiny/qwen3",
            "--plugins",
            dir,
            "--models",
            m,
            "--force",
            "--tier",
            "medium",
        ],
    );
    assert!(second.status.success(), "{}", stderr(&second));
    {
        let s = hub.script.lock().unwrap();
        let ranges: Vec<_> = s
            .downloads
            .iter()
            .filter(|(f, _)| f == "model-00001-of-00005.safetensors")
            .map(|(_, r)| r.clone())
            .collect();
        let from = |n: u32| Some(format!("bytes={n}-"));
        assert_eq!(
            ranges,
            [
                None,
                from(4000),
                from(4000),
                from(4000),
                from(4000),
                from(6000)
            ]
        );
        assert!(s.auth.iter().all(|a| a == "Bearer hf_secret") && !s.auth.is_empty());
    }
    let snapshot = models.path().join("tiny/qwen3");
    for name in [
        "model-00001-of-00005.safetensors",
        "tokenizer.json",
        "config.json",
    ] {
        assert_eq!(
            std::fs::read(snapshot.join(name)).unwrap(),
            std::fs::read(fixture.join(name)).unwrap(),
            "{name}"
        );
    }
    assert!(!partial.exists());
    let manifest = std::fs::read_to_string(plugins.path().join("qwen3.toml")).unwrap();
    assert!(
        manifest.contains(&format!("path = \"{}\"", snapshot.display())),
        "{manifest}"
    );
    assert!(
        manifest.contains("tier = \"medium\"") && manifest.contains("dtype = \"f32\""),
        "{manifest}"
    );
    assert!(plugins.path().join("qwen3.toml.bak").is_file());

    // The manifest serves the pulled snapshot.
    let run = Command::new(pio_bin())
        .current_dir(plugins.path())
        .args([
            "run",
            "qwen3-4b-instruct-2507",
            "--plugins",
            ".",
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));

    // Pulling again downloads nothing: every file is there and checks out.
    let before = hub.script.lock().unwrap().downloads.len();
    let again = pull(
        &hub,
        plugins.path(),
        &["tiny/qwen3", "--plugins", dir, "--models", m],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(hub.script.lock().unwrap().downloads.len(), before);
}

#[test]
fn corrupted_downloads_unknown_architectures_and_missing_repositories_are_refused() {
    if !confinement_available() {
        return;
    }
    let fixture = repo_root().join("tests/fixtures/qwen3-tiny");
    let llama = tempfile::tempdir().unwrap();
    copy_fixture("qwen3-tiny", llama.path());
    let config = llama.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("Qwen3ForCausalLM", "LlamaForCausalLM"),
    )
    .unwrap();
    let hub = FakeHub::start(&[
        ("tiny/qwen3", fixture),
        ("tiny/llama", llama.path().to_path_buf()),
    ]);
    let plugins = qwen_dir("");
    let dir = plugins.path().to_str().unwrap();

    hub.script.lock().unwrap().corrupt = Some("model-00001-of-00005.safetensors".into());
    let models = open_dir();
    let m = models.path().to_str().unwrap();
    let out = pull(
        &hub,
        plugins.path(),
        &["tiny/qwen3", "--plugins", dir, "--models", m, "--force"],
    );
    let e = stderr(&out);
    assert!(
        !out.status.success()
            && e.contains("model-00001-of-00005.safetensors")
            && e.contains("SHA-256"),
        "{e}"
    );
    let snapshot = models.path().join("tiny/qwen3");
    assert!(!snapshot.join("model-00001-of-00005.safetensors").exists());
    assert!(!snapshot
        .join("model-00001-of-00005.safetensors.incomplete")
        .exists());
    hub.script.lock().unwrap().corrupt = None;

    let out = pull(
        &hub,
        plugins.path(),
        &["tiny/llama", "--plugins", dir, "--models", m],
    );
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("no plugin serves LlamaForCausalLM")
            && e.contains("Qwen3ForCausalLM (qwen3-4b-instruct-2507)"),
        "{e}"
    );

    let out = pull(
        &hub,
        plugins.path(),
        &["tiny/nothing", "--plugins", dir, "--models", m],
    );
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("404") && e.contains("no such repository"),
        "{e}"
    );
    let out = pull(&hub, plugins.path(), &["not-a-repo", "--plugins", dir]);
    assert!(stderr(&out).contains("OWNER/NAME"), "{}", stderr(&out));

    // A listing's commit goes into URLs and the manifest written: one that is not a commit id
    // (here, one that would add TOML lines to the manifest) is refused before anything is.
    hub.script.lock().unwrap().commit = Some("0\n[limits]\nmemory = \"1TiB\"\n#".into());
    let fresh = open_dir();
    let out = pull(
        &hub,
        plugins.path(),
        &[
            "tiny/qwen3",
            "--plugins",
            dir,
            "--models",
            fresh.path().to_str().unwrap(),
            "--force",
        ],
    );
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("not a commit id"),
        "{e}"
    );
    assert!(!fresh.path().join("tiny/qwen3/config.json").exists(), "{e}");
}

/// The plugin is asked about the manifest it will get (`supports_config`) before the weights
/// are fetched: a quantization it does not have fails the pull with its words, having
/// downloaded only `config.json` (beside the folder: one already served is left as it was), and
/// no manifest is written.
#[test]
fn a_setting_the_plugin_refuses_fails_before_the_weights_are_fetched() {
    if !confinement_available() {
        return;
    }
    // A snapshot whose architecture the echo plugin (family `echo`) serves.
    let snapshot = tempfile::tempdir().unwrap();
    copy_fixture("qwen3-tiny", snapshot.path());
    let config = snapshot.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("Qwen3ForCausalLM", "echo")).unwrap();
    let hub = FakeHub::start(&[("tiny/echo", snapshot.path().to_path_buf())]);
    let plugins = echo_dir("");
    let models = open_dir();
    let (dir, m) = (
        plugins.path().to_str().unwrap(),
        models.path().to_str().unwrap(),
    );
    let args = [
        "tiny/echo",
        "--plugins",
        dir,
        "--models",
        m,
        "--name",
        "pulled",
    ];
    let refused = |d: &Output| {
        let e = stderr(d);
        assert!(!d.status.success(), "{e}");
        assert!(
            e.contains("refuses") && e.contains("no weights to quantize"),
            "{e}"
        );
    };
    let q4 = [&args[..], &["--quantization", "q4"]].concat();
    let out = pull(&hub, plugins.path(), &q4);
    refused(&out);
    let folder = models.path().join("tiny/echo");
    let visible = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    };
    assert!(visible().is_empty(), "fetched into the model's folder");
    assert!(!plugins.path().join("pulled.toml").exists());
    // Without it the same pull goes through.
    let out = pull(&hub, plugins.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = std::fs::read_to_string(plugins.path().join("pulled.toml")).unwrap();
    let served = visible();
    assert!(served.contains(&"tokenizer.json".to_string()), "{served:?}");

    // Another commit with the refused setting: the folder being served is left as it was.
    let before: Vec<Vec<u8>> = served
        .iter()
        .map(|n| std::fs::read(folder.join(n)).unwrap())
        .collect();
    std::fs::write(snapshot.path().join("tokenizer_config.json"), "{}").unwrap();
    hub.script.lock().unwrap().commit = Some("e".repeat(40));
    let out = pull(&hub, plugins.path(), &[&q4[..], &["--force"]].concat());
    refused(&out);
    assert_eq!(visible(), served);
    for (name, bytes) in served.iter().zip(&before) {
        assert_eq!(&std::fs::read(folder.join(name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(plugins.path().join("pulled.toml")).unwrap(),
        manifest
    );
}

/// A partial download longer than the file (a server that sent too much) is fetched anew, not
/// asked for the rest past the end at every run.
#[test]
fn a_partial_longer_than_the_file_is_fetched_anew() {
    if !confinement_available() {
        return;
    }
    let fixture = repo_root().join("tests/fixtures/qwen3-tiny");
    let hub = FakeHub::start(&[("tiny/qwen3", fixture.clone())]);
    let plugins = qwen_dir("");
    let models = open_dir();
    let stage = models
        .path()
        .join(format!("tiny/qwen3/.pio-pull-{}", crate::hub::COMMIT));
    std::fs::create_dir_all(&stage).unwrap();
    let config = std::fs::read(fixture.join("config.json")).unwrap();
    let mut longer = config.clone();
    longer.extend_from_slice(b"          ");
    std::fs::write(stage.join("config.json.incomplete"), longer).unwrap();
    let (m, dir) = (
        models.path().to_str().unwrap(),
        plugins.path().to_str().unwrap(),
    );
    let out = pull(
        &hub,
        plugins.path(),
        &["tiny/qwen3", "--plugins", dir, "--models", m, "--force"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let pulled = models.path().join("tiny/qwen3/config.json");
    assert_eq!(std::fs::read(pulled).unwrap(), config);
    let s = hub.script.lock().unwrap();
    let asked: Vec<_> = (s.downloads.iter())
        .filter(|(f, _)| f == "config.json")
        .collect();
    assert_eq!(asked, [&("config.json".to_string(), None)]);
}

/// Into an empty plugin directory: the plugin is found by probing the libraries in a library
/// directory, and the manifest written serves the snapshot — nothing but `pio pull` and `pio run`.
#[test]
fn a_first_pull_needs_no_manifest() {
    if !confinement_available() {
        return;
    }
    let fixture = repo_root().join("tests/fixtures/qwen3-moe-tiny");
    let hub = FakeHub::start(&[("tiny/coder", fixture)]);
    let root = open_dir();
    let plugins = root.path().join("plugins.d");
    let models = root.path().join("models");
    // The plugin libraries as a package installs them: a folder of .so files, no manifests.
    let lib = root.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    for name in ["pio_plugin_qwen3", "pio_plugin_qwen3_coder"] {
        let from = plugin_lib(name);
        std::fs::copy(&from, lib.join(from.file_name().unwrap())).unwrap();
    }
    let (p, m, l) = (
        plugins.to_str().unwrap(),
        models.to_str().unwrap(),
        lib.to_str().unwrap(),
    );
    let into = [
        "tiny/coder",
        "--plugins",
        p,
        "--models",
        m,
        "--library-dir",
        l,
    ];
    let out = pull(
        &hub,
        root.path(),
        &[&into[..], &["--quantization", "q8"]].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = std::fs::read_to_string(plugins.join("qwen3-coder-30b.toml")).unwrap();
    for line in [
        "name = \"qwen3-coder-30b\"",
        "quantization = \"q8\"",
        "tier = \"low\"",
        "api = \"^1.13\"",
    ] {
        assert!(manifest.contains(line), "{line} in:\n{manifest}");
    }
    // The same plugin serves a second model under a name of its own, beside the first.
    let extra = ["--name", "coder-q4", "--quantization", "q4"];
    let out = pull(&hub, root.path(), &[&into[..], &extra].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let second = std::fs::read_to_string(plugins.join("coder-q4.toml")).unwrap();
    assert!(
        second.contains("name = \"coder-q4\"") && second.contains("plugin = \"qwen3-coder-30b\""),
        "{second}"
    );
    for name in ["qwen3-coder-30b", "coder-q4"] {
        let run = Command::new(pio_bin())
            .current_dir(root.path())
            .args([
                "run",
                name,
                "--plugins",
                "plugins.d",
                "--prompt",
                "def",
                "--max-tokens",
                "2",
            ])
            .output()
            .unwrap();
        assert!(run.status.success(), "{name}: {}", stderr(&run));
    }
}

/// A mirror that takes the connection and never answers fails the pull after
/// `HF_HUB_DOWNLOAD_TIMEOUT`, saying where it waited, instead of hanging it.
#[test]
fn a_hub_that_never_answers_fails_the_pull_in_time() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let dir = open_dir();
    let mut child = Command::new(pio_bin())
        .current_dir(dir.path())
        .args(["pull", "tiny/qwen3"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pio pull");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("pio pull still waited on a silent hub after 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&endpoint) && err.contains("HF_ENDPOINT"),
        "{err}"
    );
    drop(silent);
}

/// Pulling another commit into the same folder: the files the Hub gives no checksum for are
/// fetched again (a changed `generation_config.json` of the same size was kept before), the
/// files the new commit no longer has are removed, and the weights, whose SHA-256 still
/// matches, are not fetched again.
#[test]
fn another_commit_replaces_what_changed_and_removes_what_is_gone() {
    if !confinement_available() {
        return;
    }
    let served = tempfile::tempdir().unwrap();
    copy_fixture("qwen3-tiny", served.path());
    std::fs::write(served.path().join("notes.txt"), "only in the first commit").unwrap();
    let hub = FakeHub::start(&[("tiny/qwen3", served.path().to_path_buf())]);
    let plugins = qwen_dir("");
    let models = open_dir();
    let (m, dir) = (
        models.path().to_str().unwrap(),
        plugins.path().to_str().unwrap(),
    );
    let args = ["tiny/qwen3", "--plugins", dir, "--models", m, "--force"];
    let first = pull(&hub, plugins.path(), &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let pulled = models.path().join("tiny/qwen3");
    assert!(pulled.join("notes.txt").is_file());

    let generation = served.path().join("generation_config.json");
    let text = std::fs::read_to_string(&generation).unwrap();
    let changed = text.replace("\"temperature\": 0.7", "\"temperature\": 0.9");
    assert_eq!(
        changed.len(),
        text.len(),
        "the same size: only a checksum would tell"
    );
    std::fs::write(&generation, &changed).unwrap();
    std::fs::remove_file(served.path().join("notes.txt")).unwrap();
    hub.script.lock().unwrap().commit = Some("f".repeat(40));
    let before = hub.script.lock().unwrap().downloads.len();
    let second = pull(&hub, plugins.path(), &args);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(
        std::fs::read_to_string(pulled.join("generation_config.json")).unwrap(),
        changed
    );
    assert!(!pulled.join("notes.txt").exists(), "{}", stderr(&second));
    let fetched: Vec<String> = hub.script.lock().unwrap().downloads[before..]
        .iter()
        .map(|(f, _)| f.clone())
        .collect();
    assert!(
        fetched.iter().all(|f| !f.ends_with(".safetensors")),
        "weights fetched again: {fetched:?}"
    );
}

/// A `config.json` far larger than any model's is refused by its listed size, before it is
/// fetched and read whole.
#[test]
fn an_oversized_config_is_refused_before_it_is_fetched() {
    let served = tempfile::tempdir().unwrap();
    let config = vec![b' '; 17 << 20];
    std::fs::write(served.path().join("config.json"), config).unwrap();
    let hub = FakeHub::start(&[("huge/config", served.path().to_path_buf())]);
    let plugins = qwen_dir("");
    let models = open_dir();
    let out = pull(
        &hub,
        plugins.path(),
        &[
            "huge/config",
            "--plugins",
            plugins.path().to_str().unwrap(),
            "--models",
            models.path().to_str().unwrap(),
        ],
    );
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("not a model's configuration"),
        "{e}"
    );
    assert!(hub.script.lock().unwrap().downloads.is_empty(), "{e}");
}
