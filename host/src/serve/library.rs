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
        trusted_folder(&dir)?;
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
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt;
        // Read, and its owner and mode taken, through one handle: the copy is readable by
        // whom the original is and no one else (a path swapped for a link to a root-only file
        // after its check was copied out readable by every user).
        let mut file = std::fs::File::open(library)?;
        let meta = file.metadata()?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)?;
        // Read as root and written where every user can read it: only a shared library, as
        // checked before (the path swapped since for a link to a root-only file is refused).
        crate::elf::check_bytes(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
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
        nix::unistd::fchown(&f, Some(meta.uid().into()), Some(meta.gid().into()))
            .map_err(std::io::Error::from)?;
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o644))?;
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
/// `pio-serve-<pid>-<random>` in `temp`, made afresh (mode 0755). The random part: a shared temp
/// folder lets anyone make a predictable name first, to plant libraries in it or to stop the
/// daemon from starting.
pub fn create_default_runtime_dir(temp: &Path, pid: u32) -> std::io::Result<PathBuf> {
    create_fresh_dir(temp, &format!("pio-serve-{pid}"), 0o755)
}

/// A folder `<prefix>-<random>` in `within`, made afresh with `mode` (never one that exists:
/// a shared folder lets anyone make a predictable name first).
pub fn create_fresh_dir(within: &Path, prefix: &str, mode: u32) -> std::io::Result<PathBuf> {
    let mut last = None;
    for _ in 0..8 {
        let dir = within.join(format!("{prefix}-{:016x}", random_u64()?));
        match std::fs::DirBuilder::new().mode(mode).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// Eight bytes from the kernel's random source.
fn random_u64() -> std::io::Result<u64> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_ne_bytes(bytes))
}

/// The pid a runtime folder's name carries (`pio-serve-<pid>` or `pio-serve-<pid>-<random>`).
fn runtime_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pio-serve-")?;
    rest.split('-').next()?.parse().ok()
}

/// `folder` and every folder above it are no links (the folder itself) and belong to this user
/// or root, and only their owners may write to them, or they are sticky (like /tmp) so that no
/// one else can rename what is in them: otherwise another user could swap the folder out.
fn trusted_folder(folder: &Path) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let folder = match std::fs::symlink_metadata(folder)? {
        meta if !meta.is_dir() => return Err(untrusted(folder, "is not a folder (a link?)")),
        _ => std::fs::canonicalize(folder)?,
    };
    for dir in folder.ancestors() {
        let meta = std::fs::metadata(dir)?;
        if meta.uid() != me && meta.uid() != 0 {
            return Err(untrusted(dir, "belongs to another user"));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(untrusted(dir, "can be written by other users"));
        }
    }
    Ok(())
}

fn untrusted(dir: &Path, problem: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "{} {problem}, so another user could replace the libraries workers load: use a folder only this user can write",
            dir.display()
        ),
    )
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
            let pid = runtime_dir_pid(&name);
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
        // A pid above the kernel's maximum (4194304) never runs; the older names had no
        // random part.
        let dead = create_default_runtime_dir(tmp.path(), 4_999_999).unwrap();
        let old = tmp.path().join("pio-serve-4999997");
        let live = create_default_runtime_dir(tmp.path(), std::process::id()).unwrap();
        for dir in [&dead, &old, &live] {
            std::fs::create_dir_all(dir.join("libs")).unwrap();
            std::fs::write(dir.join("libs/x.so"), b"lib").unwrap();
        }
        std::fs::create_dir(tmp.path().join("pio-serve-notapid")).unwrap();
        assert_eq!(reap_stale_runtime_dirs(tmp.path()), 2);
        assert!(!dead.exists() && !old.exists() && live.join("libs/x.so").is_file());
        assert!(tmp.path().join("pio-serve-notapid").is_dir());
    }

    #[test]
    fn a_copy_survives_the_original_being_rewritten_and_goes_with_its_last_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let original = tmp.path().join("libx.so");
        std::fs::write(&original, elf(b"first")).unwrap();
        let first = store.snapshot(&original).unwrap();
        let again = store.snapshot(&original).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        std::fs::write(&original, elf(b"second")).unwrap();
        assert_eq!(std::fs::read(&first.path).unwrap(), elf(b"first"));
        assert_eq!(first.sha256, sha256_hex(&elf(b"first")));
        let second = store.snapshot(&original).unwrap();
        assert_ne!(second.path, first.path);
        let path = first.path.clone();
        drop(first);
        assert!(path.is_file(), "still held");
        drop(again);
        assert!(!path.exists() && second.path.is_file());
    }

    /// The smallest shared library header, `tail` after it.
    fn elf(tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x10] = 3;
        b.extend_from_slice(tail);
        b
    }

    /// What is copied where every user reads it is a shared library: a file swapped since its
    /// check for a link to a root-only one (a key, /etc/shadow) is refused, nothing written.
    #[test]
    fn only_a_shared_library_is_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"root:$6$hash:19000:0:99999:7:::\n").unwrap();
        let library = tmp.path().join("libx.so");
        std::os::unix::fs::symlink(&secret, &library).unwrap();
        let e = store.snapshot(&library).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("ELF"), "{e}");
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
        // A library only its owner may read is copied for its owner alone.
        let private = tmp.path().join("libp.so");
        std::fs::write(&private, elf(b"p")).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        let copy = store.snapshot(&private).unwrap();
        let mode = std::fs::metadata(&copy.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Tests run as root: another user's folder is made by chown to `nobody`.
    fn as_nobody(path: &Path) {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }

    #[test]
    fn a_runtime_folder_someone_else_planted_is_never_used() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = 4_999_998;
        // Names planted ahead are not the one made: its random part is new.
        let planted = tmp.path().join(format!("pio-serve-{pid}"));
        std::fs::create_dir_all(planted.join("libs")).unwrap();
        as_nobody(&planted);
        as_nobody(&planted.join("libs"));
        let dir = create_default_runtime_dir(tmp.path(), pid).unwrap();
        let again = create_default_runtime_dir(tmp.path(), pid).unwrap();
        assert!(dir != planted && again != dir, "{dir:?} {again:?}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // Asked to use one anyway, the store refuses a folder another user can change...
        let e = LibraryStore::create(planted.join("libs")).unwrap_err();
        assert!(e.to_string().contains("belongs to another user"), "{e}");
        // ... or one inside a folder that others may write, at any depth.
        let writable = tmp.path().join("open");
        std::fs::create_dir_all(writable.join("deeper")).unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
        for libs in [writable.join("libs"), writable.join("deeper/pio/libs")] {
            let e = LibraryStore::create(libs).unwrap_err();
            assert!(e.to_string().contains("written by other users"), "{e}");
        }
        // Sticky, as /tmp is: no one else can rename what is in it.
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(LibraryStore::create(writable.join("deeper/pio/libs")).is_ok());
    }

    #[test]
    fn a_copy_is_never_written_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let partial = store
            .dir()
            .join(format!(".{}.partial", sha256_hex(&elf(b"x"))));
        std::os::unix::fs::symlink(&victim, &partial).unwrap();
        let original = tmp.path().join("libx.so");
        std::fs::write(&original, elf(b"x")).unwrap();
        let copy = store.snapshot(&original).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&copy.path).unwrap(), elf(b"x"));
    }
}
