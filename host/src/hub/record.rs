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

/// What the last pull into a folder fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its commit.
    pub commit: String,
    /// The files it fetched.
    pub files: Vec<String>,
    /// Written before the pull moved its files in, cleared after: set, the folder may hold any
    /// mix of the files named (the move was cut short), so the next pull, of whatever commit,
    /// treats it as another commit's.
    #[serde(default)]
    pub pending: bool,
}

/// What pulling a snapshot changes of the files a previous pull left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Wanted again, but with no SHA-256 to tell a changed one of the same size: fetched anew.
    pub refetch: Vec<String>,
    /// Not in the new snapshot: removed once it is in place.
    pub remove: Vec<String>,
}

/// What pulling `snapshot` (its files `wanted`) over `previous` changes: nothing at the same
/// commit, fully pulled, or without a record.
pub fn changes(previous: Option<&Record>, snapshot: &Snapshot, wanted: &[&str]) -> Changes {
    let Some(previous) = previous.filter(|p| p.pending || p.commit != snapshot.commit) else {
        return Changes::default();
    };
    let unchecked =
        |name: &str| (snapshot.files.iter()).any(|f| f.name == name && f.sha256.is_none());
    let (refetch, remove) = (previous.files.iter())
        .filter(|name| !wanted.contains(&name.as_str()) || unchecked(name))
        .cloned()
        .partition(|name| wanted.contains(&name.as_str()));
    Changes { refetch, remove }
}

/// The record in `dest`, if a pull left one there.
pub fn read(dest: &Path) -> Option<Record> {
    let bytes = std::fs::read(dest.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records that `dest` is about to take `files` of `snapshot`'s commit (`pending`), or has them.
pub fn write(
    dest: &Path,
    snapshot: &Snapshot,
    files: Vec<String>,
    pending: bool,
) -> Result<(), HubError> {
    let record = Record {
        commit: snapshot.commit.clone(),
        files,
        pending,
    };
    let path = dest.join(RECORD);
    let text = serde_json::to_vec_pretty(&record).unwrap_or_default();
    std::fs::write(&path, text).map_err(io(&path))?;
    super::stage::readable(&path)
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
    /// changes nothing; a record left pending counts as another commit's, whatever it names.
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
            pending: false,
        };
        let after = Snapshot {
            commit: "b".repeat(40),
            files: vec![file("config.json", false), file("model.safetensors", true)],
        };
        let wanted = ["config.json", "model.safetensors"];
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            changes(Some(&before), &after, &wanted),
            Changes {
                refetch: names(&["config.json"]),
                remove: names(&["model.safetensors.index.json", "model-1.safetensors"]),
            }
        );
        let kept = Snapshot {
            files: vec![
                file("config.json", false),
                file("model-1.safetensors", true),
            ],
            ..after.clone()
        };
        assert_eq!(
            changes(
                Some(&before),
                &kept,
                &["config.json", "model-1.safetensors"]
            ),
            Changes {
                refetch: names(&["config.json"]),
                remove: names(&["model.safetensors.index.json"]),
            }
        );
        let same = Snapshot {
            commit: before.commit.clone(),
            ..after.clone()
        };
        assert_eq!(changes(Some(&before), &same, &wanted), Changes::default());
        assert_eq!(changes(None, &after, &wanted), Changes::default());
        let cut_short = Record {
            pending: true,
            ..before.clone()
        };
        assert_eq!(
            changes(Some(&cut_short), &same, &wanted).remove,
            names(&["model.safetensors.index.json", "model-1.safetensors"])
        );
    }

    /// A record written before `pending` existed reads as a complete pull.
    #[test]
    fn an_older_record_reads_as_complete() {
        let old: Record = serde_json::from_str(r#"{"commit":"c","files":["a"]}"#).unwrap();
        assert!(!old.pending);
    }
}
