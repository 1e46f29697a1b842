//! `pio serve`: the daemon. An OpenAI-compatible API over the plugins found in the plugin
//! directories, an admin API, health, readiness and Prometheus metrics; plugins dropped in,
//! replaced or removed are loaded, reloaded blue/green or drained; SIGTERM drains and stops.

pub mod access;
pub mod admin;
mod body;
mod book;
pub mod deployment;
pub mod echo;
pub mod encoding;
pub mod error;
pub mod hotplug;
pub mod inference;
pub mod library;
pub mod link;
pub mod listen;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod openai;
mod outlet;
pub mod output;
pub mod page;
pub mod reasoning;
pub mod reload;
pub mod responses;
pub mod status;
mod streaming;
pub mod structure;
pub mod systemd;
pub mod tokenize;
pub mod tool_calls;
pub mod tool_grammar;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use self::error::ApiError;
use self::models::{Models, Setup};

/// What the handlers share.
pub struct App {
    /// The models.
    pub models: Arc<Models>,
    /// Counters and histograms.
    pub metrics: metrics::Metrics,
    /// The body size limit, bytes.
    pub max_body: u64,
    /// Set once shutdown begins.
    pub draining: AtomicBool,
    /// Whether the daemon listens on a loopback address (where `/metrics` may stay open).
    pub loopback: bool,
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address cannot be bound.
    #[error(
        "cannot listen on {addr}: {source}; pick another address with --listen or server.listen"
    )]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A plugin directory cannot be scanned.
    #[error(transparent)]
    Scan(#[from] crate::discovery::ScanError),
    /// The runtime directory cannot be created.
    #[error("cannot create the runtime directory {path}: {source}; set server.runtime_dir")]
    RuntimeDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Checks the bearer key against what the route needs ([`access::need`]).
async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let config = app.models.config();
    let server = &config.server;
    let need = access::need(request.uri().path(), server, app.loopback);
    let headers = request.headers();
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let given = header(axum::http::header::AUTHORIZATION).and_then(access::bearer_token);
    // Any header but a real key can come from a page (one DNS rebinding made same-origin).
    if !given.is_some_and(|k| access::known_key(k, server)) {
        // HTTP/2 names the host in the URI's authority, not a header.
        let host = header(axum::http::header::HOST)
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        let origin = header(axum::http::header::ORIGIN);
        let why = access::cross_site(
            request.uri().path(),
            request.method(),
            host,
            origin,
            app.loopback,
            &server.allowed_hosts,
        );
        if let Some(why) = why {
            return body::turn_away(&app, ApiError::forbidden(why), request);
        }
    }
    match access::check(need, given, server) {
        Ok(()) => next.run(request).await,
        Err(access::Refusal::Unauthenticated(message)) => {
            body::turn_away(&app, ApiError::unauthorized(message), request)
        }
        Err(access::Refusal::Forbidden(message)) => {
            body::turn_away(&app, ApiError::forbidden(message), request)
        }
    }
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError::method_not_allowed(request.method(), request.uri().path())
}

async fn no_route(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// The id of one HTTP request: the client's `x-request-id` when it is a sane token, else a new
/// one. It comes back as the response's `x-request-id`, marks the daemon's log lines for the
/// request, and travels to the worker, which names it in its own.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl RequestId {
    /// The client's id if it is 1 to 64 characters of `[A-Za-z0-9._-]`, else a fresh one.
    pub fn from_header(given: Option<&str>) -> Self {
        match given {
            Some(id) if crate::names::is_plain(id) => Self(id.to_string()),
            _ => Self(format!(
                "req-{:x}{:06x}",
                std::process::id(),
                NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)
            )),
        }
    }
}

