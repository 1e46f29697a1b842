//! TOML files people write (manifests, the daemon config): parsed with unknown keys refused, and
//! every error placed at its file, line and column, naming the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A TOML file that does not parse into what was expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}:{line}:{column}: {message}")]
pub struct TomlError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the offending text.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Parses `text` (the contents of `path`) into `T`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, TomlError> {
    toml::from_str::<T>(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        let (line, column) = line_column(text, start);
        let mut message = e.message().trim().to_string();
        // Value errors from serde don't say which key they are about; the line does. A missing
        // key is placed at its table's first line, whose key is another one.
        let about_a_value = !message.starts_with("missing field");
        let key = key_at(text, start);
        // serde quotes the value it refused: a bearer key written as a string instead of a list
        // would reach the log at every start and reload. Any secret-like word on the line counts
        // (`server = { api_keys = "…" }` names `server` first).
        if key.as_deref().is_some_and(secret) || secret(line_at(text, start)) {
            message = hide_strings(&message);
        }
        if let Some(key) = key.filter(|k| about_a_value && !message.contains(&format!("`{k}`"))) {
            message = format!("`{key}`: {message}");
        }
        TomlError {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// Whether `key` holds secrets (`api_keys`, `admin_keys`, `metrics_keys`, a token or password).
fn secret(key: &str) -> bool {
    let key = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["key", "token", "secret", "password"]
        .iter()
        .any(|s| key.contains(s))
}

/// `message` with every double-quoted string in it replaced by `"…"`.
fn hide_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                out.push_str("\"…");
                quoted = true;
            }
            ('"', true) => {
                out.push('"');
                quoted = false;
            }
            (_, false) => out.push(c),
            (_, true) => {}
        }
    }
    out
}

/// A 1-based line and column for a byte offset into `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The line of `text` holding byte `offset`.
fn line_at(text: &str, offset: usize) -> &str {
    let offset = (0..=offset.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    &text[start..end]
}

/// The key of a `key = value` line containing byte `offset`, if that line is one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let (key, _) = line_at(text, offset).split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    bare.then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Server {
        api_keys: Vec<String>,
        name: Option<u32>,
    }

    /// A secret written in the wrong shape is not repeated in the error (which is logged);
    /// other values still are, for the operator to see what was read.
    #[test]
    fn a_refused_secret_is_not_repeated_in_the_error() {
        let path = Path::new("pio.toml");
        let e = parse::<Server>(path, "api_keys = \"sk-live-secret\"\n").unwrap_err();
        let message = e.to_string();
        assert!(!message.contains("sk-live-secret"), "{message}");
        assert!(
            message.contains("`api_keys`") && message.contains("sequence"),
            "{message}"
        );
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct File {
            server: Server,
        }
        let inline = "server = { api_keys = \"sk-live-inline\" }\n";
        let e = parse::<File>(path, inline).unwrap_err();
        assert!(!e.to_string().contains("sk-live-inline"), "{e}");
        let e = parse::<Server>(path, "api_keys = []\nname = \"seven\"\n").unwrap_err();
        assert!(e.to_string().contains("seven"), "{e}");
    }
}
