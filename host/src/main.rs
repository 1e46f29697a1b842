//! `pio`: the command-line front of the PIO host.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pio_host::config::Config;
use pio_host::discovery::{self, Candidate, SearchPaths, Status};
use pio_host::probe::{self, Prober};
use pio_host::report;

/// `println!` for the commands' output that returns [`cli_run::OutputClosed`] instead of
/// panicking when the reader went away (`pio list | head`): `main` then exits as `cat` would.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::cli_run::OutputClosed)
    }};
}

/// `print!` as [`outln!`] is `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*).map_err($crate::cli_run::OutputClosed)
    }};
}

mod cli_bench;
mod cli_list;
mod cli_print;
mod cli_pull;
mod cli_quantize;
mod cli_run;
mod cli_serve;

#[derive(Parser)]
#[command(name = "pio", version, about = "PIO: a plugin host for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the plugins found in the plugin directories, with their status or error; exits 1
    /// when a manifest fails its checks (or, with `--start`, a worker fails to start).
    List {
        #[command(flatten)]
        search: SearchArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also start each ready plugin in its confined worker, load its model, report the
        /// worker (pid, tier applied, state, memory) and stop it again (needs root).
        #[arg(long)]
        start: bool,
        #[command(flatten)]
        tiers: cli_run::TierArgs,
    },
    /// Run every check on a manifest (.toml) or a plugin library, loading it in a child process.
    Check {
        /// A manifest or a library.
        path: PathBuf,
        /// Directories a manifest's library is also looked up in.
        #[arg(long = "library-dir", value_name = "DIR")]
        library_dirs: Vec<PathBuf>,
        /// The daemon's configuration file: its `library_dirs` are searched too (after
        /// `--library-dir`) and its `sandbox.worker_uid`/`worker_gid` probe the library.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one request through a plugin, streaming the output as it is generated.
    Run(cli_run::RunArgs),
    /// Measure a plugin under concurrent load: throughput, TTFT and inter-token latency.
    Bench(cli_bench::BenchArgs),
    /// Download a Hugging Face snapshot and write a manifest for the plugin that serves it.
    ///
    /// Environment: HF_TOKEN (gated and private repositories), HF_ENDPOINT (a mirror),
    /// HF_HUB_DOWNLOAD_TIMEOUT (seconds to wait for a connection and each answer; 10).
    Pull(cli_pull::PullArgs),
    /// Quantize a plugin's model ahead of time into its manifest's `quantization_cache`.
    Quantize(cli_quantize::QuantizeArgs),
    /// Serve the plugins over an OpenAI-compatible HTTP API until SIGTERM.
    Serve(cli_serve::ServeArgs),
    /// Load one library and print what it is as JSON (the child side of `check` and `list`).
    #[command(hide = true)]
    Probe {
        /// The uid to run as when started as root.
        #[arg(long, default_value_t = 65534)]
        uid: u32,
        /// The gid to run as when started as root.
        #[arg(long, default_value_t = 65534)]
        gid: u32,
        /// Read a manifest's model config (JSON) from stdin, and ask the plugin whether it
        /// supports it.
        #[arg(long)]
        model_config_on_stdin: bool,
        /// The library.
        library: PathBuf,
    },
    /// Serve one plugin over the socket at fd 3 (started by the host, never by hand).
    #[command(hide = true)]
    Worker,
}

