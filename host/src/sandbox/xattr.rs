//! Extended attributes the sandbox reads: POSIX ACLs on model files, systemd's delegation mark
//! on a cgroup.

use std::ffi::CStr;
use std::path::Path;

/// The value of `path`'s attribute `name`, when it has one of at most `cap` bytes.
pub(crate) fn get(path: &Path, name: &CStr, cap: usize) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = vec![0u8; cap];
    // SAFETY: both names are NUL-terminated; the kernel writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Sets `path`'s attribute `name` to `value`; the OS error when the file system refuses.
#[cfg(test)]
pub(crate) fn set(path: &Path, name: &CStr, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated names; the value is `value.len()` bytes.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