async fn request_id(mut request: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = RequestId::from_header(
        request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
    );
    let span = tracing::info_span!("request", id = %id.0);
    request.extensions_mut().insert(id.clone());
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The router, with request ids, auth and the body limit.
pub fn router(app: Arc<App>) -> Router {
    let limit = usize::try_from(app.max_body).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/models", get(admin::models))
        .route("/v1/models/{id}", get(admin::model))
        .route("/v1/chat/completions", post(inference::chat))
        .route("/v1/completions", post(inference::completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/v1/plugins", get(admin::plugins))
        .route("/v1/plugins/{name}/{action}", post(admin::plugin_action))
        .route("/health", get(admin::health))
        .route("/ready", get(admin::ready))
        .route("/metrics", get(admin::metrics))
        .route("/", get(page::index))
        .route("/ui/app.js", get(page::script))
        .route("/ui/style.css", get(page::style))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            body::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(app)
}

/// Runs the daemon until SIGTERM or SIGINT, then drains: no new connections, requests in
/// flight finish (up to `server.drain_timeout_secs`), workers stop and their cgroups go.
pub async fn serve(setup: Setup) -> Result<(), ServeError> {
    let server = setup.config.server.clone();
    let listener = tokio::net::TcpListener::bind(&server.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: server.listen.clone(),
            source,
        })?;
    let runtime_dir = setup.store.dir().to_path_buf();
    let reload = setup.config_file.clone();
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let systemd = setup.systemd.clone();
    // The folders in force, flags applied (`--plugins` replaces the file's).
    let named = (setup
        .search
        .plugin_dirs
        .iter()
        .map(|d| ("plugin_dirs", d.as_path())))
    .chain(
        setup
            .search
            .library_dirs
            .iter()
            .map(|d| ("library_dirs", d.as_path())),
    )
    .chain((setup.config.server.image_root.iter()).map(|d| ("server.image_root", d.as_path())));
    for problem in crate::config::unusable_folders(named) {
        tracing::warn!("{problem}: create it or correct the configuration (or the flag)");
    }
    if let Some((path, file)) = &setup.config_file {
        let gid = setup.policy.worker_gid;
        if let Some(problem) = crate::config::keys_exposed(path, &file.server, gid) {
            tracing::warn!("{problem}");
        }
    }
    // Watched from before the first scan, whose probes may take seconds: SIGHUP's default
    // action would end the daemon (a log rotation sends one), and one that comes meanwhile is
    // acted on once the daemon serves.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::error!("cannot watch for SIGHUP (configuration reloads): {e}"))
        .ok();
    let stops = stop_signals();
    let models = Models::new(setup);
    // Watched from before the first scan too: a manifest dropped in while its probes run would
    // otherwise wait for some later change to be seen. What arrives meanwhile is scanned for
    // once the first scan is done.
    let (scanned_once, first_scan) = tokio::sync::oneshot::channel();
    let _watcher = (server.watch)
        .then(|| hotplug::watch(models.clone(), first_scan))
        .flatten();
    tokio::select! {
        scanned = models.rescan() => scanned?,
        why = nth_stop(stops.clone(), 1) => {
            tracing::info!("{why} while starting: stopping");
            models.stop_all(Duration::ZERO).await;
            let _ = std::fs::remove_dir_all(&runtime_dir);
            return Ok(());
        }
    }
    let _ = scanned_once.send(());
    models.warn_missing_preloads();
    let app = Arc::new(App {
        models: models.clone(),
        metrics: metrics::Metrics::default(),
        max_body: server.max_body_size.0,
        draining: AtomicBool::new(false),
        loopback,
    });
    background(&models, &server, reload, systemd.clone(), hup);
    if let Some(n) = systemd.clone() {
        tokio::spawn(notify_ready(app.clone(), n.clone()));
        tokio::spawn(n.keep_alive());
    }
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| server.listen.clone());
    tracing::info!("listening on http://{local}");
    if !loopback && server.admin_keys.is_empty() {
        tracing::warn!("the admin API (/v1/plugins, and the web page's status view) is closed: off loopback it needs server.admin_keys");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rules = listen::ConnectionRules {
        header_timeout: Duration::from_secs(server.header_timeout_secs.max(1)),
        send_buffer: server.send_buffer,
    };
    let http = listen::serve(
        listener,
        router(app.clone()),
        rules,
        draining(app, stop_tx, systemd, stops.clone()),
    );
    // Past the deadline (or at a second signal) what still runs is stopped at once, not drained
    // for another deadline.
    let grace = tokio::select! {
        () = http => Duration::from_secs(models.config().server.drain_timeout_secs),
        why = drain_deadline(&models, stop_rx, stops) => {
            tracing::warn!("{why} with requests still running; stopping them");
            Duration::ZERO
        }
    };
    models.stop_all(grace).await;
    let _ = std::fs::remove_dir_all(&runtime_dir);
    tracing::info!("stopped");
    Ok(())
}

/// The daemon's background tasks: SIGHUP reloads, hot plug (the watcher is returned: dropping it
/// stops it), loading again preloads that failed, and unloading idle models.
fn background(
    models: &Arc<Models>,
    server: &crate::config::ServerSection,
    reload: Option<(std::path::PathBuf, crate::config::Config)>,
    systemd: Option<Arc<systemd::Notifier>>,
    hup: Option<tokio::signal::unix::Signal>,
) {
    match (reload, hup) {
        (Some((path, before)), Some(hup)) => {
            tokio::spawn(reload::on_sighup(
                models.clone(),
                path,
                before,
                systemd,
                hup,
            ));
        }
        // Without a file there is nothing to re-read, but SIGHUP must not stop the daemon (its
        // default action).
        (None, Some(hup)) => {
            tokio::spawn(reload::without_a_file(hup));
        }
        (_, None) => {}
    }
    {
        let models = models.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                models.retry_failed_preloads();
            }
        });
    }
    if server.keep_alive_secs > 0 {
        let (models, keep) = (models.clone(), Duration::from_secs(server.keep_alive_secs));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(keep.min(Duration::from_secs(5))).await;
                models.unload_idle(keep).await;
            }
        });
    }
}

