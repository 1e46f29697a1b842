//! `GET /v1/models`, the admin API (`/v1/plugins`), and `/health`, `/ready`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::models::PluginStatus;
use super::App;

fn model_object(s: &super::models::PluginStatus) -> Value {
    json!({
        "id": s.name,
        "object": "model",
        // As vLLM does: the answer's own time (what a model was built at is not known here).
        "created": super::responses::unix_now(),
        "owned_by": "pio",
        // vLLM's: what the model was served from (the name here: the operator's paths stay
        // private) and the base of an adapter (none).
        "root": s.name,
        "parent": null,
        // vLLM's field, which clients size their requests by (null until the model loaded).
        "max_model_len": s.context_length,
        "pio": {
            "version": s.version,
            "state": s.state,
            "capabilities": s.capabilities,
            "context_length": s.context_length,
        },
    })
}

/// `GET /v1/models`: every model served, loaded or loadable.
pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let (plugins, _) = app.models.statuses();
    Json(json!({"object": "list", "data": plugins.iter().map(model_object).collect::<Vec<_>>()}))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (plugins, _) = app.models.statuses();
    plugins
        .iter()
        .find(|p| p.name == id)
        .map(|p| Json(model_object(p)))
        .ok_or_else(|| ApiError::unknown_model(&id))
}

/// `GET /v1/plugins`: each plugin's version, tier, state, worker, memory, last error; and the
/// manifests that failed their checks.
pub async fn plugins(State(app): State<Arc<App>>) -> Json<Value> {
    let (plugins, broken) = app.models.statuses();
    let errors: Vec<Value> = broken
        .iter()
        .map(|(path, why)| json!({"manifest": path, "error": why}))
        .collect();
    let plugins: Vec<Value> = plugins
        .iter()
        .map(|p| {
            let mut v = json!(p);
            v["generated_tokens"] = app.metrics.generated(&p.name).into();
            v
        })
        .collect();
    Json(json!({"plugins": plugins, "errors": errors}))
}

/// `POST /v1/plugins/{name}/{action}` with `load`, `unload` or `reload`.
pub async fn plugin_action(
    State(app): State<Arc<App>>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    // The files as they are now, for what starts a worker (hot plug may be off).
    let afresh = match action.as_str() {
        "reload" => true,
        "load" => app.models.loads_afresh(&name)?,
        _ => false,
    };
    if afresh {
        app.models.recheck(&name).await?;
    }
    let models = app.models.clone();
    let target = name.clone();
    let run = match action.as_str() {
        "load" => tokio::spawn(async move { models.load(&target).await }),
        "unload" => tokio::spawn(async move { models.unload(&target).await }),
        "reload" => tokio::spawn(async move { models.reload(&target).await }),
        other => {
            return Err(ApiError::not_found(format!(
                "unknown action `{other}`; use load, unload or reload"
            )))
        }
    };
    // A task of its own, which a client that hangs up does not cancel: a reload or unload
    // dropped midway would leave the old worker running and listed as draining (or a reload
    // marked under way) for good.
    run.await
        .map_err(|e| ApiError::internal(format!("the {action} of {name} failed: {e}")))??;
    let (plugins, _) = app.models.statuses();
    let status = plugins.into_iter().find(|p| p.name == name);
    Ok(Json(
        json!({"name": name, "action": action, "plugin": status}),
    ))
}

/// `GET /health`: the process is alive and answering.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Whether the daemon serves every preloaded model (warmed up) and is not draining: what
/// `/ready` and systemd's readiness report.
pub fn is_ready(app: &App) -> bool {
    let (plugins, _) = app.models.statuses();
    let server = &app.models.config().server;
    !app.draining.load(Ordering::Acquire)
        && (!server.strict_readiness || preloads_ready(server, &plugins))
}

