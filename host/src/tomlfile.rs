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
        if let Some(key) =
            key_at(text, start).filter(|k| about_a_value && !message.contains(&format!("`{k}`")))
        {
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

/// A 1-based line and column for a byte offset into `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key of a `key = value` line containing byte `offset`, if that line is one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let (key, _) = text[start..end].split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    bare.then(|| key.to_string())
}
