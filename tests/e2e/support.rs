//! Helpers for the end-to-end tests: where the built `pio` binary and plugin libraries are, and
//! a scratch plugin directory to assemble manifests in.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where cargo put this build's libraries: `target/<profile>/deps`, always the freshest copy
/// (`cargo test` builds workspace cdylibs there without copying them up a level).
pub fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The `pio` binary under test.
pub fn pio_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pio"))
}

/// A plugin library built by this workspace, by crate name (`pio_plugin_echo`).
pub fn plugin_lib(crate_name: &str) -> PathBuf {
    let path = deps_dir().join(format!("lib{crate_name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds every plugin",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ sits in the repository root")
        .to_path_buf()
}

/// Copies the files of the fixture checkpoint `tests/fixtures/{name}` into `into` (which exists).
pub fn copy_fixture(name: &str, into: &Path) {
    for entry in std::fs::read_dir(repo_root().join("tests/fixtures").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), into.join(entry.file_name())).unwrap();
    }
}

/// Runs `pio` with `args` from `cwd`.
pub fn pio(cwd: &Path, args: &[&str]) -> Output {
    Command::new(pio_bin())
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run pio")
}

/// A temporary plugin directory.
pub struct PluginDir {
    dir: tempfile::TempDir,
}

impl PluginDir {
    /// An empty one.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `file` (a manifest, say) with `text`; returns its path.
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).expect("write file");
        path
    }

    /// Copies a built plugin library in under `file`; returns its path.
    pub fn copy_lib(&self, crate_name: &str, file: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::copy(plugin_lib(crate_name), &path).expect("copy library");
        path
    }

    /// `pio list --json --plugins <this dir>`, parsed; its exit status is checked to say whether
    /// a manifest failed.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let out = pio(self.path(), &["list", "--json", "--plugins", "."]);
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "pio list --json printed no JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let failed = rows.iter().any(|r| r["status"] == "error");
        assert_eq!(
            out.status.code(),
            Some(if failed { 1 } else { 0 }),
            "pio list's exit status against its rows: {rows:#?}"
        );
        rows
    }
}

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A manifest for `name` `version` whose library is `library`, plus `extra` TOML lines.
pub fn manifest(name: &str, version: &str, library: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nlibrary = \"{library}\"\napi = \"^1.0\"\ntier = \"low\"\n{extra}"
    )
}

/// The manifest of the qwen3 plugin library `lib` (pinned by its digest) at `tier`, limited to
/// 2 GiB and 2 CPUs, its `[model]` table holding `model` (TOML lines).
pub fn qwen3_manifest(lib: &Path, tier: &str, model: &str) -> String {
    let extra = format!(
        "sha256 = \"{}\"\n[limits]\nmemory = \"2GiB\"\ncpus = 2\n[model]\n{model}",
        sha256_of(lib)
    );
    manifest(
        "qwen3-4b-instruct-2507",
        "0.1.0",
        lib.to_str().unwrap(),
        &extra,
    )
    .replace("^1.0", "^1.1")
    .replace("tier = \"low\"", &format!("tier = \"{tier}\""))
}

/// `read` that tries again when a signal interrupts it: a read with a timeout is not restarted
/// after a handler runs (signal(7)), and this process has tokio's SIGCHLD handler, which any
/// daemon the other tests stop sets off.
pub fn read_through_signals(
    from: &mut impl std::io::Read,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        match from.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            got => return got,
        }
    }
}

/// The lowercase hex SHA-256 of a file, by `sha256sum`.
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A libc call's result as an `io::Result`: negative is the thread's last OS error.
pub fn os(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r >= 0 {
        Ok(r)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `pio args` from `cwd` in a mount namespace of its own, private all through, after
/// `setup` has changed its mounts there; the host's mounts stay as they were.
///
/// # Safety
///
/// `setup` runs between fork and exec in a copy of a multithreaded process: it may make system
/// calls only, on memory it owns (no allocation, no locks).
pub unsafe fn pio_in_own_mounts(
    cwd: &Path,
    args: &[&str],
    mut setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(pio_bin());
    command.current_dir(cwd).args(args);
    // SAFETY: between fork and exec only system calls run (the caller's promise for `setup`),
    // on memory made before the fork that outlives them (`setup` owns what it uses).
    unsafe {
        command.pre_exec(move || {
            let none = std::ptr::null();
            os(libc::unshare(libc::CLONE_NEWNS))?;
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            os(libc::mount(none, c"/".as_ptr(), none, flags, none.cast()))?;
            setup()
        });
    }
    command.output().expect("run pio in a mount namespace")
}

/// `base` (a JSON object) with `extra`'s fields added or replaced.
pub fn merged(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    base
}

/// Makes `dir` and everything in it readable to the workers' unprivileged user.
pub fn open_to_workers(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            open_to_workers(&path);
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// The uid `plugin`'s workers run as under the default configuration: one of its own.
pub fn worker_uid(plugin: &str) -> u32 {
    pio_host::sandbox::users::WorkerUsers::default()
        .uid_for(plugin)
        .expect("the default uid range is mapped here")
}
