//! What a pull leaves in its folder (`.pio-pull.json`): the commit and the files it fetched, so
//! that pulling another commit into the same folder fetches again the files the Hub gives no
//! checksum for (the small ones Git keeps outside LFS: `config.json`, the tokenizer's) and
//! removes those the new commit no longer has (an index beside a now single-file checkpoint
//! would still be read). Files the pull did not fetch are never touched.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io, HubError, Snapshot};

/// The record's name in the folder.
const RECORD: &str = ".pio-pull.json";

/// What the last complete pull into a folder fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its commit.
    pub commit: String,
    /// The files it fetched.
    pub files: Vec<String>,
}

/// The files of `previous` to remove before pulling `snapshot`: none at the same commit (or
/// without a record); otherwise those `snapshot` no longer has among `wanted`, and those it has
/// without a SHA-256 (nothing else would tell a changed one of the same size).
pub fn stale(previous: Option<&Record>, snapshot: &Snapshot, wanted: &[&str]) -> Vec<String> {
    let Some(previous) = previous.filter(|p| p.commit != snapshot.commit) else {
        return Vec::new();
    };
    let unchecked =
        |name: &str| (snapshot.files.iter()).any(|f| f.name == name && f.sha256.is_none());
    (previous.files.iter())
        .filter(|name| !wanted.contains(&name.as_str()) || unchecked(name))
        .cloned()
        .collect()
}

/// Removes from `dest` what a pull of another commit left that `snapshot` replaces or no longer
/// has (see [`stale`]); returns their names.
pub fn prune(dest: &Path, snapshot: &Snapshot, wanted: &[&str]) -> Result<Vec<String>, HubError> {
    let path = dest.join(RECORD);
    let previous: Option<Record> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let gone = stale(previous.as_ref(), snapshot, wanted);
    for name in &gone {
        // Names from the record, which only a pull wrote; still, nothing outside `dest`.
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let file = dest.join(name);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&file)(e)),
            _ => {}
        }
    }
    Ok(gone)
}

/// Records that `dest` now holds `files` of `snapshot`'s commit (after a complete pull).
pub fn finish(dest: &Path, snapshot: &Snapshot, files: &[&str]) -> Result<(), HubError> {
    let record = Record {
        commit: snapshot.commit.clone(),
        files: files.iter().map(|f| f.to_string()).collect(),
    };
    let path = dest.join(RECORD);
    let text = serde_json::to_vec_pretty(&record).unwrap_or_default();
    std::fs::write(&path, text).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::RemoteFile;

    fn file(name: &str, lfs: bool) -> RemoteFile {
        RemoteFile {
            name: name.into(),
            size: Some(1),
            sha256: lfs.then(|| "ab".repeat(32)),
        }
    }

    /// Another commit: the files without a checksum are fetched again and the ones gone are
    /// removed; weights whose SHA-256 the download checks stay. The same commit, or no record,
    /// removes nothing.
    #[test]
    fn another_commit_replaces_unchecked_files_and_removes_the_gone() {
        let before = Record {
            commit: "a".repeat(40),
            files: [
                "config.json",
                "model.safetensors.index.json",
                "model-1.safetensors",
            ]
            .map(String::from)
            .to_vec(),
        };
        let after = Snapshot {
            commit: "b".repeat(40),
            files: vec![file("config.json", false), file("model.safetensors", true)],
        };
        let wanted = ["config.json", "model.safetensors"];
        assert_eq!(
            stale(Some(&before), &after, &wanted),
            [
                "config.json",
                "model.safetensors.index.json",
                "model-1.safetensors"
            ]
        );
        let kept = Snapshot {
            files: vec![
                file("config.json", false),
                file("model-1.safetensors", true),
            ],
            ..after.clone()
        };
        assert_eq!(
            stale(
                Some(&before),
                &kept,
                &["config.json", "model-1.safetensors"]
            ),
            ["config.json", "model.safetensors.index.json"]
        );
        let same = Snapshot {
            commit: before.commit.clone(),
            ..after.clone()
        };
        assert!(stale(Some(&before), &same, &wanted).is_empty());
        assert!(stale(None, &after, &wanted).is_empty());
    }
}
