//! The Hugging Face Hub's file API, for `pio pull`: a snapshot's file list (sizes, LFS SHA-256s)
//! and downloads that resume where an interrupted one stopped and are checked before they count.
//! Its own small client rather than the `hf-hub` crate, which neither checks what it downloaded
//! against the Hub's hashes nor reports progress per byte to a caller.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub mod record;
pub mod stage;

/// Where the Hub is and who asks.
#[derive(Debug, Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Its path in the repository.
    pub name: String,
    /// Its size, when the Hub says.
    pub size: Option<u64>,
    /// Its SHA-256 (files stored with Git LFS: weights).
    pub sha256: Option<String>,
}

/// A repository at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The commit the revision named.
    pub commit: String,
    /// Its files.
    pub files: Vec<RemoteFile>,
}

/// Why talking to the Hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The Hub answered with an error status.
    #[error("{url}: HTTP {status}; {hint}")]
    Status {
        /// What was asked.
        url: String,
        /// The status.
        status: u16,
        /// What to do.
        hint: &'static str,
    },
    /// No answer.
    #[error("{url}: {reason} (is HF_ENDPOINT right, and the network up?)")]
    Transport {
        /// What was asked.
        url: String,
        /// Why.
        reason: String,
    },
    /// An answer that is not the Hub's file list.
    #[error("{url}: not a Hub model listing: {reason}")]
    Listing {
        /// What was asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A local file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `HF_HUB_DOWNLOAD_TIMEOUT` is not a number of seconds.
    #[error("HF_HUB_DOWNLOAD_TIMEOUT={value}: expected seconds to wait, more than 0 (e.g. 10); fix or unset it")]
    Wait {
        /// The variable's value.
        value: String,
    },
    /// Another pull holds the folder.
    #[error("{path}: another `pio pull` is pulling into this folder; wait for it to end (or stop it) and pull again")]
    Busy {
        /// The model's folder.
        path: PathBuf,
    },
    /// A download that is not the file the Hub lists.
    #[error("{file}: {found}, but the Hub lists {expected}; the partial download was removed, run `pio pull` again")]
    Mismatch {
        /// The file.
        file: String,
        /// What arrived.
        found: String,
        /// What the Hub lists.
        expected: String,
    },
}

#[derive(Deserialize)]
struct Listing {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

/// `s` with everything but unreserved characters and `/` percent-encoded.
fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The SHA-256 of a file, hex.
fn sha256_of(path: &Path) -> Result<String, HubError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// How long the Hub has to take a connection and to start an answer, unless
/// `HF_HUB_DOWNLOAD_TIMEOUT` says otherwise (huggingface_hub's default).
const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The wait `HF_HUB_DOWNLOAD_TIMEOUT` (`value`) asks for, [`DEFAULT_WAIT`] when unset; a value
/// that is not seconds is refused rather than silently replaced.
fn wait_of(value: Option<&str>) -> Result<std::time::Duration, HubError> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(DEFAULT_WAIT);
    };
    (value.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| HubError::Wait {
            value: value.to_string(),
        })
}

impl Hub {
    /// The Hub `HF_ENDPOINT` names (default huggingface.co), as `HF_TOKEN` (or
    /// `HUGGING_FACE_HUB_TOKEN`) if set, waiting for a connection and for an answer's headers
    /// as long as `HF_HUB_DOWNLOAD_TIMEOUT` says (seconds; huggingface_hub's variable and its
    /// default of 10), so a mirror or proxy that takes the connection and never answers fails
    /// the pull instead of hanging it.
    pub fn from_env() -> Result<Self, HubError> {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let token = std::env::var("HF_TOKEN")
            .or_else(|_| std::env::var("HUGGING_FACE_HUB_TOKEN"))
            .ok()
            .filter(|t| !t.is_empty());
        let wait = wait_of(std::env::var("HF_HUB_DOWNLOAD_TIMEOUT").ok().as_deref())?;
        Ok(Self::new(&endpoint, token, wait))
    }

