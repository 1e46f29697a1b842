//! The last step of a worker's view: every mount it can reach becomes read-only and `nodev`,
//! but for its scratch and `/proc` (its own mounts, made so), the writable folders (writable,
//! still `nodev`) and its device nodes (which must open). A read-only mount does not stop a
//! device node from being opened for writing; `nodev` does, wherever a node sits on the host's
//! tree (a container's root file system, a build chroot with the host's `/dev` bound in).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use super::confine::ConfineError;
use super::namespaces::fail;

/// One line of `/proc/self/mountinfo`.
struct Mount {
    /// Its mount ID.
    id: u64,
    /// Where it is mounted (octal escapes decoded; any bytes, as a path may hold).
    point: PathBuf,
    /// Its per-mount options (`rw,nosuid,…`).
    options: String,
}

/// Remounts every mount in this namespace as [`flags_for`] says; `writable`: the folders that
/// stay writable; `devices`: the worker's device nodes.
pub(super) fn read_only_pass(
    writable: &[PathBuf],
    devices: &[PathBuf],
) -> Result<(), ConfineError> {
    // Bytes, not text: a mount point need not be UTF-8, and one such mount anywhere on the host
    // must neither fail the start nor be passed over.
    let mountinfo = std::fs::read("/proc/self/mountinfo").map_err(|e| fail("read mountinfo", e))?;
    let listed = mounts(&mountinfo);
    root_is_listed(&listed)?;
    let none: Option<&str> = None;
    for m in listed {
        if m.point == Path::new("/tmp") || m.point.starts_with("/proc") {
            continue;
        }
        let path = m.point;
        // A mount another one covers (the host's /dev under the worker's own) is out of reach;
        // the covering one has its own line.
        let current = mount_id(&path);
        if current.is_some_and(|id| id != m.id) {
            continue;
        }
        let flags = flags_for(
            &m.options,
            writable.contains(&path),
            devices.contains(&path),
        );
        match mount(none, &path, none, flags, none) {
            Ok(()) => {}
            // Covered, and the path is gone (ENOENT) or, where the kernel cannot say which
            // mount a path is on (before Linux 5.8), a plain folder of the covering mount.
            Err(Errno::ENOENT) => {}
            Err(Errno::EINVAL) if current.is_none() => {}
            Err(e) => {
                let reason = format!("{}: {e}", path.display());
                return Err(fail("remount read-only", reason));
            }
        }
    }
    Ok(())
}

/// Fails where the root's own mount is not among `listed`: in a chroot, mountinfo leaves out the
/// mount the root sits in, which the pass would then leave writable.
fn root_is_listed(listed: &[Mount]) -> Result<(), ConfineError> {
    let found = match mount_id(Path::new("/")) {
        Some(root) => listed.iter().any(|m| m.id == root),
        None => listed.iter().any(|m| m.point == Path::new("/")),
    };
    if found {
        return Ok(());
    }
    Err(fail(
        "remount read-only",
        "the root is not a mount of its own (does the daemon run in a chroot?), so it cannot be made read-only; run the daemon where / is a mount (on the host, or in a container)",
    ))
}

/// The flags a mount with `options` is remounted with: read-only unless `writable`, `nodev`
/// unless it is one of the worker's device nodes, `nosuid` always; what the mount had of `ro`,
/// `nodev`, `noexec` and `nosymfollow` kept (a remount clears what it does not name, and a
/// kernel refuses to clear a locked flag).
fn flags_for(options: &str, writable: bool, device: bool) -> MsFlags {
    let has = |name: &str| options.split(',').any(|o| o == name);
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
    if !writable || has("ro") {
        flags |= MsFlags::MS_RDONLY;
    }
    if !device || has("nodev") {
        flags |= MsFlags::MS_NODEV;
    }
    if has("noexec") {
        flags |= MsFlags::MS_NOEXEC;
    }
    if has("nosymfollow") {
        // Linux 5.10's flag, which nix does not name; only a kernel that lists it gets it.
        flags |= MsFlags::from_bits_retain(libc::MS_NOSYMFOLLOW);
    }
    flags
}

/// The ID of the mount `path` is on (`statx`), `None` where the kernel does not say.
fn mount_id(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statx is a valid value of the plain C struct.
    let mut out: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `out` is writable; both outlive the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
            libc::STATX_MNT_ID,
            &mut out,
        )
    };
    (r == 0 && out.stx_mask & libc::STATX_MNT_ID != 0).then_some(out.stx_mnt_id)
}

