//! Private copies of the plugin libraries being served. A worker maps its library for as long as
//! it runs; an operator replacing the file in place (`cp new.so plugins/`) would rewrite pages
//! under a running worker and crash it. Workers therefore run a content-addressed copy, and the
//! watched file is free to change.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A folder of library copies, named by their sha256.
#[derive(Debug, Clone)]
pub struct LibraryStore {
    dir: PathBuf,
}

/// sha256 of a byte string, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl LibraryStore {
    /// Creates `dir` (readable by the workers' unprivileged user).
    pub fn create(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir })
    }

    /// Where the copies are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies `library` in (once per content); returns the copy and its sha256.
    pub fn snapshot(&self, library: &Path) -> std::io::Result<(PathBuf, String)> {
        let bytes = std::fs::read(library)?;
        let sha = sha256_hex(&bytes);
        let copy = self.dir.join(format!("{sha}.so"));
        if !copy.is_file() {
            // Written under a temporary name and renamed: a copy is never seen half-written.
            let partial = self.dir.join(format!(".{sha}.partial"));
            let mut f = std::fs::File::create(&partial)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&partial, &copy)?;
        }
        Ok((copy, sha))
    }

    /// Removes copies no deployment in `keep` uses.
    pub fn prune(&self, keep: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let sha = name.trim_end_matches(".so");
            if name.ends_with(".so") && !keep.iter().any(|k| k == sha) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_survives_the_original_being_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LibraryStore::create(tmp.path().join("libs")).unwrap();
        let original = tmp.path().join("libx.so");
        std::fs::write(&original, b"first").unwrap();
        let (copy, sha) = store.snapshot(&original).unwrap();
        std::fs::write(&original, b"second").unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"first");
        assert_eq!(sha, sha256_hex(b"first"));
        let (copy2, sha2) = store.snapshot(&original).unwrap();
        assert_ne!((copy2.clone(), sha2), (copy.clone(), sha.clone()));
        store.prune(std::slice::from_ref(&sha));
        assert!(copy.is_file() && !copy2.exists());
    }
}
