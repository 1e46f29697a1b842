//! The worker process (`pio worker`, hidden): one per loaded plugin. It waits on its inherited
//! socket for `Start`, confines itself by the plan (still single-threaded), only then loads the
//! plugin library, and serves the frame protocol: loads and unloads run one at a time, requests
//! run concurrently on their own threads and stream tokens back as they are produced.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, RwLock};

use pio_plugin_api::{PluginBox, PluginLibrary, ProgressSink_TO, TD_Opaque, TokenSink_TO};

use crate::fault::Fault;
use crate::probe::LibraryReport;
use crate::protocol::{read_frame, FromWorker, ToWorker, WireError, PROTOCOL_VERSION};
use crate::sandbox::{confine, refusals};

mod sinks;
mod threads;
use sinks::{Control, Outbox, WireProgress, WireSink};
use threads::{Job, Threads};

/// The fd number the host puts the worker's socket at.
pub const SOCKET_FD: RawFd = 3;

fn fail_start(outbox: &Outbox, kind: Fault, message: String) -> i32 {
    let _ = writeln!(std::io::stderr(), "worker: {kind}: {message}");
    outbox.send(&FromWorker::StartFailed {
        error: with_refusals(WireError::new(kind, message)),
    });
    1
}

/// `error`, naming the system calls the sandbox refused when there were any: the likeliest
/// reason a plugin that works at a lower tier fails at this one.
fn with_refusals(mut error: WireError) -> WireError {
    if let Some(refused) = refusals::summary() {
        error.message = format!("{} ({refused})", error.message);
    }
    error
}

/// The first frame, which must be `Start` in this build's protocol: what to load, how to confine.
fn read_start(
    reader: &mut UnixStream,
) -> Result<
    (
        std::path::PathBuf,
        crate::sandbox::Plan,
        pio_plugin_api::wire::HostContext,
    ),
    (Fault, String),
> {
    match read_frame::<ToWorker>(reader) {
        Ok(Some(ToWorker::Start {
            protocol,
            library,
            plan,
            host_context,
        })) => {
            if protocol != PROTOCOL_VERSION {
                return Err((Fault::Protocol, format!(
                    "host speaks worker protocol {protocol}, this worker {PROTOCOL_VERSION}; host and worker must be the same pio build"
                )));
            }
            Ok((library, plan, host_context))
        }
        Ok(_) => Err((Fault::Protocol, "expected Start as the first frame".into())),
        Err(e) => Err((Fault::Protocol, e.to_string())),
    }
}

/// The worker's main: serves the socket at `fd` until the host closes it. Returns the exit code.
pub fn run(fd: RawFd) -> i32 {
    // Whatever the daemon's process had open without CLOEXEC stops here: the worker keeps its
    // stdio and its socket only.
    // SAFETY: closes descriptors this process does not use; nothing else is running yet.
    unsafe { libc::close_range(fd as u32 + 1, u32::MAX, 0) };
    // A program the plugin runs does not inherit the socket (the host's dup2 cleared the flag):
    // holding it, it would keep the host from seeing this worker's end.
    // SAFETY: sets a flag on this process's own descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the host hands the worker its end of a socketpair at this fd and nothing else
    // owns it in this process.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let Ok(write_half) = stream.try_clone() else {
        return 1;
    };
    let outbox = Outbox(Arc::new(Mutex::new(write_half)));
    let mut reader = stream;

    let (library, plan, host_context) = match read_start(&mut reader) {
        Ok(start) => start,
        Err((kind, message)) => return fail_start(&outbox, kind, message),
    };

    let applied = match confine::apply(&plan) {
        Ok(applied) => applied,
        Err(e) => return fail_start(&outbox, Fault::Confine, e.to_string()),
    };
    let lib = match PluginLibrary::load(&library) {
        Ok(lib) => lib,
        Err(e) => return fail_start(&outbox, Fault::Load, e.to_string()),
    };
    let info = lib.info();
    let mut plugin = match lib.instantiate() {
        Ok(p) => p,
        Err(e) => return fail_start(&outbox, Fault::Construct, e.to_string()),
    };
    let context = serde_json::to_string(&host_context).unwrap_or_else(|_| "{}".into());
    if let Err(e) = plugin.initialize(context.as_str().into()).into_result() {
        return fail_start(&outbox, Fault::Initialize, e.to_string());
    }
    let ready = FromWorker::Ready {
        protocol: PROTOCOL_VERSION,
        plugin: LibraryReport {
            api_version: lib.built_with().to_string(),
            name: info.name.into_string(),
            version: info.version.into_string(),
            family: info.family.into_string(),
            capabilities: info.capabilities,
        },
        applied,
        features: features(info.capabilities),
    };
    if !outbox.send(&ready) {
        return 0;
    }
    // From `medium` up the worker's /dev holds its GPU's nodes alone (`sandbox::dev`).
    let one_gpu = plan.isolation.as_ref().is_some_and(|i| i.gpu.is_some());
    serve(reader, outbox, plugin, one_gpu)
}

