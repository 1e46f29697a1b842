//! Finding plugins: scan plugin directories for manifests, check each one, and pick one version
//! per plugin name. A problem with one plugin becomes that plugin's error; the others still load.
//!
//! Checks, in order: the manifest parses; its library is found (next to the manifest, then in the
//! configured library directories, then next to the `pio` executable); the library's sha256
//! matches when pinned; the host meets the manifest's `api` requirement; then, in a child process,
//! the library loads as a plugin built against a compatible plugin-api with the expected layout
//! and reports the manifest's name and version. Among the plugins that pass, the highest version
//! of each name wins; two manifests claiming the same name and version are both refused.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::{line_column, Manifest};
use crate::probe::{LibraryReport, ProbeError, Prober};

/// Where to look for manifests and libraries.
#[derive(Debug, Clone, Default)]
pub struct SearchPaths {
    /// Directories scanned for `*.toml` manifests.
    pub plugin_dirs: Vec<PathBuf>,
    /// Extra directories a manifest's `library` is looked up in.
    pub library_dirs: Vec<PathBuf>,
    /// The directory of the `pio` executable, searched last (so a `cargo build` tree works).
    pub exe_dir: Option<PathBuf>,
}

/// Why a plugin is not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    /// The manifest could not be read or parsed.
    #[error("{0}")]
    Manifest(String),
    /// The manifest's library file is nowhere to be found.
    #[error("{manifest}:{line}:{column}: library \"{library}\" not found; looked in {searched}; build the plugin or fix `library`")]
    LibraryNotFound {
        /// The manifest.
        manifest: PathBuf,
        /// Where `library` is written.
        line: usize,
        /// Column of `library`'s value.
        column: usize,
        /// The name as written.
        library: String,
        /// The directories tried, comma-separated.
        searched: String,
    },
    /// The library's digest differs from the pinned one.
    #[error("{manifest}: sha256 of {library} is {actual}, but the manifest pins {expected}; the library changed since it was pinned: re-pin it if the change is intended")]
    Sha256Mismatch {
        /// The manifest.
        manifest: PathBuf,
        /// The library.
        library: PathBuf,
        /// The pinned digest.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The library could not be read to hash it.
    #[error("{library}: cannot read library: {reason}")]
    ReadLibrary {
        /// The library.
        library: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The host's plugin-api does not meet the manifest's `api` requirement.
    #[error("{manifest}:{line}:{column}: the manifest requires plugin-api {required}, but this host has plugin-api {host}; for a plugin built against a newer plugin-api, upgrade PIO or use a build for {host}; for a library built against {host} or older, fix the manifest's `api` to the plugin-api it was built against (`pio check` on the library says which, e.g. `api = \"^1.0\"`)")]
    ApiRequirement {
        /// The manifest.
        manifest: PathBuf,
        /// Where `api` is written.
        line: usize,
        /// Column of `api`'s value.
        column: usize,
        /// The manifest's requirement.
        required: String,
        /// The host's plugin-api version.
        host: String,
    },
    /// The manifest's model (a snapshot folder or a GGUF file) is not there.
    #[error("{manifest}:{line}:{column}: model {path} {problem}; put the snapshot there (`pio pull` downloads one) or fix `[model] path`")]
    ModelMissing {
        /// The manifest.
        manifest: PathBuf,
        /// Where `path` is written.
        line: usize,
        /// Column of `path`'s value.
        column: usize,
        /// The model, joined to the manifest's folder.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The manifest's model is there but the workers' user cannot read it (a weight file left
    /// 0600 by the tool that wrote it): found before a worker starts to load it.
    #[error("{manifest}: {message}")]
    ModelUnreadable {
        /// The manifest.
        manifest: PathBuf,
        /// The path, the uid and the fix.
        message: String,
    },
    /// The plugin refuses the manifest's `[model]` (asked in the probe, as a load would).
    #[error("{manifest}: the plugin refuses its [model]: {message}; fix the manifest")]
    ModelConfig {
        /// The manifest.
        manifest: PathBuf,
        /// The plugin's error kind (`invalid_config`, `unsupported` ...).
        kind: String,
        /// The plugin's reason.
        message: String,
    },
    /// The plugin cannot be confined as its manifest asks on this host (a `maximum` tier with no
    /// sha256 pin, a mechanism the kernel lacks); found by `pio check`, which plans its worker.
    #[error("{manifest}: cannot run at tier {tier}: {reason}")]
    Confinement {
        /// The manifest.
        manifest: PathBuf,
        /// The tier it asks for.
        tier: String,
        /// Why not.
        reason: String,
    },
    /// Loading the library failed (see [`ProbeError`]).
    #[error("{0}")]
    Probe(#[from] ProbeError),
    /// The library is a different plugin, or another version, than its manifest says.
    #[error("{manifest}: the manifest says {field} \"{in_manifest}\", but {library} reports \"{in_library}\"; {}", identity_fix(.field, .in_library))]
    Identity {
        /// The manifest.
        manifest: PathBuf,
        /// The library.
        library: PathBuf,
        /// `name` or `version`.
        field: &'static str,
        /// The manifest's value.
        in_manifest: String,
        /// The library's value.
        in_library: String,
    },
    /// Two manifests claim the same plugin name and version.
    #[error(
        "{manifest}: {name} {version} is also claimed by {other}; remove one of the two manifests"
    )]
    Duplicate {
        /// This manifest.
        manifest: PathBuf,
        /// The other manifest.
        other: PathBuf,
        /// The plugin name.
        name: String,
        /// The version both claim.
        version: String,
    },
}

/// What to do about a manifest whose `field` does not match its library's report.
fn identity_fix(field: &str, in_library: &str) -> String {
    match field {
        "name" => format!(
            "to serve the plugin under this name, keep `name` and add `plugin = \"{in_library}\"`; else fix the manifest or ship the matching library"
        ),
        _ => "fix the manifest or ship the matching library".into(),
    }
}

impl CheckError {
    /// A short machine-readable name of the failed check.
    pub fn kind(&self) -> &str {
        match self {
            Self::Manifest(_) => "manifest",
            Self::LibraryNotFound { .. } => "library_not_found",
            Self::Sha256Mismatch { .. } => "sha256_mismatch",
            Self::ReadLibrary { .. } => "read_library",
            Self::ApiRequirement { .. } => "api_requirement",
            Self::ModelMissing { .. } => "model_missing",
            Self::ModelUnreadable { .. } => "model_unreadable",
            Self::ModelConfig { kind, .. } => kind,
            Self::Confinement { .. } => "confinement",
            Self::Probe(p) => p.kind(),
            Self::Identity { .. } => "identity",
            Self::Duplicate { .. } => "duplicate",
        }
    }
}

/// Where a plugin stands after discovery.
#[derive(Debug, Clone)]
pub enum Status {
    /// Every check passed and it is the version of its name that gets served.
    Ready,
    /// It passed, but a higher version of the same plugin wins.
    Superseded {
        /// The winning version.
        by: semver::Version,
    },
    /// A check failed.
    Failed(CheckError),
}

/// One manifest found in a plugin directory, and what became of it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// The parsed manifest, when it parsed.
    pub manifest: Option<Manifest>,
    /// The resolved library file, when found.
    pub library: Option<PathBuf>,
    /// What the library reported, when probed.
    pub report: Option<LibraryReport>,
    /// The verdict.
    pub status: Status,
    /// SHA-256 over the manifest text that was parsed and the library's bytes as they were
    /// before the probe: a change made during the checks yields another one, so the next scan
    /// checks again (hot plug compares them).
    pub fingerprint: Option<String>,
}

