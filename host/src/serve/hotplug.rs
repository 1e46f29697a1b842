//! Hot plug: the plugin directories are watched; after a burst of changes settles, they are
//! scanned again and the served set brought in line (see [`Models::rescan`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::models::Models;
use crate::discovery::{self, SearchPaths, Status};
use crate::manifest::Manifest;
use crate::probe::{LibraryReport, Prober};

/// How long the directories must be quiet before a rescan: a library being copied in arrives
/// as many writes.
const SETTLE: Duration = Duration::from_millis(500);

/// One plugin found in the plugin directories.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) manifest: Manifest,
    pub(super) manifest_path: PathBuf,
    pub(super) library: PathBuf,
    pub(super) report: LibraryReport,
    /// sha256 of manifest and library together: a change of either reloads.
    pub(super) fingerprint: String,
}

/// How often the watched folders are checked for being other folders now.
const RECHECK: Duration = Duration::from_secs(2);

/// The watch on the plugin and library folders; dropped, it ends.
pub struct HotPlug {
    _watched: Arc<std::sync::Mutex<Watched>>,
}

/// The watcher and what each folder was when it was last watched.
struct Watched {
    watcher: notify::RecommendedWatcher,
    /// Each folder, with its device and inode (links followed) as watched; `None` while missing.
    dirs: Vec<(PathBuf, Option<(u64, u64)>)>,
}

/// What `dir` is now: its device and inode, links followed; `None` while it is missing.
fn identity(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl Watched {
    /// Watches again each folder that is another one now — a link pointed elsewhere (`ln -sfn
    /// release-2 plugins`), a folder removed and made anew — whose watch stayed on the old one
    /// or ended with it, so that hot plug went quiet for good; whether any was.
    fn refresh(&mut self) -> bool {
        let mut changed = false;
        for (dir, seen) in &mut self.dirs {
            let now = identity(dir);
            if now == *seen {
                continue;
            }
            let _ = self.watcher.unwatch(dir);
            if now.is_some() {
                if let Err(e) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
                }
            }
            tracing::info!(dir = %dir.display(), "the plugin folder is another one now: watching it again");
            *seen = now;
            changed = true;
        }
        changed
    }
}

/// Starts watching the plugin and library directories; changes are acted on once `first_scan`
/// says the daemon's first scan is done (one seen before then is scanned for at once). The watch
/// ends when the returned handle is dropped.
pub fn watch(
    models: Arc<Models>,
    first_scan: tokio::sync::oneshot::Receiver<()>,
) -> Option<HotPlug> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch the plugin directories ({e}); hot plug is off, use the admin API"
                );
                return None;
            }
        };
    let search = &models.setup().search;
    let mut dirs = Vec::new();
    for dir in search.plugin_dirs.iter().chain(&search.library_dirs) {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
        }
        dirs.push((dir.clone(), identity(dir)));
    }
    let watched = Arc::new(std::sync::Mutex::new(Watched { watcher, dirs }));
    let weak = Arc::downgrade(&watched);
    tokio::spawn(async move {
        // Ended without a scan: the daemon is stopping.
        if first_scan.await.is_err() {
            return;
        }
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    // Wait for quiet, swallowing the rest of the burst.
                    while let Ok(Some(())) = tokio::time::timeout(SETTLE, rx.recv()).await {}
                }
                _ = recheck.tick() => {
                    let Some(watched) = weak.upgrade() else { return };
                    let changed = watched.lock().map(|mut w| w.refresh()).unwrap_or(false);
                    if !changed {
                        continue;
                    }
                }
            }
            if let Err(e) = models.rescan().await {
                tracing::error!("rescan failed: {e}");
            }
        }
    });
    Some(HotPlug { _watched: watched })
}

pub(super) type Scan = (Vec<Found>, Vec<(PathBuf, String)>);

/// Discovery plus a fingerprint of each ready plugin's files (blocking: probes in children).
pub(super) fn scan(search: &SearchPaths, prober: &Prober) -> Result<Scan, discovery::ScanError> {
    let mut found = Vec::new();
    let mut broken = Vec::new();
    for c in discovery::discover(search, prober)? {
        match found_of(c) {
            Some(Ok(f)) => found.push(f),
            Some(Err(b)) => broken.push(b),
            None => {}
        }
    }
    Ok((found, broken))
}

/// The manifest at `path` checked again, alone, as a scan checks it (blocking): what it serves
/// now, or why it cannot.
pub(super) fn check_one(
    path: &std::path::Path,
    search: &SearchPaths,
    prober: &Prober,
) -> Result<Found, String> {
    let mut c = discovery::check_static(path, search);
    discovery::check_library(&mut c, prober);
    match found_of(c) {
        Some(result) => result.map_err(|(_, why)| why),
        None => Err(format!("{}: not served", path.display())),
    }
}

/// A checked candidate as the daemon takes it: served (with its files' fingerprint), broken
/// (its manifest and why), or neither (superseded).
fn found_of(c: discovery::Candidate) -> Option<Result<Found, (PathBuf, String)>> {
    match (c.status, c.manifest, c.library, c.report) {
        (Status::Ready, Some(manifest), Some(library), Some(report)) => {
            // Of the files as they were checked, not as they are now: a change made during the
            // checks must look like one to the next scan.
            let Some(fingerprint) = c.fingerprint else {
                let why = format!("cannot read the plugin's library {}", library.display());
                return Some(Err((c.manifest_path, why)));
            };
            Some(Ok(Found {
                manifest,
                manifest_path: c.manifest_path,
                library,
                report,
                fingerprint,
            }))
        }
        (Status::Failed(e), ..) => Some(Err((c.manifest_path, e.to_string()))),
        _ => None,
    }
}