/// The optional additions this worker's plugin allows: `stats` asks only of a plugin that
/// declares it answers them (one built against 1.7 without knowing the field would run the
/// empty request as a generation).
fn features(capabilities: pio_plugin_api::Capabilities) -> Vec<String> {
    capabilities
        .contains(pio_plugin_api::Capabilities::ENGINE_STATS)
        .then(|| crate::protocol::STATS.to_string())
        .into_iter()
        .collect()
}

/// What every request thread of the worker shares.
struct Served {
    plugin: RwLock<PluginBox>,
    outbox: Outbox,
    /// Running requests' cancel flags and flow-control windows.
    controls: Mutex<HashMap<u64, Arc<Control>>>,
    /// Whether the worker sees one GPU only, which CUDA then numbers 0 (`gpu::inside_one_gpu`).
    one_gpu: bool,
    /// The threads loads, unloads and requests run on.
    threads: Threads,
    /// Whether a stats ask is in the plugin now: one that blocks (an engine lock held through a
    /// long prefill) is not joined by another thread at each health check.
    stats_running: std::sync::atomic::AtomicBool,
}

/// A plugin result's JSON parsed into `T`, or an internal error saying `what` was malformed.
fn parsed<T: serde::de::DeserializeOwned>(
    result: Result<pio_plugin_api::RString, pio_plugin_api::PluginError>,
    what: &str,
) -> Result<T, WireError> {
    let json = result.map_err(WireError::from)?;
    serde_json::from_str(&json).map_err(|e| {
        WireError::new(
            Fault::Internal,
            format!("the plugin returned malformed {what}: {e}"),
        )
    })
}

impl Served {
    /// Request `id` is over: its control goes.
    /// Ends request `id`: its sink, if the plugin kept it past `infer`, stops at once (a late
    /// emit waited for credit no one would grant, and no cancel could reach it).
    fn forget(&self, id: u64) {
        if let Some(control) = self.controls.lock().ok().and_then(|mut c| c.remove(&id)) {
            control.cancel();
        }
    }

    fn control(&self, id: u64) -> Option<Arc<Control>> {
        self.controls.lock().ok()?.get(&id).cloned()
    }

    fn load(&self, config: &pio_plugin_api::wire::ModelConfig) -> FromWorker {
        let mut config = config.clone();
        if self.one_gpu {
            config.device = crate::sandbox::gpu::inside_one_gpu(config.device);
        }
        let json = serde_json::to_string(&config).unwrap_or_else(|_| "{}".into());
        let progress = ProgressSink_TO::from_value(WireProgress(self.outbox.clone()), TD_Opaque);
        let result = match self.plugin.write() {
            Ok(mut p) => p.load_model(json.as_str().into(), progress).into_result(),
            Err(_) => Err(pio_plugin_api::PluginError::internal(
                "plugin lock poisoned",
            )),
        };
        match parsed(result, "model info") {
            Ok(info) => FromWorker::Loaded { info },
            Err(error) => FromWorker::LoadFailed {
                error: with_refusals(error),
            },
        }
    }

    fn infer(
        &self,
        id: u64,
        request: &pio_plugin_api::wire::InferRequest,
        control: Arc<Control>,
    ) -> FromWorker {
        let json = serde_json::to_string(request).unwrap_or_else(|_| "{}".into());
        let sink = WireSink {
            id,
            outbox: self.outbox.clone(),
            control,
        };
        let sink = TokenSink_TO::from_value(sink, TD_Opaque);
        let result = match self.plugin.read() {
            Ok(p) => p.infer(json.as_str().into(), sink).into_result(),
            Err(_) => Err(pio_plugin_api::PluginError::internal(
                "plugin lock poisoned",
            )),
        };
        self.forget(id);
        match parsed(result, "an outcome") {
            Ok(outcome) => FromWorker::Done { id, outcome },
            Err(error) => {
                let error = with_refusals(error);
                // The daemon forwards this line into its log, the request's id in it.
                let rid = request.request_id.clone().unwrap_or_else(|| id.to_string());
                // A cancelled request (its client went away, or asked) did not fail.
                let ended = match error.kind {
                    crate::fault::Fault::Cancelled => "ended",
                    _ => "failed",
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "worker: request {rid} {ended}: {}",
                    error.message
                );
                FromWorker::Failed { id, error }
            }
        }
    }

    /// The engine's figures, from a `stats_only` request (which generates nothing).
    fn stats(&self, nonce: u64) -> FromWorker {
        use std::sync::atomic::Ordering;
        if self.stats_running.swap(true, Ordering::AcqRel) {
            return FromWorker::Stats {
                nonce,
                engine: None,
            };
        }
        let answer = self.stats_now(nonce);
        self.stats_running.store(false, Ordering::Release);
        answer
    }

