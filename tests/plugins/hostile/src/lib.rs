//! `hostile`: a test plugin that, on request, does what a malicious or broken plugin would. The
//! prompt text is the command (`status`, `alloc 512`, `segfault`, `fork-bomb`, ...); the result
//! comes back as one token of text, so tests can assert what the sandbox allowed.
//!
//! Its library constructor records where it ran in `/tmp/pio-hostile-ctor/<pid>` when that
//! directory exists, so tests can prove that plugin code runs only in confined child processes,
//! never in the host.

use std::time::Duration;

use pio_plugin_api::wire::{InferOutcome, InferRequest, ModelConfig, ModelInfo, Prompt};
use pio_plugin_api::{
    export_plugin, Capabilities, Flow, GeneratedToken, PluginError, PluginImpl, Progress, Sink,
};

mod faults;
mod files;
mod processes;
mod report;
mod resources;
mod syscalls;

/// The hostile plugin.
#[derive(Default)]
pub struct Hostile {
    /// The device its model config named at load.
    device: Option<String>,
}

/// Where the library constructor records its runs, when the folder exists.
const CTOR_DIR: &str = "/tmp/pio-hostile-ctor";

/// When this folder exists, the constructor of a library probe leaves a process behind that
/// leaves its session, holds the probe's pipes and records its pid here.
const LINGER_DIR: &str = "/tmp/pio-hostile-linger";

extern "C" fn constructor() {
    // SAFETY: plain libc calls with valid arguments.
    let (pid, ppid, uid, sid) = unsafe {
        (
            libc::getpid(),
            libc::getppid(),
            libc::geteuid(),
            libc::getsid(0),
        )
    };
    let _ = std::fs::write(
        format!("{CTOR_DIR}/{pid}"),
        format!("pid={pid} ppid={ppid} uid={uid} sid={sid}\n"),
    );
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let probe = cmdline.split(|&b| b == 0).any(|arg| arg == b"probe");
    // A `slow-probe` file beside the probed library holds its probe for 3 s (a daemon's
    // start-up then lasts that long).
    let library = cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .find(|arg| arg.ends_with(".so"));
    let slow = library
        .and_then(|l| std::path::Path::new(l).parent())
        .is_some_and(|folder| folder.join("slow-probe").exists());
    if probe && slow {
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    if probe && std::path::Path::new(LINGER_DIR).is_dir() {
        // SAFETY: the child only calls setsid, writes a file, sleeps and exits without running
        // the parent's destructors.
        unsafe {
            match libc::fork() {
                0 => {
                    libc::setsid();
                    libc::sleep(20);
                    libc::_exit(0);
                }
                // Recorded by the probe itself, before it goes on: the child may be killed
                // before it runs at all.
                child if child > 0 => {
                    let _ = std::fs::write(format!("{LINGER_DIR}/{child}"), b"");
                }
                _ => {}
            }
        }
    }
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

/// The last system call's error, as text.
fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Runs `command` (its first word the attack, then its argument).
fn attack(command: &str) -> Result<String, PluginError> {
    let mut words = command.split_whitespace();
    let verb = words.next().unwrap_or("");
    let arg = words.next().unwrap_or("");
    (report::attack(verb))
        .or_else(|| faults::attack(verb))
        .or_else(|| resources::attack(verb, arg))
        .or_else(|| files::attack(verb, arg))
        .or_else(|| processes::attack(verb, arg, command))
        .or_else(|| syscalls::attack(verb, arg))
        .unwrap_or_else(|| {
            Err(PluginError::invalid_input(format!(
                "hostile: unknown attack `{verb}`"
            )))
        })
}

impl PluginImpl for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILY: &'static str = "hostile";
    const CAPABILITIES: Capabilities = Capabilities::TEXT;

    fn new() -> Result<Self, PluginError> {
        Ok(Hostile::default())
    }

    fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError> {
        // How the tests see what a library probe can reach: asked to, it connects to a local
        // port, and a connection that goes through refuses the config, saying so.
        if let Some(port) = config.extra.get("probe_connect").and_then(|v| v.as_u64()) {
            let port = u16::try_from(port).unwrap_or(1);
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Err(PluginError::invalid_config("the probe reached the network"));
            }
        }
        // A library greedy while checked: the probe touches this many MiB.
        if let Some(mb) = config.extra.get("probe_alloc_mb").and_then(|v| v.as_u64()) {
            let held = vec![1u8; (mb as usize) << 20];
            std::hint::black_box(&held);
        }
        // A library slow to check: the daemon's first scan takes this long.
        if let Some(ms) = config.extra.get("probe_sleep_ms").and_then(|v| v.as_u64()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    }

    fn load_model(
        &mut self,
        config: ModelConfig,
        _: &mut Progress,
    ) -> Result<ModelInfo, PluginError> {
        self.device = config.device;
        // How the tests watch a worker that was stopped while it loaded: a slow load with a file
        // written as it begins and one as it ends, and an exit that never ends by itself.
        let marker = config.extra.get("loaded_marker").and_then(|v| v.as_str());
        if let Some(path) = marker {
            let _ = std::fs::write(format!("{path}.begun"), b"loading");
        }
        if config.extra.get("exit_hangs").and_then(|v| v.as_bool()) == Some(true) {
            extern "C" fn hang() {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            // SAFETY: registers a plain function.
            unsafe { libc::atexit(hang) };
        }
        if let Some(ms) = config.extra.get("load_delay_ms").and_then(|v| v.as_u64()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(path) = marker {
            let _ = std::fs::write(path, b"loaded");
        }
        Ok(ModelInfo::default())
    }

    fn infer(&self, request: InferRequest, sink: &mut Sink) -> Result<InferOutcome, PluginError> {
        let Prompt::Text(command) = &request.prompt else {
            return Err(PluginError::invalid_input(
                "hostile takes a text prompt naming an attack",
            ));
        };
        // `flood N BYTES [stubborn]`: N tokens of BYTES each, whatever `max_tokens` says, while
        // the host takes them (a plugin that does not stop); stubborn, past a cancel too.
        if let Some(args) = command.strip_prefix("flood ") {
            let stubborn = args.ends_with(" stubborn");
            let mut args = args
                .split_whitespace()
                .map(|a| a.parse::<usize>().unwrap_or(1));
            let (n, bytes) = (args.next().unwrap_or(1), args.next().unwrap_or(1));
            let piece = "x".repeat(bytes);
            for i in 0..n {
                let token = GeneratedToken {
                    token_id: i as u32,
                    text: piece.as_str().into(),
                    logprob: None.into(),
                    top_logprobs: Default::default(),
                };
                if sink.emit(token) == Flow::Stop && !stubborn {
                    break;
                }
            }
            return Ok(InferOutcome::default());
        }
        let text = match command.as_str() {
            // Which device the host told it to load on.
            "device" => format!("device {}", self.device.as_deref().unwrap_or("none")),
            _ => attack(command)?,
        };
        sink.emit(GeneratedToken {
            token_id: 0,
            text: text.into(),
            logprob: None.into(),
            top_logprobs: Default::default(),
        });
        Ok(InferOutcome::default())
    }

    fn cleanup(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
}

export_plugin!(Hostile);