/// Whether every model `server.preload` asks for can serve: each one found that it matches is
/// ready, or was unloaded on purpose and comes back on its next request (`load_on_demand`: a
/// replica whose models idled out must stay in rotation to get that request, also while that
/// model loads again), or was left unloaded because `max_loaded_models` was full; and each name it
/// spells out is found at all (a model whose manifest fails its checks, its model not there say,
/// keeps a pod out of rotation when it is named; `"*"` waits only for what was found).
fn preloads_ready(server: &crate::config::ServerSection, plugins: &[PluginStatus]) -> bool {
    missing_preloads(server, plugins).next().is_none()
        && plugins
            .iter()
            .filter(|p| server.preloads(&p.name))
            .all(|p| p.state == "ready" || (p.parked && server.load_on_demand) || p.over_cap)
}

/// The names `server.preload` spells out that no checked manifest serves.
fn missing_preloads<'a>(
    server: &'a crate::config::ServerSection,
    plugins: &'a [PluginStatus],
) -> impl Iterator<Item = &'a String> {
    server
        .preload
        .iter()
        .filter(|n| *n != "*" && !plugins.iter().any(|p| &p.name == *n))
}

/// `GET /ready`: 200 when every preloaded model is loaded and has produced a token (warm-up),
/// 503 otherwise or while shutting down; the body has each model's state.
pub async fn ready(State(app): State<Arc<App>>) -> Response {
    let (plugins, _) = app.models.statuses();
    let draining = app.draining.load(Ordering::Acquire);
    let ready = is_ready(&app);
    let config = app.models.config();
    let missing = missing_preloads(&config.server, &plugins).map(|n| (n.clone(), json!("missing")));
    let models: serde_json::Map<String, Value> = plugins
        .iter()
        .map(|p| (p.name.clone(), json!(p.state)))
        .chain(missing)
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": ready, "draining": draining, "models": models})),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text, in the format the scraper's `Accept` asks for.
pub async fn metrics(State(app): State<Arc<App>>, headers: axum::http::HeaderMap) -> Response {
    let (plugins, _) = app.models.statuses();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = super::metrics::Format::accepted(accept);
    let text = app.metrics.render(plugins, format);
    ([(header::CONTENT_TYPE, format.content_type())], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerSection;

    fn plugin(name: &str, state: &str) -> PluginStatus {
        PluginStatus {
            name: name.into(),
            state: state.into(),
            ..PluginStatus::default()
        }
    }

    #[test]
    fn a_named_preload_must_be_found_and_ready() {
        let server = |preload: &[&str]| ServerSection {
            preload: preload.iter().map(|s| s.to_string()).collect(),
            ..ServerSection::default()
        };
        let found = [plugin("echo", "ready"), plugin("qwen", "loading")];
        assert!(!preloads_ready(&server(&["*"]), &found));
        assert!(preloads_ready(&server(&["echo"]), &found));
        assert!(
            !preloads_ready(&server(&["echo", "glm"]), &found),
            "glm was never found"
        );
        let named = server(&["*", "echo", "glm"]);
        let missing: Vec<_> = missing_preloads(&named, &found).collect();
        assert_eq!(missing, ["glm"]);
        assert!(preloads_ready(&server(&["*"]), &found[..1]));
        assert!(
            preloads_ready(&server(&[]), &found),
            "nothing preloaded, nothing awaited"
        );
    }

    #[test]
    fn a_model_unloaded_on_purpose_keeps_the_replica_ready_while_it_loads_on_demand() {
        let mut on_demand = ServerSection::default();
        assert!(on_demand.load_on_demand, "the default");
        let idle = PluginStatus {
            parked: true,
            ..plugin("echo", "unloaded")
        };
        assert!(preloads_ready(&on_demand, std::slice::from_ref(&idle)));
        // Loading again on a request: still in rotation.
        let reloading = PluginStatus {
            parked: true,
            ..plugin("echo", "loading")
        };
        assert!(preloads_ready(&on_demand, &[reloading]));
        // Never loaded yet (the start, a failed load): not ready.
        assert!(!preloads_ready(&on_demand, &[plugin("echo", "unloaded")]));
        on_demand.load_on_demand = false;
        assert!(
            !preloads_ready(&on_demand, &[idle]),
            "nothing would load it"
        );
        // Left out at start by the cap: the operator's choice, ready either way.
        let over_cap = PluginStatus {
            over_cap: true,
            ..plugin("echo", "unloaded")
        };
        assert!(preloads_ready(&on_demand, &[over_cap]));
    }
}
