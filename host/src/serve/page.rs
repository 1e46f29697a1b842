//! The daemon's web page at `/`: a chat with any served model and the plugins' status, built
//! on the OpenAI and admin APIs alone. Its three files are compiled into the binary (no CDN:
//! it works offline); it holds no data, so it is open, and the APIs it calls ask for keys as
//! they always do (the page has a key field).

use axum::http::header;
use axum::response::IntoResponse;

/// Only this origin's scripts, styles and connections; images may be what the user picks.
const POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'";

fn file(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `GET /`.
pub async fn index() -> impl IntoResponse {
    file("text/html; charset=utf-8", include_str!("page/index.html"))
}

/// `GET /ui/app.js`.
pub async fn script() -> impl IntoResponse {
    file(
        "text/javascript; charset=utf-8",
        include_str!("page/app.js"),
    )
}

/// `GET /ui/style.css`.
pub async fn style() -> impl IntoResponse {
    file("text/css; charset=utf-8", include_str!("page/style.css"))
}