    /// A client of the Hub at `endpoint`, waiting `wait` for a connection and for each
    /// answer's headers.
    pub fn new(endpoint: &str, token: Option<String>, wait: std::time::Duration) -> Self {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(wait))
                .timeout_recv_response(Some(wait))
                // A total for one response's body, not an idle limit: `download` asks again
                // for the rest when it passes, so this bounds a stalled connection only.
                .timeout_recv_body(Some(std::time::Duration::from_secs(120)))
                .user_agent(concat!("pio/", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, HubError> {
        let mut request = self.agent.get(url);
        if let Some(t) = &self.token {
            request = request.header("Authorization", &format!("Bearer {t}"));
        }
        if range_from > 0 {
            request = request.header("Range", &format!("bytes={range_from}-"));
        }
        // Bytes as stored: a range counts them, and a compressed answer's offsets would not be
        // the file's.
        request = request.header("Accept-Encoding", "identity");
        let response = request.call().map_err(|e| HubError::Transport {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let hint = match status {
            200..=299 => return Ok(response),
            401 | 403 => {
                "the repository is gated or private: accept its terms on the Hub and set HF_TOKEN"
            }
            404 => "no such repository, revision or file: check the name (owner/name[@revision])",
            416 => "the partial download is larger than the file: remove it and pull again",
            429 => "rate limited: wait and pull again (a token raises the limit)",
            _ => "the Hub failed: try again later",
        };
        Err(HubError::Status {
            url: url.to_string(),
            status,
            hint,
        })
    }

    /// The files of `repo` at `revision`.
    pub fn snapshot(&self, repo: &str, revision: &str) -> Result<Snapshot, HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            encode_path(repo),
            encode_path(revision)
        );
        let mut response = self.get(&url, 0)?;
        let listing: Listing = response
            .body_mut()
            .read_json()
            .map_err(|e| HubError::Listing {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        // It goes into download URLs and into the manifest a pull writes: a commit id only.
        if !is_commit(&listing.sha) {
            return Err(HubError::Listing {
                url,
                reason: format!(
                    "its commit {:?} is not a commit id (40 hexadecimal digits)",
                    listing.sha
                ),
            });
        }
        let files = listing
            .siblings
            .into_iter()
            .map(|s| RemoteFile {
                name: s.rfilename,
                size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
                sha256: s.lfs.map(|l| l.sha256.to_lowercase()),
            })
            .collect();
        Ok(Snapshot {
            commit: listing.sha,
            files,
        })
    }

    /// Downloads `file` of `repo` at `commit` to `dest`, resuming a partial download
    /// (`dest` + `.incomplete`) and checking size and SHA-256 before it takes `dest`'s name; a
    /// `dest` that already matches is kept. `progress(done, total)` follows the bytes.
    pub fn download(
        &self,
        repo: &str,
        commit: &str,
        file: &RemoteFile,
        dest: &Path,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<(), HubError> {
        if holds(file, dest)? {
            let size = std::fs::metadata(dest).map_err(io(dest))?.len();
            progress(size, Some(size));
            return Ok(());
        }
        let partial = PathBuf::from(format!("{}.incomplete", dest.display()));
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            encode_path(repo),
            encode_path(commit),
            encode_path(&file.name)
        );
        // A connection that breaks off (or reaches the body's time limit, a total in ureq) is
        // asked again for the rest at once: a large shard on a slow link takes several. Only
        // tries that bring nothing count against the limit.
        let mut fruitless = 0;
        loop {
            let mut before = size_of(&partial);
            // All there (the connection broke after the last byte): a range past it is a 416.
            if before > 0 && file.size == Some(before) {
                break;
            }
            // Longer than the file (left by a server that sent too much): asking for the rest
            // would be a 416 at every run.
            if file.size.is_some_and(|size| before > size) {
                std::fs::remove_file(&partial).map_err(io(&partial))?;
                before = 0;
            }
            match self.receive(&url, file, &partial, progress) {
                Ok(()) => break,
                // A CDN's passing failure or a rate limit: worth the same tries as a cut.
                Err(e @ HubError::Transport { .. })
                | Err(
                    e @ HubError::Status {
                        status: 429 | 500..=599,
                        ..
                    },
                ) => {
                    fruitless = if size_of(&partial) > before {
                        0
                    } else {
                        fruitless + 1
                    };
                    if fruitless >= FRUITLESS_TRIES {
                        return Err(e);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500 * fruitless));
                }
                Err(e) => return Err(e),
            }
        }
        if let Some((found, expected)) = matches(file, &partial)? {
            let _ = std::fs::remove_file(&partial);
            return Err(HubError::Mismatch {
                file: file.name.clone(),
                found,
                expected,
            });
        }
        std::fs::rename(&partial, dest).map_err(io(dest))
    }

    /// One request for what `partial` lacks of `url`, appended to it (all of it, written
    /// afresh, where the server ignores the range).
    fn receive(
        &self,
        url: &str,
        file: &RemoteFile,
        partial: &Path,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<(), HubError> {
        let have = size_of(partial);
        let mut response = self.get(url, have)?;
        // 206: the rest of the file, from where it was asked (else it would be spliced in at
        // the wrong place); 200: all of it.
        let resumed = have > 0 && response.status().as_u16() == 206;
        let from = |r: &str| {
            r.strip_prefix("bytes ")?
                .split('-')
                .next()?
                .parse::<u64>()
                .ok()
        };
        let range = response.headers().get("content-range");
        let start = range.and_then(|v| v.to_str().ok()).and_then(from);
        if resumed && start.is_some_and(|s| s != have) {
            return Err(HubError::Transport {
                url: url.to_string(),
                reason: format!(
                    "asked for bytes from {have}, the answer starts at {}",
                    start.unwrap_or_default()
                ),
            });
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(partial)
            .map_err(io(partial))?;
        let mut done = if resumed { have } else { 0 };
        progress(done, file.size);
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf).map_err(|e| HubError::Transport {
                url: url.to_string(),
                reason: format!("the download broke off after {done} bytes ({e}), {FRUITLESS_TRIES} tries in a row brought nothing more; run `pio pull` again to resume"),
            })?;
            if n == 0 {
                break;
            }
            done += n as u64;
            if let Some(size) = file.size.filter(|&size| done > size) {
                drop(out);
                let _ = std::fs::remove_file(partial);
                return Err(HubError::Mismatch {
                    file: file.name.clone(),
                    found: "more bytes".into(),
                    expected: format!("{size} bytes"),
                });
            }
            out.write_all(&buf[..n]).map_err(io(partial))?;
            progress(done, file.size);
        }
        out.sync_all().map_err(io(partial))
    }
}

/// Whether `path` is `file` as the Hub lists it (its size, its SHA-256 where listed).
pub fn holds(file: &RemoteFile, path: &Path) -> Result<bool, HubError> {
    Ok(path.is_file() && matches(file, path)?.is_none())
}

/// Requests in a row that may bring no byte of a file before its download fails.
const FRUITLESS_TRIES: u64 = 3;

/// The size of `path`, 0 when absent.
fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// How `path` differs from what the Hub lists for `file` (found, expected), if it does.
fn matches(file: &RemoteFile, path: &Path) -> Result<Option<(String, String)>, HubError> {
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    if let Some(expected) = file.size.filter(|&s| s != size) {
        return Ok(Some((format!("{size} bytes"), format!("{expected} bytes"))));
    }
    if let Some(expected) = &file.sha256 {
        let found = sha256_of(path)?;
        if &found != expected {
            return Ok(Some((
                format!("SHA-256 {found}"),
                format!("SHA-256 {expected}"),
            )));
        }
    }
    Ok(None)
}

/// Whether `sha` is a git commit id as the Hub gives it: 40 hexadecimal digits.
fn is_commit(sha: &str) -> bool {
    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unusable `HF_HUB_DOWNLOAD_TIMEOUT` is refused, naming it, not replaced by the default.
    #[test]
    fn the_download_wait_is_seconds_or_refused() {
        assert_eq!(wait_of(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(
            wait_of(Some("2.5")).unwrap(),
            std::time::Duration::from_millis(2500)
        );
        for bad in ["abc", "0", "-3", "inf"] {
            let e = wait_of(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("HF_HUB_DOWNLOAD_TIMEOUT") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn paths_are_encoded_but_keep_their_slashes() {
        assert_eq!(encode_path("Qwen/Qwen3-4B"), "Qwen/Qwen3-4B");
        assert_eq!(encode_path("a b/c?d#e"), "a%20b/c%3Fd%23e");
        assert_eq!(encode_path("refs/pr/1"), "refs/pr/1");
    }
}
