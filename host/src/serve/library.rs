//! Private copies of the plugin libraries being served. A worker maps its library for as long as
//! it runs; an operator replacing the file in place (`cp new.so plugins/`) would rewrite pages
//! under a running worker and crash it. Workers therefore run a content-addressed copy, and the
//! watched file is free to change. A copy is deleted when the last deployment using it is gone.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

type Live = Arc<Mutex<HashMap<String, Weak<LibraryCopy>>>>;

/// A folder of library copies, named by their sha256.
#[derive(Debug, Clone)]
pub struct LibraryStore {
    dir: PathBuf,
    live: Live,
}

/// One copy; the file goes when the last holder drops it.
#[derive(Debug)]
pub struct LibraryCopy {
    /// The copy.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    live: Live,
}

/// sha256 of a byte string, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn lock(live: &Live) -> std::sync::MutexGuard<'_, HashMap<String, Weak<LibraryCopy>>> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

impl LibraryStore {
    /// Creates `dir` (readable by the workers' unprivileged user). Refused where another user
    /// could swap what the workers load: `dir` or its parent a symlink, owned by someone other
    /// than this process (or root), or writable by others.
    pub fn create(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for folder in [dir.parent().unwrap_or(&dir), dir.as_path()] {
            trusted_folder(folder)?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir,
            live: Live::default(),
        })
    }

    /// Where the copies are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of `library` as it is now (shared with others of the same content).
    pub fn snapshot(&self, library: &Path) -> std::io::Result<Arc<LibraryCopy>> {
        let bytes = std::fs::read(library)?;
        let sha = sha256_hex(&bytes);
        // Held while writing: a copy being dropped cannot delete the file under a new holder.
        let mut live = lock(&self.live);
        if let Some(copy) = live.get(&sha).and_then(Weak::upgrade) {
            return Ok(copy);
        }
        let path = self.dir.join(format!("{sha}.so"));
        // Written under a temporary name and renamed: a copy is never seen half-written.
        let partial = self.dir.join(format!(".{sha}.partial"));
        // A leftover of a crash is removed, and the new file is never opened through a link.
        let _ = std::fs::remove_file(&partial);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&partial, &path)?;
        let copy = Arc::new(LibraryCopy {
            path,
            sha256: sha.clone(),
            live: self.live.clone(),
        });
        live.insert(sha, Arc::downgrade(&copy));
        Ok(copy)
    }
}

/// The runtime folder of the daemon with process id `pid` when `server.runtime_dir` is not set:
/// `pio-serve-<pid>` in `temp`.
pub fn default_runtime_dir(temp: &Path, pid: u32) -> PathBuf {
    temp.join(format!("pio-serve-{pid}"))
}

/// Makes [`default_runtime_dir`] afresh, mode 0755. A shared temp folder lets anyone create the
/// name first: a folder there owned by another user (or a link) is refused, and one of this
/// user's own (a reused pid's) is emptied and made again.
pub fn create_default_runtime_dir(temp: &Path, pid: u32) -> std::io::Result<PathBuf> {
    let dir = default_runtime_dir(temp, pid);
    if let Ok(meta) = std::fs::symlink_metadata(&dir) {
        if meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() {
            std::fs::remove_dir_all(&dir)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists and is not this user's own folder (someone may be trying to plant libraries): remove it, or set server.runtime_dir",
                    dir.display()
                ),
            ));
        }
    }
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    Ok(dir)
}

/// `folder` is no link, belongs to this user or root, and only its owner may write to it (or
/// it is sticky, like /tmp, so that no one else can rename what is in it).
fn trusted_folder(folder: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(folder)?;
    let me = nix::unistd::geteuid().as_raw();
    let problem = if !meta.is_dir() {
        Some("is not a folder (a link?)")
    } else if meta.uid() != me && meta.uid() != 0 {
        Some("belongs to another user")
    } else if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        Some("can be written by other users")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} {problem}, so another user could replace the libraries workers load: use a folder only this user can write",
                folder.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Removes the default runtime folders in `temp` of daemons no longer running (killed with
/// SIGKILL, say, which leaves its library copies behind); returns how many. A folder whose pid
/// runs (a live daemon, or a reused pid) is kept.
pub fn reap_stale_runtime_dirs(temp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("pio-serve-")
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) && e.path().is_dir()
        })
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

