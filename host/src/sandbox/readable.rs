//! Whether the unprivileged user a worker (or a probe) runs as can read a path: every folder on
//! the way must let it enter, the file itself let it read. Checked from the mode bits (or the POSIX
//! access ACL, where a path has one) before the process starts, so an operator whose plugin or model folder is private to root is told which
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
        let (lack, fix, acl) = if self.folder_on_the_way {
            ("enter", "chmod o+x", "x")
        } else {
            (
                "read",
                "chmod o+r (o+rx for a folder)",
                "r (rx for a folder)",
            )
        };
        let path = self.path.display();
        format!(
            "{what}: the worker runs as uid {uid} (its plugin's own, from sandbox.worker_uids; or sandbox.worker_uid), gid {gid} (sandbox.worker_gid) and cannot {lack} {path}: make it and every folder above it readable to that user (e.g. {fix} {path}, or for that user alone setfacl -m u:{uid}:{acl} {path})"
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

/// The permission bits that apply to `uid:gid` for the file `path` with metadata `meta`: its
/// POSIX access ACL's where it has one (`setfacl -m u:65534:rx`, say, grants what the mode bits
/// alone would not show), else its mode's.
fn granted(path: &Path, meta: &std::fs::Metadata, uid: u32, gid: u32) -> u32 {
    let (owner, group) = (meta.uid(), meta.gid());
    let mode = || bits(meta.mode(), owner, group, uid, gid);
    if uid == 0 {
        return mode();
    }
    access_acl(path)
        .and_then(|acl| acl_bits(&acl, owner, group, uid, gid))
        .unwrap_or_else(mode)
}

/// The extended attribute that holds a path's POSIX access ACL.
const ACCESS_ACL: &std::ffi::CStr = c"system.posix_acl_access";

/// The raw access ACL of `path`, when it has one (of up to 127 entries; a longer one is left to
/// the mode bits).
fn access_acl(path: &Path) -> Option<Vec<u8>> {
    super::xattr::get(path, ACCESS_ACL, 1024)
}

/// The bits a POSIX access ACL in Linux's attribute layout (version 2, then 8-byte entries: tag,
/// permissions, id) gives `uid:gid` on a file owned by `owner:group`, as acl(5)'s access check
/// goes: the owner's entry, else a named user's (within the mask), else the matching group
/// entries' together (within the mask; a match that grants nothing denies), else other's. `None`
/// for an attribute that does not parse.
fn acl_bits(acl: &[u8], owner: u32, group: u32, uid: u32, gid: u32) -> Option<u32> {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let (version, entries) = acl.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    let entries: Vec<(u16, u32, u32)> = entries
        .chunks_exact(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 0o7);
            (tag, perm, u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
        })
        .collect();
    let find = |want: u16| entries.iter().find(|e| e.0 == want).map(|e| e.1);
    let mask = find(MASK).unwrap_or(0o7);
    if uid == owner {
        return find(USER_OBJ);
    }
    if let Some(e) = entries.iter().find(|e| e.0 == USER && e.2 == uid) {
        return Some(e.1 & mask);
    }
    let groups: Vec<u32> = entries
        .iter()
        .filter(|e| (e.0 == GROUP_OBJ && gid == group) || (e.0 == GROUP && e.2 == gid))
        .map(|e| e.1)
        .collect();
    if !groups.is_empty() {
        return Some(groups.iter().fold(0, |all, p| all | p) & mask);
    }
    find(OTHER)
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
        if granted(folder, &meta, uid, gid) & 0o1 == 0 {
            return Some(Blocked {
                path: folder.to_path_buf(),
                folder_on_the_way: true,
            });
        }
    }
    let meta = std::fs::metadata(&path).ok()?;
    let need = if meta.is_dir() { 0o5 } else { 0o4 };
    (granted(&path, &meta, uid, gid) & need != need).then_some(Blocked {
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
/// way, as `reach` says, write and enter `dir`), from the mode bits or the ACL.
pub fn writable_folder(dir: &Path, uid: u32, gid: u32, reach: Reach) -> bool {
    if unreadable(dir, uid, gid, reach).is_some() {
        return false;
    }
    std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && granted(dir, &m, uid, gid) & 0o3 == 0o3)
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

    /// An ACL's attribute: version 2, then (tag, permissions, id) entries.
    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    const ANY: u32 = u32::MAX;

    /// acl(5)'s access check: owner, named user within the mask, matching groups within the
    /// mask (a match that grants nothing denies), other.
    #[test]
    fn an_acl_grants_as_acl5_checks() {
        let (owner, group) = (0, 0);
        let entries = acl(&[
            (0x01, 0o7, ANY),
            (0x02, 0o7, 65534),
            (0x02, 0o5, 1000),
            (0x04, 0o0, ANY),
            (0x08, 0o5, 2000),
            (0x08, 0o0, 3000),
            (0x10, 0o5, ANY),
            (0x20, 0o4, ANY),
        ]);
        let bits_for = |uid, gid| acl_bits(&entries, owner, group, uid, gid).unwrap();
        assert_eq!(bits_for(65534, 65534), 0o5, "a named user, within the mask");
        assert_eq!(bits_for(1000, 1000), 0o5);
        assert_eq!(bits_for(4000, 2000), 0o5, "a named group");
        assert_eq!(bits_for(4000, 3000), 0o0, "a group that matches denies");
        assert_eq!(bits_for(4000, 0), 0o0, "the owning group's entry");
        assert_eq!(bits_for(4000, 4000), 0o4, "other");
        assert_eq!(acl_bits(&entries, 7, 7, 7, 7), Some(0o7), "the owner");
        assert_eq!(acl_bits(&[1, 0, 0, 0], 0, 0, 1, 1), None, "version 1");
        assert_eq!(acl_bits(&entries[..10], 0, 0, 1, 1), None, "cut short");
    }

    /// A folder closed to others by its mode but opened to the worker's uid by an ACL lets it in
    /// (here, where the file system keeps ACLs).
    #[test]
    fn an_acl_opens_what_the_mode_closes() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let folder = tmp.path().join("models");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("w"), b"w").unwrap();
        chmod(&folder.join("w"), 0o644);
        chmod(&folder, 0o750);
        let nobody = (65534, 65534);
        assert!(unreadable(&folder, nobody.0, nobody.1, Reach::Host).is_some());
        let entries = acl(&[
            (0x01, 0o7, ANY),
            (0x02, 0o5, 65534),
            (0x04, 0o5, ANY),
            (0x10, 0o5, ANY),
            (0x20, 0o0, ANY),
        ]);
        let set = super::super::xattr::set(&folder, ACCESS_ACL, &entries);
        if set.is_err() {
            eprintln!("skipped: this file system keeps no ACLs");
            return;
        }
        assert_eq!(unreadable(&folder, nobody.0, nobody.1, Reach::Host), None);
        assert_eq!(
            unreadable_tree(&folder, nobody.0, nobody.1, Reach::Host),
            None
        );
        assert!(
            unreadable(&folder, 4321, 4321, Reach::Host).is_some(),
            "others still not"
        );
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
