//! `pio serve`: the daemon's command line. Flags override the configuration file.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pio_host::config::LogFormat;
use pio_host::serve::library::LibraryStore;
use pio_host::serve::models::Setup;
use tracing_subscriber::EnvFilter;

use crate::cli_run::TierArgs;
use crate::SearchArgs;

/// Arguments of `pio serve`.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    search: SearchArgs,
    /// Address and port to listen on (default: the config's `server.listen`, 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR", value_parser = listen_address)]
    listen: Option<String>,
    #[command(flatten)]
    tiers: TierArgs,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // First, while this process has one thread: it takes the variables out of the environment.
    let systemd = pio_host::serve::systemd::Notifier::from_env().map(std::sync::Arc::new);
    let crate::Settings { mut config, search } = crate::settings(&args.search)?;
    let config_file = (args.search.config.clone()).map(|path| (path, config.clone()));
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    init_logging(config.server.log_format);
    let policy = args.tiers.policy(config.policy());
    // systemd's RuntimeDirectory= (the shipped unit's /run/pio) is private to the daemon.
    let systemd_dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| std::env::split_paths(&v).next())
        .filter(|d| d.is_absolute());
    let own_runtime_dir = config.server.runtime_dir.is_none() && systemd_dir.is_none();
    let runtime_dir = match config.server.runtime_dir.clone().or(systemd_dir) {
        Some(dir) => dir,
        None => {
            let temp = std::env::temp_dir();
            let reaped = pio_host::serve::library::reap_stale_runtime_dirs(&temp);
            if reaped > 0 {
                tracing::info!(
                    reaped,
                    "removed the runtime folders of daemons no longer running"
                );
            }
            pio_host::serve::library::create_default_runtime_dir(&temp, std::process::id())
                .context("cannot make the daemon's runtime folder")?
        }
    };
    let store = LibraryStore::create(runtime_dir.join("libs")).with_context(|| {
        format!(
            "cannot create the runtime directory {}; set server.runtime_dir",
            runtime_dir.display()
        )
    })?;
    let exe: PathBuf =
        std::env::current_exe().context("cannot find the running `pio` executable")?;
    let setup = Setup {
        config,
        config_file,
        search,
        policy,
        exe,
        store,
        systemd,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(pio_host::serve::serve(setup))?;
    // The folder made for this process goes too (its libraries' copies went with the daemon);
    // a configured one is the operator's.
    if own_runtime_dir {
        let _ = std::fs::remove_dir(&runtime_dir);
    }
    Ok(())
}

/// Logs on stderr, as text or JSON lines; `RUST_LOG` overrides the level (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// `--listen` checked as the configuration's `listen` is.
fn listen_address(addr: &str) -> Result<String, String> {
    match pio_host::config::listen_problem(addr) {
        Some(problem) => Err(problem),
        None => Ok(addr.to_string()),
    }
}
