//! Whether the unprivileged user a worker (or a probe) runs as can read a path: every folder on
//! the way must let it enter, the file itself let it read. Checked from the mode bits before the
//! process starts, so an operator whose plugin or model folder is private to root is told which
//! path, which uid and what to change, instead of a loader's "permission denied" from inside a
//! confined process.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A path the user cannot get through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The first path on the way it cannot enter or read.
    pub path: PathBuf,
    /// `true`: a folder it cannot enter; `false`: a file (or folder) it cannot read.
    pub folder_on_the_way: bool,
}

impl Blocked {
    /// The message for `uid:gid`, naming the setting the uid comes from.
    pub fn message(&self, what: &str, uid: u32, gid: u32) -> String {
        let (lack, fix) = if self.folder_on_the_way {
            ("enter", "chmod o+x")
        } else {
            ("read", "chmod o+r (o+rx for a folder)")
        };
        format!(
            "{what}: the worker runs as uid {uid}, gid {gid} (sandbox.worker_uid, sandbox.worker_gid) and cannot {lack} {}: make it and every folder above it readable to that user (e.g. {fix} {})",
            self.path.display(),
            self.path.display()
        )
    }
}

/// The permission bits that apply to `uid:gid` in `mode` owned by `owner:group` (shifted down to
/// the `rwx` of the class that applies).
fn bits(mode: u32, owner: u32, group: u32, uid: u32, gid: u32) -> u32 {
    if uid == 0 {
        return 0o7;
    }
    if uid == owner {
        (mode >> 6) & 0o7
    } else if gid == group {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    }
}

/// Whether the folders above a path count: not for a worker whose root is empty but for the
/// paths mounted into it (the `maximum` tier), which reaches them without the host's folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Through every folder above, as on the host.
    Host,
    /// The path alone, mounted into an empty root.
    Mounted,
}

impl Reach {
    /// How the worker `plan` confines reaches the paths it is given.
    pub fn of(plan: &super::Plan) -> Self {
        match plan.isolation.as_ref().is_some_and(|i| i.empty_root) {
            true => Self::Mounted,
            false => Self::Host,
        }
    }
}

/// The first thing on the way to `path` that `uid:gid` cannot get through, or `None` when it can
/// read `path` (a folder: list and enter it). Paths that do not exist are left to the caller's
/// own error.
pub fn unreadable(path: &Path, uid: u32, gid: u32, reach: Reach) -> Option<Blocked> {
    let path = std::fs::canonicalize(path).ok()?;
    let ancestors: Vec<&Path> = match reach {
        Reach::Host => path.ancestors().skip(1).collect(),
        Reach::Mounted => Vec::new(),
    };
    for folder in ancestors.into_iter().rev() {
        let meta = std::fs::metadata(folder).ok()?;
        if bits(meta.mode(), meta.uid(), meta.gid(), uid, gid) & 0o1 == 0 {
            return Some(Blocked {
                path: folder.to_path_buf(),
                folder_on_the_way: true,
            });
        }
    }
    let meta = std::fs::metadata(&path).ok()?;
    let need = if meta.is_dir() { 0o5 } else { 0o4 };
    (bits(meta.mode(), meta.uid(), meta.gid(), uid, gid) & need != need).then_some(Blocked {
        path,
        folder_on_the_way: false,
    })
}

/// [`unreadable`] for `path` and, when it is a folder, each entry directly in it (a model
/// folder's config, tokenizer and weights).
pub fn unreadable_tree(path: &Path, uid: u32, gid: u32, reach: Reach) -> Option<Blocked> {
    if let Some(b) = unreadable(path, uid, gid, reach) {
        return Some(b);
    }
    let entries = std::fs::read_dir(path).ok()?;
    entries
        .filter_map(|e| e.ok())
        .find_map(|e| unreadable(&e.path(), uid, gid, Reach::Mounted))
}

/// Whether `uid:gid` may create files in the existing folder `dir` (enter every folder on the
/// way, as `reach` says, write and enter `dir`), from the mode bits (an ACL is not read).
pub fn writable_folder(dir: &Path, uid: u32, gid: u32, reach: Reach) -> bool {
    if unreadable(dir, uid, gid, reach).is_some() {
        return false;
    }
    std::fs::metadata(dir)
        .is_ok_and(|m| m.is_dir() && bits(m.mode(), m.uid(), m.gid(), uid, gid) & 0o3 == 0o3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_folder_or_file_is_named_with_the_uid_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let folder = tmp.path().join("plugins");
        std::fs::create_dir(&folder).unwrap();
        let lib = folder.join("libx.so");
        std::fs::write(&lib, b"x").unwrap();
        chmod(&lib, 0o644);
        chmod(&folder, 0o755);
        let nobody = (65534, 65534);
        assert_eq!(unreadable(&lib, nobody.0, nobody.1, Reach::Host), None);
        chmod(&folder, 0o700);
        let blocked = unreadable(&lib, nobody.0, nobody.1, Reach::Host).unwrap();
        assert!(blocked.folder_on_the_way);
        // Mounted into an empty root, the private folder above is not on the way.
        assert_eq!(unreadable(&lib, nobody.0, nobody.1, Reach::Mounted), None);
        assert_eq!(blocked.path, std::fs::canonicalize(&folder).unwrap());
        let message = blocked.message("libx.so", 65534, 65534);
        assert!(
            message.contains("uid 65534") && message.contains("sandbox.worker_uid"),
            "{message}"
        );
        chmod(&folder, 0o755);
        chmod(&lib, 0o600);
        let blocked = unreadable(&lib, nobody.0, nobody.1, Reach::Host).unwrap();
        assert!(!blocked.folder_on_the_way);
        // The file's owner reads it; root reads everything.
        let owner = std::fs::metadata(&lib).unwrap().uid();
        if owner != 0 {
            assert_eq!(unreadable(&lib, owner, 12345, Reach::Host), None);
        }
        assert_eq!(unreadable(&lib, 0, 0, Reach::Host), None);
        // A model folder: one unreadable file inside is found.
        chmod(&lib, 0o644);
        std::fs::write(folder.join("model.safetensors"), b"w").unwrap();
        chmod(&folder.join("model.safetensors"), 0o600);
        let blocked = unreadable_tree(&folder, nobody.0, nobody.1, Reach::Host).unwrap();
        assert!(blocked.path.ends_with("model.safetensors"));
    }

    #[test]
    fn a_folder_is_writable_to_its_owner_or_a_class_with_write_and_enter() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let cache = tmp.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let owner = std::fs::metadata(&cache).unwrap().uid();
        let other = if owner == 4321 { 4322 } else { 4321 };
        chmod(&cache, 0o755);
        assert!(!writable_folder(&cache, other, other, Reach::Host));
        assert!(writable_folder(&cache, 0, 0, Reach::Host));
        chmod(&cache, 0o777);
        assert!(writable_folder(&cache, other, other, Reach::Host));
        // Writable but not enterable, or under a folder it cannot enter.
        chmod(&cache, 0o776);
        assert!(!writable_folder(&cache, other, other, Reach::Host));
        chmod(&cache, 0o777);
        chmod(tmp.path(), 0o700);
        assert!(!writable_folder(&cache, other, other, Reach::Host));
        // Mounted into an empty root, the folder above is not on the way.
        assert!(writable_folder(&cache, other, other, Reach::Mounted));
        chmod(tmp.path(), 0o755);
        assert!(!writable_folder(
            &tmp.path().join("absent"),
            other,
            other,
            Reach::Host
        ));
    }
}