    fn stats_now(&self, nonce: u64) -> FromWorker {
        // One token at most, should a plugin take it for a generation after all.
        let request = pio_plugin_api::wire::InferRequest {
            stats_only: true,
            max_tokens: Some(1),
            ..Default::default()
        };
        let json = serde_json::to_string(&request).unwrap_or_else(|_| "{}".into());
        let sink = pio_plugin_api::sinks::CollectSink::new();
        // Not while a load or an unload holds the plugin: asked again at the next check.
        let engine = match self.plugin.try_read() {
            Ok(p) => parsed::<pio_plugin_api::wire::InferOutcome>(
                p.infer(json.as_str().into(), sink.boxed()).into_result(),
                "an outcome",
            )
            .ok()
            .and_then(|o| o.engine),
            Err(_) => None,
        };
        FromWorker::Stats { nonce, engine }
    }

    fn unload(&self) -> FromWorker {
        if let Ok(mut p) = self.plugin.write() {
            if let Err(e) = p.cleanup().into_result() {
                let _ = writeln!(std::io::stderr(), "worker: cleanup failed: {e}");
            }
        }
        FromWorker::Unloaded
    }
}

/// Runs `job` on a thread (see [`Threads`]: past the pids limit it waits for a running one)
/// and sends its reply. When no thread can be had and none runs (a plugin's runaway forks took
/// every pid, say) the host gets `refusal` instead of the worker going down.
fn run_on_thread(
    served: &Arc<Served>,
    refusal: impl FnOnce(&Served, WireError) -> FromWorker + Send + 'static,
    job: impl FnOnce(&Served) -> FromWorker + Send + 'static,
) {
    let (ran, refused) = (served.clone(), served.clone());
    served.threads.run(Job {
        run: Box::new(move || {
            let reply = job(&ran);
            ran.outbox.send(&reply);
        }),
        refuse: Box::new(move |why| {
            let reply = refusal(&refused, WireError::new(Fault::OutOfResources, why));
            refused.outbox.send(&reply);
        }),
    });
}

/// Runs request `id` on a thread, its control (cancel flag, flow-control window) registered.
fn start_request(
    served: &Arc<Served>,
    id: u64,
    request: pio_plugin_api::wire::InferRequest,
    window: Option<u32>,
) {
    let control = Arc::new(Control::with_window(window));
    if let Ok(mut c) = served.controls.lock() {
        c.insert(id, control.clone());
    }
    run_on_thread(
        served,
        // Never started: its control would otherwise stay behind.
        move |s, error| {
            s.forget(id);
            FromWorker::Failed { id, error }
        },
        move |s| s.infer(id, &request, control),
    );
}

fn serve(mut reader: UnixStream, outbox: Outbox, plugin: PluginBox, one_gpu: bool) -> i32 {
    let served = Arc::new(Served {
        plugin: RwLock::new(plugin),
        outbox,
        controls: Mutex::default(),
        one_gpu,
        threads: Threads::default(),
        stats_running: std::sync::atomic::AtomicBool::new(false),
    });
    loop {
        let message = match read_frame::<ToWorker>(&mut reader) {
            Ok(Some(m)) => m,
            // The host closed the socket (or is gone): nothing left to serve.
            Ok(None) => return 0,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "worker: bad frame from host: {e}");
                return 1;
            }
        };
        match message {
            ToWorker::Start { .. } => {
                let _ = writeln!(std::io::stderr(), "worker: ignoring a second Start");
            }
            ToWorker::Ping { nonce } => {
                served.outbox.send(&FromWorker::Pong { nonce });
            }
            ToWorker::Stats { nonce } => run_on_thread(
                &served,
                move |_, _| FromWorker::Stats {
                    nonce,
                    engine: None,
                },
                move |s| s.stats(nonce),
            ),
            ToWorker::Cancel { id } => {
                if let Some(control) = served.control(id) {
                    control.cancel();
                }
            }
            ToWorker::Credit { id, tokens } => {
                if let Some(control) = served.control(id) {
                    control.grant(tokens);
                }
            }
            ToWorker::Load { config } => run_on_thread(
                &served,
                |_, error| FromWorker::LoadFailed { error },
                move |s| s.load(&config),
            ),
            ToWorker::Infer {
                id,
                request,
                window,
            } => start_request(&served, id, request, window),
            ToWorker::Unload => run_on_thread(&served, |_, _| FromWorker::Unloaded, Served::unload),
        }
    }
}

#[cfg(test)]
mod tests {
    use pio_plugin_api::Capabilities;

    /// Stats are asked only of a plugin that declares it answers them: not of one built against
    /// an older plugin-api, nor of one built against 1.7 that never opted in.
    #[test]
    fn only_a_plugin_that_opts_in_is_asked_for_stats() {
        let text = Capabilities::TEXT.union(Capabilities::CHAT);
        assert!(super::features(text).is_empty());
        assert_eq!(
            super::features(text.union(Capabilities::ENGINE_STATS)),
            vec![crate::protocol::STATS.to_string()]
        );
    }
}