/// Tells systemd the daemon is ready once `/ready` would answer 200.
async fn notify_ready(app: Arc<App>, systemd: Arc<systemd::Notifier>) {
    while !admin::is_ready(&app) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (plugins, _) = app.models.statuses();
    let ready = plugins.iter().filter(|p| p.state == "ready").count();
    systemd.ready(&format!("serving {ready} of {} models", plugins.len()));
}

/// Resolves on SIGTERM or SIGINT, once the daemon is marked draining (`/ready` turns 503).
async fn draining(
    app: Arc<App>,
    stop: tokio::sync::watch::Sender<bool>,
    systemd: Option<Arc<systemd::Notifier>>,
    stops: StopSignals,
) {
    let why = nth_stop(stops, 1).await;
    if let Some(n) = &systemd {
        n.stopping();
    }
    let secs = app.models.config().server.drain_timeout_secs;
    tracing::info!("{why}: draining (no new connections; requests in flight get {secs} s)");
    app.draining.store(true, Ordering::Release);
    app.models.wind_down();
    let _ = stop.send(true);
}

/// Resolves `server.drain_timeout_secs` (as in force then) after draining began, or at a
/// second SIGTERM or SIGINT (an operator's second Ctrl-C stops at once, as uvicorn's and
/// llama-server's do); says which.
async fn drain_deadline(
    models: &Models,
    mut stop: tokio::sync::watch::Receiver<bool>,
    stops: StopSignals,
) -> &'static str {
    let _ = stop.wait_for(|s| *s).await;
    let secs = models.config().server.drain_timeout_secs;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(secs)) => "the drain deadline passed",
        why = nth_stop(stops, 2) => if why == "SIGTERM" { "a second SIGTERM came" } else { "a second SIGINT came" },
    }
}

/// How many SIGTERMs and SIGINTs have come, and the last one's name.
type StopSignals = tokio::sync::watch::Receiver<(u32, &'static str)>;

/// Counts SIGTERM and SIGINT from now on, in one task: each waiter asks for the count it needs,
/// so none made later misses one that came before it (a new subscription would).
fn stop_signals() -> StopSignals {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel((0, ""));
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let (mut term, mut int) = match (term, int) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot watch for SIGTERM and SIGINT: {e}");
            // The sender stays alive in no task: waiters wait for good.
            std::mem::forget(tx);
            return rx;
        }
    };
    tokio::spawn(async move {
        loop {
            let why = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tx.send_modify(|(n, last)| {
                *n += 1;
                *last = why;
            });
        }
    });
    rx
}

/// Resolves once `n` stop signals have come; says which came last.
async fn nth_stop(mut stops: StopSignals, n: u32) -> &'static str {
    match stops.wait_for(|(count, _)| *count >= n).await {
        Ok(seen) => seen.1,
        Err(_) => std::future::pending().await,
    }
}
