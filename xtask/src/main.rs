//! Workspace tasks. `cargo run -p pio-host` would build only the host, while `pio` needs the
//! plugin libraries beside it; this builds the default members (host and shipped plugins) and
//! then runs the freshly built `pio`.
//!
//! `cargo pio ARGS...`        release build, then `target/release/pio ARGS...`
//! `cargo xtask pio-dev ARGS` the same in the dev profile

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (profile, dir) = match args.next().as_deref() {
        Some("pio") => (Some("--release"), "release"),
        Some("pio-dev") => (None, "debug"),
        other => {
            eprintln!(
                "usage: cargo pio ARGS... | cargo xtask pio-dev ARGS... (got {:?})",
                other.unwrap_or("nothing")
            );
            return ExitCode::from(2);
        }
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build.arg("build");
    build.args(profile);
    match build.status() {
        Ok(s) if s.success() => {}
        Ok(_) => return ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cannot run cargo: {e}");
            return ExitCode::FAILURE;
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let pio = target.join(dir).join("pio");
    match Command::new(&pio).args(args).status() {
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("cannot run {}: {e}", pio.display());
            ExitCode::FAILURE
        }
    }
}
