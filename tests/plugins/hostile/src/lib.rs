//! `hostile`: a test plugin that, on request, does what a malicious or broken plugin would. The
//! prompt text is the command (`status`, `alloc 512`, `segfault`, `fork-bomb`, ...); the result
//! comes back as one token of text, so tests can assert what the sandbox allowed.
//!
//! Its library constructor records where it ran in `/tmp/pio-hostile-ctor/<pid>` when that
//! directory exists, so tests can prove that plugin code runs only in confined child processes,
//! never in the host.

use std::ffi::CString;
use std::time::{Duration, Instant};

use pio_plugin_api::wire::{InferOutcome, InferRequest, ModelConfig, ModelInfo, Prompt};
use pio_plugin_api::{
    export_plugin, Capabilities, GeneratedToken, PluginError, PluginImpl, Progress, Sink,
};

/// The hostile plugin.
#[derive(Default)]
pub struct Hostile {
    /// The device its model config named at load.
    device: Option<String>,
}

const CTOR_DIR: &str = "/tmp/pio-hostile-ctor";

extern "C" fn constructor() {
    // SAFETY: plain libc calls with valid arguments.
    let (pid, ppid, uid) = unsafe { (libc::getpid(), libc::getppid(), libc::geteuid()) };
    let _ = std::fs::write(
        format!("{CTOR_DIR}/{pid}"),
        format!("pid={pid} ppid={ppid} uid={uid}\n"),
    );
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

fn status() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| status_field(&status, k);
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let memory_cgroup = cgroup
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .and_then(|l| l.rsplit(':').next())
        .unwrap_or("")
        .to_string();
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    let mut core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) };
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let uid_map = uid_map.split_whitespace().collect::<Vec<_>>().join(":");
    format!(
        "uid={} uidmap={uid_map} cpus={} nonewprivs={} capeff={} capbnd={} seccomp={} cgroup={} fds={} env={} core={}",
        field("Uid:"),
        field("Cpus_allowed_list:"),
        field("NoNewPrivs:"),
        field("CapEff:"),
        field("CapBnd:"),
        field("Seccomp:"),
        memory_cgroup,
        fds.join(","),
        env.join(","),
        core.rlim_cur
    )
}

/// Starts 8 threads and reports each thread's seccomp mode.
fn threads_status() -> String {
    // The 8 threads wait at a barrier, not on a timer, so a slow machine can't let them end
    // before their status is read.
    let done = std::sync::Arc::new(std::sync::Barrier::new(9));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                done.wait();
            })
        })
        .collect();
    let mut modes = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.filter_map(|t| t.ok()) {
            // A thread of the worker's own that ended after the listing has no status left to
            // read; a thread that is gone runs nothing unfiltered, so it is not counted.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            modes.push(mode);
        }
    }
    done.wait();
    for h in handles {
        let _ = h.join();
    }
    format!("threads={} seccomp={}", modes.len(), modes.join(","))
}

fn alloc(megabytes: usize) -> String {
    let mut blocks = Vec::new();
    for _ in 0..megabytes {
        let mut block = vec![0u8; 1 << 20];
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        blocks.push(block);
    }
    format!("allocated {megabytes} MiB")
}

