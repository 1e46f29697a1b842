//! Where a pull puts what it fetches until all of it is there: `.pio-pull-<commit>/` inside the
//! model's folder. The folder may be served while it is pulled into, so nothing in it changes
//! until every file has arrived and checks out; then the staged files are renamed over the old
//! ones (each rename atomic, all of them a moment) and the files the new commit no longer has
//! are removed. A pull that fails or is refused midway leaves the served model as it was, and
//! its partial downloads, kept per commit, resume only a pull of the same commit.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{io, record, HubError, Snapshot};

/// The prefix of stage folders' names.
const STAGE: &str = ".pio-pull-";
/// The lock file one pull at a time holds.
const LOCK: &str = ".pio-pull.lock";

/// A pull's stage in a model folder, with the folder's lock held.
#[derive(Debug)]
pub struct Stage {
    dest: PathBuf,
    dir: PathBuf,
    _lock: File,
}

impl Stage {
    /// Takes `dest`'s lock (made with its missing parents, readable to all: workers run as
    /// other uids) and opens the stage for `commit`, dropping stages of other commits (pulls
    /// given up on).
    pub fn open(dest: &Path, commit: &str) -> Result<Self, HubError> {
        make_dirs(dest)?;
        let lock_path = dest.join(LOCK);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // The workers' check reads the whole folder.
        readable(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(HubError::Busy {
                    path: dest.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let dir = dest.join(format!("{STAGE}{commit}"));
        for entry in std::fs::read_dir(dest).map_err(io(dest))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGE) && entry.path() != dir && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        make_dirs(&dir)?;
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            _lock: lock,
        })
    }

    /// Where `name` is fetched to.
    pub fn staged(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where `name` is now: fetched in this pull, else in the model's folder.
    pub fn current(&self, name: &str) -> PathBuf {
        Some(self.staged(name))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| self.dest.join(name))
    }

    /// Moves what was fetched into the model's folder, readable to all, removes the files of
    /// `previous` that `snapshot` no longer has (`remove`), records the pull, and drops the stage.
    pub fn finish(
        self,
        snapshot: &Snapshot,
        wanted: &[&str],
        previous: Option<&record::Record>,
        remove: &[String],
    ) -> Result<(), HubError> {
        let mut named: Vec<String> = previous.map(|p| p.files.clone()).unwrap_or_default();
        named.extend(wanted.iter().map(|w| w.to_string()));
        named.sort();
        named.dedup();
        record::write(&self.dest, snapshot, named, true)?;
        for name in wanted {
            let from = self.staged(name);
            if !from.is_file() {
                continue;
            }
            readable(&from)?;
            let to = self.dest.join(name);
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        for name in remove {
            // Names from the record, which only a pull wrote; still, nothing outside `dest`.
            if name.contains('/') || name.starts_with('.') {
                continue;
            }
            let file = self.dest.join(name);
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&file)(e)),
                _ => {}
            }
        }
        let files = wanted.iter().map(|w| w.to_string()).collect();
        record::write(&self.dest, snapshot, files, false)?;
        std::fs::remove_dir_all(&self.dir).map_err(io(&self.dir))
    }
}

/// Makes `file` readable to all (the workers run as other uids), whatever the umask made it.
pub(super) fn readable(file: &Path) -> Result<(), HubError> {
    let mode = std::fs::metadata(file)
        .map_err(io(file))?
        .permissions()
        .mode();
    // Already so (made by another user's pull, whose file this user may not chmod).
    if mode & 0o444 == 0o444 {
        return Ok(());
    }
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).map_err(io(file))
}

/// Makes `dir` and its missing parents, each readable and searchable by all whatever the umask
/// (a `umask 077` root made folders the workers' uids could not enter).
fn make_dirs(dir: &Path) -> Result<(), HubError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(dir)(e)),
        _ => {}
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(commit: &str) -> Snapshot {
        Snapshot {
            commit: commit.into(),
            files: Vec::new(),
        }
    }

    /// A second pull into a folder being pulled into is refused while the first holds it.
    #[test]
    fn one_pull_at_a_time_per_folder() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("org/model");
        let first = Stage::open(&dest, "a").unwrap();
        let e = Stage::open(&dest, "a").unwrap_err();
        assert!(e.to_string().contains("another `pio pull`"), "{e}");
        drop(first);
        Stage::open(&dest, "a").unwrap();
    }

    /// Nothing in the folder changes until the end; then the staged files replace the old, the
    /// gone are removed, new folders and files are readable to all, and the stage is gone.
    #[test]
    fn the_folder_changes_only_at_the_end() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("org/model");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("config.json"), "old").unwrap();
        std::fs::write(dest.join("gone.json"), "old").unwrap();
        let stale = dest.join(".pio-pull-b");
        std::fs::create_dir(&stale).unwrap();
        let stage = Stage::open(&dest, "c").unwrap();
        assert!(!stale.exists(), "another commit's stage is dropped");
        std::fs::write(stage.staged("config.json"), "new").unwrap();
        assert_eq!(stage.current("config.json"), stage.staged("config.json"));
        assert_eq!(stage.current("tokenizer.json"), dest.join("tokenizer.json"));
        assert_eq!(
            std::fs::read_to_string(dest.join("config.json")).unwrap(),
            "old"
        );
        let snap = snapshot("c");
        let previous = record::Record {
            commit: "b".into(),
            files: vec!["config.json".into(), "gone.json".into()],
            pending: false,
        };
        stage
            .finish(
                &snap,
                &["config.json"],
                Some(&previous),
                &["gone.json".into()],
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("config.json")).unwrap(),
            "new"
        );
        assert!(!dest.join("gone.json").exists());
        assert!(!dest.join(".pio-pull-c").exists());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dest.join("config.json")), 0o644);
        let record = record::read(&dest).unwrap();
        assert_eq!((record.commit.as_str(), record.pending), ("c", false));
    }
}