impl Candidate {
    /// Whether it passed every check but its model's being there: a caller that brings its own
    /// model (`pio run --model-path`, `pio pull`) can still use it.
    pub fn ready_given_a_model(&self) -> bool {
        matches!(
            self.status,
            Status::Ready
                | Status::Failed(
                    CheckError::ModelMissing { .. } | CheckError::ModelUnreadable { .. }
                )
        )
    }
}

/// A plugin directory that cannot be scanned.
#[derive(Debug, thiserror::Error)]
#[error("plugin directory {dir}: {reason}; create it or pass another --plugins")]
pub struct ScanError {
    /// The directory.
    pub dir: PathBuf,
    /// The I/O error.
    pub reason: String,
}

/// All `*.toml` files directly in `dirs`, in a stable order.
pub fn scan(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, ScanError> {
    let mut manifests = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| ScanError {
            dir: dir.clone(),
            reason: e.to_string(),
        })?;
        // Every `*.toml` but folders and hidden files (an editor's or a deploy tool's own, as
        // Emacs's `.#name.toml` lock link): one that cannot be read (a dangling link, a FIFO) is
        // reported by its check, not passed over, which unloaded a model served from it.
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && !p.is_dir())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            })
            .collect();
        found.sort();
        manifests.extend(found);
    }
    Ok(manifests)
}

