//! A local stand-in for the Hugging Face Hub's file API over the fixture checkpoints, for
//! `pio pull`'s tests: the model listing with sizes and LFS SHA-256s, and file downloads with
//! ranges — and, on request, a download that breaks off or arrives corrupted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};

/// What the server was asked and what it should do wrong.
#[derive(Default)]
pub struct Script {
    /// Repositories (`owner/name`) and the folders they serve.
    pub repos: HashMap<String, PathBuf>,
    /// The next downloads of these files stop after these many bytes, one download each, in
    /// order.
    pub cuts: std::collections::VecDeque<(String, usize)>,
    /// Downloads of this file arrive with a byte changed.
    pub corrupt: Option<String>,
    /// Each download's file and `Range` header.
    pub downloads: Vec<(String, Option<String>)>,
    /// The `Authorization` headers seen.
    pub auth: Vec<String>,
    /// The commit the listing gives instead of a real one.
    pub commit: Option<String>,
}

/// The server, running until dropped.
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its script and log.
    pub script: Arc<Mutex<Script>>,
    _runtime: tokio::runtime::Runtime,
}

/// The commit listings give unless the script names another.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

type Shared = Arc<Mutex<Script>>;

fn listing(script: &Script, repo: &str) -> Option<serde_json::Value> {
    let dir = script.repos.get(repo)?;
    let mut siblings = Vec::new();
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        let name = path.file_name()?.to_string_lossy().to_string();
        let bytes = std::fs::read(&path).ok()?;
        let mut s = json!({"rfilename": name, "size": bytes.len()});
        if name.ends_with(".safetensors") {
            let sha = format!("{:x}", Sha256::digest(&bytes));
            s["lfs"] = json!({"sha256": sha, "size": bytes.len()});
        }
        siblings.push(s);
    }
    let commit = script.commit.as_deref().unwrap_or(COMMIT);
    Some(json!({"id": repo, "sha": commit, "siblings": siblings}))
}

async fn model(
    State(script): State<Shared>,
    Path((owner, name, _rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut s = script.lock().unwrap();
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        s.auth.push(a.to_string());
    }
    match listing(&s, &format!("{owner}/{name}")) {
        Some(l) => Json(l).into_response(),
        None => (StatusCode::NOT_FOUND, "Repository not found").into_response(),
    }
}

async fn resolve(
    State(script): State<Shared>,
    Path((owner, name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut s = script.lock().unwrap();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.downloads.push((file.clone(), range.clone()));
    let Some(dir) = s.repos.get(&format!("{owner}/{name}")) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    let Ok(mut bytes) = std::fs::read(dir.join(&file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    if s.corrupt.as_deref() == Some(file.as_str()) {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
    }
    let total = bytes.len();
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < total);
    let (status, body) = match from {
        Some(n) => (StatusCode::PARTIAL_CONTENT, bytes[n..].to_vec()),
        None => (StatusCode::OK, bytes),
    };
    let length = body.len();
    let cut = match s.cuts.front() {
        Some((f, n)) if *f == file => Some(*n),
        _ => None,
    };
    let mut response = if let Some(n) = cut {
        s.cuts.pop_front();
        // The promised length, then a broken stream after `n` bytes.
        let head = body[..n].to_vec();
        use futures_util::StreamExt;
        // The head, then (once the client is reading the body) the connection drops.
        let stream =
            futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(head))])
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    Err(std::io::Error::other("connection lost"))
                }));
        (status, Body::from_stream(stream)).into_response()
    } else {
        (status, body).into_response()
    };
    let h = response.headers_mut();
    h.insert("content-length", length.into());
    if let Some(n) = from {
        h.insert(
            "content-range",
            format!("bytes {n}-{}/{total}", total - 1).parse().unwrap(),
        );
    }
    response
}

impl FakeHub {
    /// A hub serving `repos`.
    pub fn start(repos: &[(&str, PathBuf)]) -> FakeHub {
        let script: Shared = Arc::new(Mutex::new(Script {
            repos: repos
                .iter()
                .map(|(r, d)| (r.to_string(), d.clone()))
                .collect(),
            ..Script::default()
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = Router::new()
            .route("/api/models/{owner}/{name}/revision/{rev}", get(model))
            .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
            .with_state(script.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        FakeHub {
            endpoint,
            script,
            _runtime: runtime,
        }
    }
}