fn fork_bomb() -> String {
    let mut forked = 0;
    for _ in 0..10_000 {
        // SAFETY: the child only sleeps and exits.
        match unsafe { libc::fork() } {
            0 => {
                std::thread::sleep(Duration::from_secs(30));
                // SAFETY: exiting the forked child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            -1 => return format!("forked {forked}, then: {}", errno_text()),
            _ => forked += 1,
        }
    }
    format!("forked {forked} without hitting a limit")
}

fn spin(seconds: f64) -> String {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let cpu = usage.ru_utime.tv_sec as f64 + usage.ru_utime.tv_usec as f64 / 1e6;
    format!(
        "cpu_seconds={cpu:.3} wall_seconds={:.3} ({})",
        start.elapsed().as_secs_f64(),
        x % 2
    )
}

fn double_fork() -> String {
    // SAFETY: the children only call async-signal-safe functions before sleeping or exiting.
    unsafe {
        let mut pipe = [0i32; 2];
        libc::pipe(pipe.as_mut_ptr());
        match libc::fork() {
            0 => {
                libc::setsid();
                let grandchild = libc::fork();
                if grandchild == 0 {
                    libc::sleep(120);
                    libc::_exit(0);
                }
                libc::write(pipe[1], (&grandchild as *const i32).cast(), 4);
                libc::_exit(0);
            }
            -1 => format!("fork failed: {}", errno_text()),
            child => {
                libc::close(pipe[1]);
                let mut grandchild = 0i32;
                libc::read(pipe[0], (&mut grandchild as *mut i32).cast(), 4);
                libc::waitpid(child, std::ptr::null_mut(), 0);
                format!("grandchild={grandchild}")
            }
        }
    }
}

/// The first word after `key` in a `/proc/<pid>/status` text ("" when absent).
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// What pid 1 of the worker's namespace (the reaper, which answers refused calls) holds.
fn reaper() -> String {
    let status = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
    let field = |k: &str| status_field(&status, k);
    let fds = std::fs::read_dir("/proc/1/fd").map_or_else(|e| e.to_string(), |_| "open".into());
    format!(
        "capeff={} capprm={} fds={fds}",
        field("CapEff:"),
        field("CapPrm:")
    )
}

/// Stops this process for a moment while a thread sleeps, as Ctrl-Z and `fg` or a frozen cgroup
/// do: the sleep resumes through `restart_syscall`, which a filter must let through.
fn stop_and_continue() -> String {
    let sleeper = std::thread::spawn(|| {
        let t = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec; no remainder wanted.
        let r = unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
        let how = if r == 0 { "slept".into() } else { errno_text() };
        format!("nanosleep {r}: {how}")
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: the child only calls async-signal-safe functions before exiting.
    unsafe {
        match libc::fork() {
            0 => {
                // Continues the parent whenever its stop has landed (a SIGCONT to a running
                // process does nothing).
                let tick = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                for _ in 0..10 {
                    libc::nanosleep(&tick, std::ptr::null_mut());
                    libc::kill(libc::getppid(), libc::SIGCONT);
                }
                libc::_exit(0);
            }
            -1 => return format!("fork failed: {}", errno_text()),
            child => {
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::waitpid(child, std::ptr::null_mut(), 0);
            }
        }
    }
    sleeper
        .join()
        .unwrap_or_else(|_| "the sleeper panicked".into())
}

fn attack(command: &str) -> Result<String, PluginError> {
    let mut words = command.split_whitespace();
    let verb = words.next().unwrap_or("");
    let arg = words.next().unwrap_or("");
    // SAFETY (for the libc calls below): plain system calls with valid arguments; failures are
    // reported through errno.
    let result = unsafe {
        match verb {
            "status" => status(),
            "alloc" => alloc(arg.parse().unwrap_or(64)),
            "segfault" => {
                std::ptr::null_mut::<u8>().write_volatile(1);
                "survived a segfault".into()
            }
            "abort" => std::process::abort(),
            "exit" => std::process::exit(3),
            "panic" => panic!("hostile plugin panics on request"),
            "fork-bomb" => fork_bomb(),
            "stop-continue" => stop_and_continue(),
            "reaper" => reaper(),
            "spin" => spin(arg.parse().unwrap_or(1.0)),
            "freeze" => loop {
                // Stopped again whenever something resumes it (the kernel sends SIGCONT to a
                // stopped process whose group becomes orphaned).
                libc::kill(libc::getpid(), libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(10));
            },
            "loop" => loop {
                std::hint::spin_loop();
            },
            "list" => list(arg),
            "peek" => peek(arg),
            "read" => match std::fs::read(arg) {
                Ok(bytes) => format!("read {} bytes", bytes.len()),
                Err(e) => format!("denied: {e}"),
            },
            "fill" => fill(arg),
            "write" => match std::fs::write(arg, b"hostile") {
                Ok(()) => "wrote".into(),
                Err(e) => format!("denied: {e}"),
            },
            "kill-parent" => {
                if libc::kill(libc::getppid(), libc::SIGKILL) == 0 {
                    "killed the parent".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "ptrace-parent" => {
                let r = libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), 0usize, 0usize);
                if r == 0 {
                    "attached to the parent".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "kill" => {
                if libc::kill(arg.parse().unwrap_or(0), libc::SIGKILL) == 0 {
                    "killed it".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "ptrace" => {
                let r = libc::ptrace(
                    libc::PTRACE_ATTACH,
                    arg.parse::<i32>().unwrap_or(0),
                    0usize,
                    0usize,
                );
                if r == 0 {
                    "attached".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            // Takes SIGSYS over (ignored), then makes a call the filter refuses: it still fails
            // with EPERM (a refusal that trapped into a handler here would now be lost).
            "sigsys" => {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut current) != 0 {
                    return Ok(format!("asking SIGSYS's action failed: {}", errno_text()));
                }
                let taken = if libc::signal(libc::SIGSYS, libc::SIG_IGN) == libc::SIG_ERR {
                    format!("sigaction denied: {}", errno_text())
                } else {
                    "sigaction taken".into()
                };
                let r = libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                format!("{taken}; ptrace {r}: {}", errno_text())
            }
            // A refused call from a thread that blocks every signal, as libraries' helper
            // threads do: a refusal by SIGSYS would kill the worker; it should fail with EPERM.
            "blocked-ptrace" => std::thread::spawn(|| {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                let r = libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                format!("ptrace with every signal blocked {r}: {}", errno_text())
            })
            .join()
            .unwrap_or_else(|_| "the thread panicked".into()),
            // A refused call, then a failed request: the error should say what was refused.
            "fail-after-ptrace" => {
                libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                return Err(PluginError::internal(format!(
                    "hostile gives up after ptrace ({})",
                    errno_text()
                )));
            }
            "mount" => {
                let (src, target, fstype) =
                    (c"none", CString::new(arg).unwrap_or_default(), c"tmpfs");
                if libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                ) == 0
                {
                    "mounted".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "unshare" => {
                if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    "unshared".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "x32-getpid" => {
                let r = libc::syscall(0x4000_0000 | libc::SYS_getpid);
                if r >= 0 {
                    format!("x32 call answered {r}")
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "threads" => threads_status(),
            "tiocsti" => {
                // Push a character into the terminal's input (CVE-2017-5226 style), with the
                // command's upper 32 bits set as well (CVE-2019-10063).
                let c = b'x';
                let plain = libc::ioctl(0, libc::TIOCSTI, &c);
                let plain_err = errno_text();
                let wide = libc::syscall(libc::SYS_ioctl, 0, (1u64 << 32) | libc::TIOCSTI, &c);
                if plain == 0 || wide == 0 {
                    "injected".into()
                } else {
                    format!("denied: {plain_err}")
                }
            }
            "int80-getpid" => {
                // The 32-bit system-call entry: getpid is number 20 there.
                let mut ret: i64 = 20;
                std::arch::asm!("int 0x80", inlateout("rax") ret, options(nostack));
                format!("int 0x80 answered {ret}")
            }
            "setns" => {
                let path = c"/proc/1/ns/net";
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    format!("denied: {}", errno_text())
                } else if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    "joined another namespace".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "exec" => {
                // Runs a program and returns its output: e.g. a setuid binary printing its euid.
                let mut parts = command.split_whitespace().skip(1);
                let program = parts.next().unwrap_or("/bin/true");
                match std::process::Command::new(program).args(parts).output() {
                    Ok(out) => format!("ran: {}", String::from_utf8_lossy(&out.stdout).trim()),
                    Err(e) => format!("denied: {e}"),
                }
            }
            "connect" => {
                match std::net::TcpStream::connect(("127.0.0.1", arg.parse().unwrap_or(1))) {
                    Ok(_) => "connected".into(),
                    Err(e) => format!("denied: {e}"),
                }
            }
            "setuid-root" => {
                if libc::setuid(0) == 0 {
                    "became root".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "double-fork" => double_fork(),
            "huge-file" => {
                let path = CString::new(arg).unwrap_or_default();
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
                if fd < 0 {
                    return Ok(format!("denied: {}", errno_text()));
                }
                let block = vec![0u8; 1 << 20];
                let mut written = 0usize;
                loop {
                    let n = libc::write(fd, block.as_ptr().cast(), block.len());
                    if n <= 0 {
                        let e = errno_text();
                        libc::close(fd);
                        break format!("wrote {written} bytes, then: {e}");
                    }
                    written += n as usize;
                    if written >= 1 << 30 {
                        libc::close(fd);
                        break format!("wrote {written} bytes without a limit");
                    }
                }
            }
            other => {
                return Err(PluginError::invalid_input(format!(
                    "hostile: unknown attack `{other}`"
                )))
            }
        }
    };
    Ok(result)
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

/// The names in folder `path`, sorted.
fn list(path: &str) -> String {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect();
            names.sort();
            format!("listed {}", names.join(" "))
        }
        Err(e) => format!("denied: {e}"),
    }
}

/// Reads at most 8 bytes of `path` without waiting (a device that never ends, such as
/// `/dev/zero`, or one with nothing to say, such as `/dev/ptmx`, included).
fn peek(path: &str) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut buf = [0u8; 8];
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    // A device with nothing yet (an unseeded /dev/random) gets two seconds to say something.
    let mut read = |f: &mut std::fs::File| match f.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            use std::os::fd::AsRawFd;
            let mut ready = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the call's length.
            unsafe { libc::poll(&mut ready, 1, 2000) };
            f.read(&mut buf)
        }
        other => other,
    };
    match opened.and_then(|mut f| read(&mut f)) {
        Ok(n) => format!("peeked {n} bytes"),
        Err(e) => format!("denied: {e}"),
    }
}

/// Writes `path` until the file system refuses, then says how far it got and why.
fn fill(path: &str) -> String {
    use std::io::Write;
    let mut file = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return format!("denied: {e}"),
    };
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut written = 0usize;
    loop {
        match file.write(&chunk) {
            Ok(0) => return format!("full after {written} bytes: wrote nothing"),
            Ok(n) => written += n,
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(path);
                return format!("full after {written} bytes: {e}");
            }
        }
        if written > 1 << 30 {
            return format!("wrote {written} bytes without limit");
        }
    }
}