/// The plugin-api version of this host, as semver.
pub fn host_api_version() -> semver::Version {
    let v = pio_plugin_api::API_VERSION;
    semver::Version::new(u64::from(v.major), u64::from(v.minor), u64::from(v.patch))
}

/// Everything the daemon checks without loading the library: manifest, library location,
/// sha256, `api` requirement.
pub fn check_static(manifest_path: &Path, search: &SearchPaths) -> Candidate {
    let mut candidate = Candidate {
        manifest_path: manifest_path.to_owned(),
        manifest: None,
        library: None,
        report: None,
        status: Status::Ready,
        fingerprint: None,
    };
    let text = match crate::manifest::read(manifest_path) {
        Ok(text) => text,
        Err(e) => {
            candidate.status = Status::Failed(CheckError::Manifest(e.to_string()));
            return candidate;
        }
    };
    match Manifest::parse(manifest_path, &text) {
        Ok(manifest) => {
            match check_manifest(manifest_path, &text, &manifest, search) {
                Ok(library) => {
                    candidate.fingerprint = fingerprint(&text, &library);
                    candidate.library = Some(library);
                    // Last, and the library is still probed: a caller that brings its own model
                    // can use the plugin (`Candidate::ready_given_a_model`).
                    if let Err(e) = check_model_path(manifest_path, &text, &manifest) {
                        candidate.status = Status::Failed(e);
                    }
                }
                Err(e) => candidate.status = Status::Failed(e),
            }
            candidate.manifest = Some(manifest);
        }
        Err(e) => candidate.status = Status::Failed(CheckError::Manifest(e.to_string())),
    }
    candidate
}

fn check_manifest(
    path: &Path,
    text: &str,
    manifest: &Manifest,
    search: &SearchPaths,
) -> Result<PathBuf, CheckError> {
    let library = find_library(path, text, manifest, search)?;
    if let Some(pinned) = &manifest.sha256 {
        let actual = sha256_file(&library)?;
        if actual != pinned.get_ref().0 {
            return Err(CheckError::Sha256Mismatch {
                manifest: path.to_owned(),
                library,
                expected: pinned.get_ref().0.clone(),
                actual,
            });
        }
    }
    let host = host_api_version();
    if !manifest.api.get_ref().matches(&host) {
        let (line, column) = line_column(text, manifest.api.span().start);
        return Err(CheckError::ApiRequirement {
            manifest: path.to_owned(),
            line,
            column,
            required: manifest.api.get_ref().to_string(),
            host: host.to_string(),
        });
    }
    Ok(library)
}

/// The `[model] path` names something that is there (a snapshot folder, or a GGUF file; which
/// the plugin takes is its own check at load): a snapshot not yet downloaded is caught by
/// `pio check` and at discovery, before any worker starts to load it.
fn check_model_path(path: &Path, text: &str, manifest: &Manifest) -> Result<(), CheckError> {
    let (Some(written), Some(model)) = (&manifest.model.path, model_path(path, manifest)) else {
        return Ok(());
    };
    let problem = match std::fs::metadata(&model) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => format!("cannot be read ({e})"),
    };
    let (line, column) = line_column(text, written.span().start);
    Err(CheckError::ModelMissing {
        manifest: path.to_owned(),
        line,
        column,
        path: model,
        problem,
    })
}