#[derive(Args)]
pub(crate) struct SearchArgs {
    /// The daemon configuration file (plugin directories, sandbox policy, default limits).
    #[arg(long, value_name = "FILE", env = "PIO_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// A directory of plugin manifests; repeat for several (default: the config's
    /// `plugin_dirs`, else `manifests`).
    #[arg(long = "plugins", value_name = "DIR")]
    pub(crate) plugin_dirs: Vec<PathBuf>,
    /// Directories a manifest's library is also looked up in.
    #[arg(long = "library-dir", value_name = "DIR")]
    pub(crate) library_dirs: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::List { .. }
            | Command::Check { .. }
            | Command::Run(_)
            | Command::Bench(_)
            | Command::Pull(_)
            | Command::Quantize(_)
    ) {
        // Worker output and supervisor notes, as plain lines on stderr.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .without_time()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
    let result = match cli.command {
        Command::List {
            search,
            json,
            start,
            tiers,
        } => list(search, json, start, tiers),
        Command::Check {
            path,
            library_dirs,
            config,
            json,
        } => check(&path, library_dirs, config.as_deref(), json),
        Command::Run(args) => cli_run::run(args).map(ExitCode::from),
        Command::Bench(args) => cli_bench::run(args).map(ExitCode::from),
        Command::Pull(args) => cli_pull::run(args).map(ExitCode::from),
        Command::Quantize(args) => cli_quantize::run(args).map(ExitCode::from),
        Command::Serve(args) => cli_serve::serve(args).map(|()| ExitCode::SUCCESS),
        Command::Probe {
            uid,
            gid,
            model_config_on_stdin,
            library,
        } => {
            let config = model_config_on_stdin.then(|| {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text);
                text
            });
            return ExitCode::from(probe::run_child(&library, (uid, gid), config.as_deref()) as u8);
        }
        Command::Worker => {
            return ExitCode::from(pio_host::worker::run(pio_host::worker::SOCKET_FD) as u8)
        }
    };
    match result {
        Ok(code) => code,
        // The reader of the output went away (`pio run ... | head`): quietly, with the status a
        // shell gives a command SIGPIPE ended, as `cat` would.
        Err(e) if broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "error: {}", error_chain(&e));
            // Stopped by a signal: the status a shell expects (130 for Ctrl-C).
            let halted = e.downcast_ref::<cli_run::Halted>();
            ExitCode::from(halted.map_or(2, |h| h.by.exit_code()))
        }
    }
}

/// Whether `e` is `pio run`'s output written to a pipe whose reader is gone (not any broken
/// pipe: a download's is an error to report).
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<cli_run::OutputClosed>()
        .is_some_and(|c| c.0.kind() == std::io::ErrorKind::BrokenPipe)
}

pub(crate) fn search_paths(plugin_dirs: Vec<PathBuf>, library_dirs: Vec<PathBuf>) -> SearchPaths {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    SearchPaths {
        plugin_dirs,
        library_dirs,
        exe_dir,
    }
}

/// The configuration file (or the defaults) with the command line's flags applied.
pub(crate) struct Settings {
    pub(crate) config: Config,
    pub(crate) search: SearchPaths,
}

pub(crate) fn settings(args: &SearchArgs) -> anyhow::Result<Settings> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let mut plugin_dirs = args.plugin_dirs.clone();
    if plugin_dirs.is_empty() {
        plugin_dirs = config.plugin_dirs.clone();
    }
    if plugin_dirs.is_empty() {
        plugin_dirs.push(PathBuf::from("manifests"));
    }
    let mut library_dirs = args.library_dirs.clone();
    library_dirs.extend(config.library_dirs.iter().cloned());
    let search = search_paths(plugin_dirs, library_dirs);
    Ok(Settings { config, search })
}

/// A prober dropping to the workers' user of `config`.
pub(crate) fn prober(config: &pio_host::config::Config) -> anyhow::Result<Prober> {
    Ok(Prober::current_exe()
        .context("cannot find the running `pio` executable to probe libraries with")?
        .with_users(&config.policy()))
}

fn list(
    args: SearchArgs,
    json: bool,
    start: bool,
    tiers: cli_run::TierArgs,
) -> anyhow::Result<ExitCode> {
    let Settings { config, search } = settings(&args)?;
    let mut candidates = discovery::discover(&search, &prober(&config)?)?;
    // As `pio check` does: a manifest the daemon (its config and these flags) would refuse to
    // start on any host fails here.
    let policy = tiers.policy(config.policy());
    for candidate in &mut candidates {
        pio_host::launch::check_confinement(candidate, &config, &policy);
    }
    let started = match start {
        true => Some(cli_list::start_all(&candidates, &config, &policy)?),
        false => None,
    };
    if json {
        let mut rows: Vec<_> = candidates.iter().map(report::candidate_json).collect();
        if let Some(started) = &started {
            let workers = cli_list::json(started);
            for row in &mut rows {
                if let Some(w) = row["name"].as_str().and_then(|n| workers.get(n)) {
                    if row["status"] == "ready" {
                        row["worker"] = w.clone();
                    }
                }
            }
        }
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
    } else if candidates.is_empty() {
        outln!(
            "no plugin manifests found in {}",
            display_dirs(&search.plugin_dirs)
        )?;
    } else {
        out!("{}", report::candidates_table(&candidates))?;
        if let Some(started) = &started {
            out!("{}", cli_list::table(started))?;
        }
    }
    // Scripts and deploy checks (`pio list && systemctl reload`) read the status, as `pio check`'s.
    let failed = candidates
        .iter()
        .any(|c| matches!(c.status, Status::Failed(_)))
        || started.iter().flatten().any(|s| s.outcome.is_err());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    let names: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
    names.join(", ")
}