impl Drop for LibraryCopy {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        if live.get(&self.sha256).and_then(Weak::upgrade).is_none() {
            live.remove(&self.sha256);
            // A worker still mapping it keeps the inode alive; only the name goes.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_folders_of_dead_daemons_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum (4194304) never runs.
        let dead = default_runtime_dir(tmp.path(), 4_999_999);
        let live = default_runtime_dir(tmp.path(), std::process::id());
        for dir in [&dead, &live] {
            std::fs::create_dir_all(dir.join("libs")).unwrap();
            std::fs::write(dir.join("libs/x.so"), b"lib").unwrap();
        }
        std::fs::create_dir(tmp.path().join("pio-serve-notapid")).unwrap();
        assert_eq!(reap_stale_runtime_dirs(tmp.path()), 1);
        assert!(!dead.exists() && live.join("libs/x.so").is_file());
        assert!(tmp.path().join("pio-serve-notapid").is_dir());
    }

    #[test]
    fn a_copy_survives_the_original_being_rewritten_and_goes_with_its_last_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let original = tmp.path().join("libx.so");
        std::fs::write(&original, b"first").unwrap();
        let first = store.snapshot(&original).unwrap();
        let again = store.snapshot(&original).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        std::fs::write(&original, b"second").unwrap();
        assert_eq!(std::fs::read(&first.path).unwrap(), b"first");
        assert_eq!(first.sha256, sha256_hex(b"first"));
        let second = store.snapshot(&original).unwrap();
        assert_ne!(second.path, first.path);
        let path = first.path.clone();
        drop(first);
        assert!(path.is_file(), "still held");
        drop(again);
        assert!(!path.exists() && second.path.is_file());
    }

    /// Tests run as root: another user's folder is made by chown to `nobody`.
    fn as_nobody(path: &Path) {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }

    #[test]
    fn a_runtime_folder_someone_else_planted_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = 4_999_998;
        let planted = default_runtime_dir(tmp.path(), pid);
        std::fs::create_dir_all(planted.join("libs")).unwrap();
        as_nobody(&planted);
        as_nobody(&planted.join("libs"));
        let e = create_default_runtime_dir(tmp.path(), pid).unwrap_err();
        assert!(e.to_string().contains("server.runtime_dir"), "{e}");
        // Even if asked to use it, the store refuses a folder another user can change.
        let e = LibraryStore::create(planted.join("libs")).unwrap_err();
        assert!(e.to_string().contains("belongs to another user"), "{e}");
        // A link in its place is refused too.
        let link = default_runtime_dir(tmp.path(), pid + 1);
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(create_default_runtime_dir(tmp.path(), pid + 1).is_err());
        // This user's own leftover (a reused pid) is made afresh.
        let own = default_runtime_dir(tmp.path(), pid + 2);
        std::fs::create_dir_all(own.join("libs")).unwrap();
        std::fs::write(own.join("libs/old.so"), b"x").unwrap();
        let dir = create_default_runtime_dir(tmp.path(), pid + 2).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let writable = tmp.path().join("open");
        std::fs::create_dir(&writable).unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = LibraryStore::create(writable.join("libs")).unwrap_err();
        assert!(e.to_string().contains("written by other users"), "{e}");
    }

    #[test]
    fn a_copy_is_never_written_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let partial = store.dir().join(format!(".{}.partial", sha256_hex(b"x")));
        std::os::unix::fs::symlink(&victim, &partial).unwrap();
        let original = tmp.path().join("libx.so");
        std::fs::write(&original, b"x").unwrap();
        let copy = store.snapshot(&original).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&copy.path).unwrap(), b"x");
    }
}