/// The `[model] path` of the manifest at `path`, in full: it may be relative to the manifest's
/// folder, or a bare file name.
fn model_path(path: &Path, manifest: &Manifest) -> Option<PathBuf> {
    let written = manifest.model.path.as_ref()?;
    Some(crate::launch::resolved(
        &path
            .parent()
            .unwrap_or(Path::new("."))
            .join(written.get_ref()),
    ))
}

/// The model, when there, is readable to the user `prober`'s probes (and the workers) run as:
/// the folder and each file directly in it.
fn check_model_readable(
    path: &Path,
    manifest: &Manifest,
    prober: &Prober,
) -> Result<(), CheckError> {
    use crate::sandbox::readable::{unreadable_tree, Reach};
    let (Some(model), Some((uid, gid))) =
        (model_path(path, manifest), prober.drop_to(&manifest.name))
    else {
        return Ok(());
    };
    // The folders above count below `maximum`, whose empty root mounts the model alone; the
    // tier applied is known only at start (`min_tier`), where the worker's own check sees
    // them: here the model folder and its files, which every tier reads.
    match unreadable_tree(&model, uid, gid, Reach::Mounted) {
        Some(blocked) => Err(CheckError::ModelUnreadable {
            manifest: path.to_owned(),
            message: blocked.message(&format!("model {}", model.display()), uid, gid),
        }),
        None => Ok(()),
    }
}

