//! Workspace tasks. `cargo run -p pio-host` would build only the host, while `pio` needs the
//! plugin libraries beside it; this builds the default members (host and shipped plugins) and
//! then runs the freshly built `pio`.
//!
//! `cargo pio ARGS...`        release build, then `target/release/pio ARGS...`
//! `cargo xtask pio-dev ARGS` the same in the dev profile

use std::path::{Path, PathBuf};
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
    let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|exe| target_dir(&exe))
    else {
        eprintln!("cannot find the target directory: the path of this xtask binary is unknown");
        return ExitCode::FAILURE;
    };
    let pio = target.join(dir).join("pio");
    match Command::new(&pio).args(args).status() {
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("cannot run {}: {e}", pio.display());
            ExitCode::FAILURE
        }
    }
}

/// The target directory cargo built `exe` (this xtask) in: `TARGET/PROFILE/xtask`. Cargo builds
/// `pio` there too, wherever the directory was set (`CARGO_TARGET_DIR`, `build.target-dir`); a
/// path fixed at compile time would name the checkout the binary was first built in.
fn target_dir(exe: &Path) -> Option<PathBuf> {
    Some(exe.parent()?.parent()?.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pio_is_looked_for_in_the_target_directory_xtask_runs_from() {
        let exe = Path::new("/elsewhere/shared-target/debug/xtask");
        assert_eq!(
            target_dir(exe),
            Some(PathBuf::from("/elsewhere/shared-target"))
        );
        assert_eq!(target_dir(Path::new("xtask")), None);
    }
}