/// The lines of `/proc/self/mountinfo`.
fn mounts(mountinfo: &[u8]) -> Vec<Mount> {
    mountinfo
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|&b| b == b' ');
            let id = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
            let point = fields.nth(3)?;
            let options = std::str::from_utf8(fields.next()?).ok()?;
            Some(Mount {
                id,
                point: PathBuf::from(OsString::from_vec(unescape(point))),
                options: options.to_string(),
            })
        })
        .collect()
}

/// `field` with the kernel's escapes (`\ooo`, three octal digits, for a space, tab, newline or
/// backslash) decoded; every other byte is the path's own.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'\\' {
            if let Some(byte) = tail.get(..3).and_then(octal_byte) {
                out.push(byte);
                rest = &tail[3..];
                continue;
            }
        }
        out.push(first);
        rest = tail;
    }
    out
}

/// The byte three octal digits name, `None` where they are not three octal digits under 0o400.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |value, &d| {
        let digit = d.checked_sub(b'0').filter(|&v| v < 8)?;
        value.checked_mul(8)?.checked_add(digit)
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn mountinfo_lines_give_ids_points_and_options() {
        let info = b"22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                     30 22 0:5 / /dev/my\\040disk rw,nosuid,noexec shared:2 - devtmpfs udev rw\n\
                     31 22 0:6 / /srv/caf\xff\\134x rw shared:3 - tmpfs tmpfs rw\n";
        let m = mounts(info);
        let line = |i: usize| {
            (
                m[i].id,
                m[i].point.as_os_str().as_bytes(),
                m[i].options.as_str(),
            )
        };
        assert_eq!(line(0), (22, &b"/"[..], "rw,relatime"));
        assert_eq!(line(1), (30, &b"/dev/my disk"[..], "rw,nosuid,noexec"));
        // A point that is not UTF-8 keeps its bytes (a backslash arrives escaped).
        assert_eq!(line(2), (31, &b"/srv/caf\xff\\x"[..], "rw"));
    }

    #[test]
    fn only_the_kernels_escapes_are_decoded() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"a\\011b\\012c", b"a\tb\nc"),
            (b"caf\xc3\xa9", b"caf\xc3\xa9"),
            (b"\\777", b"\\777"),
            (b"\\08x", b"\\08x"),
            (b"end\\04", b"end\\04"),
            (b"\\", b"\\"),
        ];
        for (field, path) in cases {
            assert_eq!(unescape(field), path, "{}", field.escape_ascii());
        }
    }

    #[test]
    fn everything_is_read_only_and_nodev_but_what_must_not_be() {
        let f = |o, w, d| flags_for(o, w, d);
        let ro_nodev = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        assert!(f("rw,relatime", false, false).contains(ro_nodev));
        // A writable folder stays writable, but no device opens through it.
        let w = f("rw", true, false);
        assert!(w.contains(MsFlags::MS_NODEV) && !w.contains(MsFlags::MS_RDONLY));
        // The worker's own device nodes must open.
        let d = f("rw,nosuid", false, true);
        assert!(d.contains(MsFlags::MS_RDONLY) && !d.contains(MsFlags::MS_NODEV));
        // What the mount had is kept (a kernel refuses to clear a locked flag).
        assert!(f("ro,nodev,noexec", false, true).contains(MsFlags::MS_NODEV | MsFlags::MS_NOEXEC));
        assert!(!f("rw", false, false).contains(MsFlags::MS_NOEXEC));
        let ro = f("ro", true, false);
        assert!(
            ro.contains(MsFlags::MS_RDONLY),
            "a read-only source stays so"
        );
        assert_ne!(
            f("rw,nosymfollow", false, false).bits() & libc::MS_NOSYMFOLLOW,
            0
        );
        assert_eq!(f("rw", false, false).bits() & libc::MS_NOSYMFOLLOW, 0);
    }

    #[test]
    fn a_mount_is_found_by_its_id() {
        let info = std::fs::read("/proc/self/mountinfo").unwrap();
        let (Some(id), Some(root)) = (
            mount_id(Path::new("/")),
            mounts(&info)
                .into_iter()
                .rfind(|m| m.point == Path::new("/")),
        ) else {
            return; // Before Linux 5.8, or in a chroot.
        };
        assert_eq!(id, root.id);
    }
}