fn check(
    path: &Path,
    mut library_dirs: Vec<PathBuf>,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !path.exists() {
        let why = format!(
            "{}: no such file; pass a plugin manifest (.toml) or a plugin library",
            path.display()
        );
        if json {
            // Scripts reading stdout get JSON here too.
            let value = serde_json::json!({"manifest": path, "status": "error", "error_kind": "not_found", "error": why});
            outln!("{}", serde_json::to_string_pretty(&value)?)?;
            return Ok(ExitCode::FAILURE);
        }
        anyhow::bail!(why);
    }
    let config = match config {
        Some(file) => Config::load(file)?,
        None => Config::default(),
    };
    library_dirs.extend(config.library_dirs.iter().cloned());
    let prober = prober(&config)?;
    let is_manifest = path.extension().is_some_and(|x| x == "toml");
    let candidate = if is_manifest {
        let search = search_paths(Vec::new(), library_dirs);
        let mut candidate = discovery::check_static(path, &search);
        discovery::check_library(&mut candidate, &prober);
        pio_host::launch::check_confinement(&mut candidate, &config, &config.policy());
        candidate
    } else {
        // Absolute, so that a bare `libx.so` is this file and not a name for the system's
        // library search.
        let library = pio_host::launch::resolved(path);
        let mut candidate = Candidate {
            manifest_path: PathBuf::new(),
            manifest: None,
            library: Some(library.clone()),
            report: None,
            status: Status::Ready,
            fingerprint: None,
        };
        match prober.probe(&library) {
            Ok(r) => candidate.report = Some(r),
            Err(e) => candidate.status = Status::Failed(e.into()),
        }
        candidate
    };
    let failed = matches!(candidate.status, Status::Failed(_));
    if json {
        let mut value = report::candidate_json(&candidate);
        if !is_manifest {
            value["manifest"] = serde_json::Value::Null;
            if let Some(r) = &candidate.report {
                value["name"] = r.name.clone().into();
                value["version"] = r.version.clone().into();
            }
        }
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else if let Status::Failed(e) = &candidate.status {
        eprintln!("check failed: {e}");
    } else if let Some(r) = &candidate.report {
        outln!(
            "ok: {} {} ({}), built against plugin-api {}, capabilities: {}",
            r.name,
            r.version,
            r.family,
            r.api_version,
            r.capabilities.names().join(", ")
        )?;
        if let Some(lib) = &candidate.library {
            outln!("library: {}", lib.display())?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `e` and its causes, joined by ": " as anyhow's `{:#}` does, less each cause that the text
/// already says: a library error may name its source in its own message (what to do next
/// follows it), and printing the source again repeated it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if says(&text, &said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// Whether `text` holds `part` as one of its clauses: at the start or after ": ", and followed by
/// the end, ";", ":" or ",", so that a short cause ("timed out") is not dropped for a word that
/// merely appears.
fn says(text: &str, part: &str) -> bool {
    !part.is_empty()
        && text.match_indices(part).any(|(at, _)| {
            let before = &text[..at];
            let after = &text[at + part.len()..];
            (before.is_empty() || before.ends_with(": "))
                && (after.is_empty() || after.starts_with([';', ':', ',']))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on {addr}: {source}; pick another address")]
    struct Listen {
        addr: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_gives_is_not_repeated() {
        let source = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let listen = Listen {
            addr: "127.0.0.1:8080".into(),
            source,
        };
        let e = anyhow::Error::new(listen).context("cannot start the daemon");
        assert_eq!(
            error_chain(&e),
            "cannot start the daemon: cannot listen on 127.0.0.1:8080: Address already in use; pick another address"
        );
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("reading x.toml");
        assert_eq!(error_chain(&e), "reading x.toml: No such file");
        // A cause that only appears inside another clause is still given.
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let e = anyhow::Error::new(io).context("the probe of libx.so timed out waiting");
        assert_eq!(
            error_chain(&e),
            "the probe of libx.so timed out waiting: timed out"
        );
    }
}