/// Resolves the manifest's `library`: absolute as is; otherwise next to the manifest, then in each
/// library directory, then next to the executable. A name without an extension also matches the
/// platform's file name for it (`echo` → `libecho.so` on Linux).
fn find_library(
    path: &Path,
    text: &str,
    manifest: &Manifest,
    search: &SearchPaths,
) -> Result<PathBuf, CheckError> {
    let written = manifest.library.get_ref();
    let mut names = vec![written.clone()];
    if written.extension().is_none() {
        if let Some(stem) = written.file_name() {
            let platform = format!(
                "{}{}{}",
                std::env::consts::DLL_PREFIX,
                stem.to_string_lossy(),
                std::env::consts::DLL_SUFFIX
            );
            names.push(written.with_file_name(platform));
        }
    }
    // A bare file name's parent is "", which the error would print as nothing.
    let folder_of = |p: &Path| match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![folder_of(path)];
    dirs.extend(search.library_dirs.iter().cloned());
    dirs.extend(search.exe_dir.iter().cloned());
    if written.is_absolute() {
        // Joined to an absolute name, the folder drops out; it is still the one looked in.
        dirs = vec![folder_of(written)];
    }
    for dir in &dirs {
        for name in &names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let (line, column) = line_column(text, manifest.library.span().start);
    Err(CheckError::LibraryNotFound {
        manifest: path.to_owned(),
        line,
        column,
        library: written.display().to_string(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// SHA-256 over `text` and then `library`'s bytes, in hex; `None` when the library cannot be
/// read.
fn fingerprint(text: &str, library: &Path) -> Option<String> {
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    hash_file(hasher, library).ok()
}

/// The lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, CheckError> {
    hash_file(Sha256::new(), path)
}

/// `hasher` fed with the bytes of the file at `path`, read in pieces (libraries are 100 MB
/// with debug info), as lowercase hex.
fn hash_file(mut hasher: Sha256, path: &Path) -> Result<String, CheckError> {
    let read_error = |e: std::io::Error| CheckError::ReadLibrary {
        library: path.to_owned(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Loads the candidate's library in a child process and checks it reports the manifest's name
/// and version, then that its plugin supports the manifest's `[model]` (`supports_config`) and
/// that the workers' user can read the model.
pub fn check_library(candidate: &mut Candidate, prober: &Prober) {
    let (Some(manifest), Some(library), true) = (
        &candidate.manifest,
        &candidate.library,
        candidate.ready_given_a_model(),
    ) else {
        return;
    };
    let config = crate::launch::model_config(manifest, &candidate.manifest_path);
    // The plugin's word on the config counts once the library is the manifest's plugin: a
    // wrong library is named as such, not by what it makes of another plugin's options.
    let mut refused = None;
    let probed = match &manifest.sha256 {
        Some(pin) => prober.probe_pinned(library, &manifest.name, &config, &pin.get_ref().0),
        None => prober.probe_for(library, &manifest.name, &config),
    };
    let result = match probed {
        Err(ProbeError::ConfigRefused {
            report,
            kind,
            message,
        }) => {
            refused = Some(CheckError::ModelConfig {
                manifest: candidate.manifest_path.clone(),
                kind,
                message,
            });
            Ok(*report)
        }
        other => other.map_err(CheckError::from),
    };
    let result = result
        .and_then(|report| {
            let identity = |field, in_manifest: String, in_library: &str| CheckError::Identity {
                manifest: candidate.manifest_path.clone(),
                library: library.clone(),
                field,
                in_manifest,
                in_library: in_library.to_string(),
            };
            let plugin = manifest.plugin.as_ref().unwrap_or(&manifest.name);
            if &report.name != plugin {
                let field = if manifest.plugin.is_some() {
                    "plugin"
                } else {
                    "name"
                };
                return Err(identity(field, plugin.clone(), &report.name));
            }
            if report.version != manifest.version.to_string() {
                return Err(identity(
                    "version",
                    manifest.version.to_string(),
                    &report.version,
                ));
            }
            Ok(report)
        })
        .and_then(|report| refused.map_or(Ok(report), Err));
    // A library's failure outranks a missing model's.
    match result {
        Ok(report) => candidate.report = Some(report),
        Err(e) => candidate.status = Status::Failed(e),
    }
    if matches!(candidate.status, Status::Ready) {
        if let Err(e) = check_model_readable(&candidate.manifest_path, manifest, prober) {
            candidate.status = Status::Failed(e);
        }
    }
}

/// Picks one version per name among the ready candidates: the highest wins, the rest are
/// superseded; manifests claiming the same name and version are all refused.
pub fn select(candidates: &mut [Candidate]) {
    let versions: Vec<Option<semver::Version>> = candidates
        .iter()
        .map(|c| c.manifest.as_ref().map(|m| m.version.clone()))
        .collect();
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if let (Status::Ready, Some(m)) = (&c.status, &c.manifest) {
            by_name.entry(m.name.clone()).or_default().push(i);
        }
    }
    for (name, indices) in by_name {
        for &i in &indices {
            if let Some(&j) = indices
                .iter()
                .find(|&&j| j != i && versions[j] == versions[i])
            {
                candidates[i].status = Status::Failed(CheckError::Duplicate {
                    manifest: candidates[i].manifest_path.clone(),
                    other: candidates[j].manifest_path.clone(),
                    name: name.clone(),
                    version: versions[i]
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                });
            }
        }
        let ready: Vec<usize> = indices
            .into_iter()
            .filter(|&i| matches!(candidates[i].status, Status::Ready))
            .collect();
        let Some(best) = ready.iter().copied().max_by_key(|&i| versions[i].clone()) else {
            continue;
        };
        for i in ready.into_iter().filter(|&i| i != best) {
            if let Some(by) = versions[best].clone() {
                candidates[i].status = Status::Superseded { by };
            }
        }
    }
}

/// The whole pipeline: scan, check each manifest, probe each library, select.
pub fn discover(search: &SearchPaths, prober: &Prober) -> Result<Vec<Candidate>, ScanError> {
    let mut candidates: Vec<Candidate> = scan(&search.plugin_dirs)?
        .iter()
        .map(|path| check_static(path, search))
        .collect();
    for candidate in &mut candidates {
        check_library(candidate, prober);
    }
    select(&mut candidates);
    Ok(candidates)
}

#[cfg(test)]
#[path = "discovery_tests.rs"]
mod tests;
