//! From a checked manifest to what a worker needs: resolved limits, the confinement plan, the
//! model config with paths made absolute.

use std::path::Path;

use pio_plugin_api::wire::{HostContext, ModelConfig};

use crate::config::Config;
use crate::discovery::{Candidate, CheckError, Status};
use crate::manifest::Manifest;
use crate::sandbox::users::UsersError;
use crate::sandbox::{self, HostSupport, Plan, PlanError, Policy};
use crate::supervisor::WorkerSpec;

/// Why a plugin's worker cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The host cannot confine it as asked.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// No uid can be had for it.
    #[error(transparent)]
    Users(#[from] UsersError),
    /// Its limits are past what the daemon allows.
    #[error("{0}")]
    Limits(String),
}

/// Plans the worker's confinement from the manifest's tier and its limits (resolved against
/// the daemon config's defaults), and the uid it runs as.
pub fn plan(
    manifest: &Manifest,
    config: &Config,
    policy: &Policy,
    host: &HostSupport,
) -> Result<Plan, LaunchError> {
    // Only root switches users: elsewhere the uid is not looked for (nor refused).
    let uid = match host.root {
        true => policy.users.uid_for(&manifest.name)?,
        false => nix::unistd::geteuid().as_raw(),
    };
    let subject = sandbox::Subject {
        uid,
        plugin: &manifest.name,
        tier: manifest.tier,
        limits: config
            .limits_for(&manifest.limits)
            .map_err(LaunchError::Limits)?,
        pinned: manifest.sha256.is_some(),
        gpu: manifest
            .model
            .device
            .as_ref()
            .and_then(|d| sandbox::gpu::ordinal(&d.0)),
    };
    Ok(sandbox::plan(subject, policy, host)?)
}

/// Plans the worker of a `candidate` that passed, on a host with every mechanism, under the
/// daemon's `config` and `policy` (its `min_tier`, `allow_downgrade`: the defaults when none is
/// given), so that `pio check` and `pio list` fail a manifest the daemon would refuse to start
/// whatever its host (`maximum`, or raised to it, with no pin).
pub fn check_confinement(candidate: &mut Candidate, config: &Config, policy: &Policy) {
    let (Status::Ready, Some(manifest)) = (&candidate.status, &candidate.manifest) else {
        return;
    };
    // Only the manifest's and configuration's reasons: the daemon's host may differ from
    // where the check runs.
    let host = HostSupport::complete();
    // The uid is the running host's business, not the manifest's.
    let policy = Policy {
        users: sandbox::users::WorkerUsers::Shared(65534),
        ..policy.clone()
    };
    if let Err(e) = plan(manifest, config, &policy, &host) {
        candidate.status = Status::Failed(CheckError::Confinement {
            manifest: candidate.manifest_path.clone(),
            tier: manifest.tier.to_string(),
            reason: e.to_string(),
        });
    }
}

/// The model config the plugin gets: the manifest's `[model]`, its path resolved once against the
/// manifest's folder (absolute, `..` and symlinks resolved: a confined worker sees only the model
/// folder itself, mounted at that path, so a path through the manifest's folder would not exist
/// for it), its `options` flattened in.
pub fn model_config(manifest: &Manifest, manifest_path: &Path) -> ModelConfig {
    let m = &manifest.model;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let mut extra = serde_json::to_value(&m.options)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    // A folder the plugin writes (the engine's quantization cache), relative to the manifest
    // like the model path, and made absolute for a worker that sees another root.
    if let Some(dir) = &m.quantization_cache {
        let dir = resolved(&base.join(dir)).display().to_string();
        extra.insert(CACHE_KEY.into(), dir.into());
    }
    ModelConfig {
        model_path: m.path.as_ref().map(|p| resolved(&base.join(p.get_ref()))),
        dtype: m.dtype.map(|d| d.name().to_string()),
        device: m.device.as_ref().map(|d| d.0.clone()),
        quantization: m.quantization.map(|q| q.name().to_string()),
        generation: m.generation.clone(),
        extra,
    }
}

/// The `[model]` key naming the folder the engine keeps quantized weights in between starts.
pub const CACHE_KEY: &str = "quantization_cache";

/// `path` absolute with every `..` and symlink resolved; when it does not exist (yet: a cache
/// folder the host will create, or a missing `--model-path` for the plugin to report), the part
/// that exists resolved and the rest appended with `.` and `..` taken as written.
pub fn resolved(path: &Path) -> std::path::PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
        if let Ok(real) = std::fs::canonicalize(&out) {
            out = real;
        }
    }
    out
}

/// The context handed to the plugin's `initialize`.
pub fn host_context(plan: &Plan) -> HostContext {
    HostContext {
        host_version: env!("CARGO_PKG_VERSION").to_string(),
        threads: plan.limits.cpus.map(|c| c.ceil().max(1.0) as usize),
        scratch_dir: plan.isolation.as_ref().map(|_| "/tmp".into()),
        gpu_memory_limit_bytes: plan.limits.gpu_memory_bytes,
        memory_limit_bytes: plan.limits.memory_bytes,
    }
}

/// Everything needed to start `name`'s worker: paths made absolute (a confined worker sees them
/// from another root), the model folder kept readable, a quantization cache folder writable.
pub fn worker_spec(
    name: &str,
    library: &Path,
    config: &ModelConfig,
    plan: Plan,
    exe: std::path::PathBuf,
) -> WorkerSpec {
    WorkerSpec {
        name: name.to_string(),
        library: resolved(library),
        host_context: host_context(&plan),
        plan,
        exe,
        // The same path the plugin is given (`--model-path` included): mounted where it looks.
        read_paths: config.model_path.iter().map(|p| resolved(p)).collect(),
        write_paths: config
            .extra
            .get(CACHE_KEY)
            .and_then(|v| v.as_str())
            .map(std::path::PathBuf::from)
            .into_iter()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model path through `..` and a symlink reaches the worker as the real folder, the same
    /// path that is mounted for it.
    #[test]
    fn the_model_path_is_resolved_once_for_the_plugin_and_the_mount() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("store/qwen3-tiny");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(root.path().join("plugins.d")).unwrap();
        std::os::unix::fs::symlink(&real, root.path().join("models")).unwrap();
        let manifest_path = root.path().join("plugins.d/q.toml");
        let text = "name = \"q\"\nversion = \"0.1.0\"\nlibrary = \"libq.so\"\napi = \"^1.0\"\ntier = \"low\"\n[model]\npath = \"../plugins.d/../models\"\n";
        let manifest = Manifest::parse(&manifest_path, text).unwrap();
        let config = model_config(&manifest, &manifest_path);
        let real = std::fs::canonicalize(&real).unwrap();
        assert_eq!(config.model_path.as_deref(), Some(real.as_path()));
        // A relative manifest path still gives an absolute model path.
        let missing = resolved(Path::new("no/such/model"));
        assert!(
            missing.is_absolute() && missing.ends_with("no/such/model"),
            "{missing:?}"
        );
    }

    /// The quantization cache folder reaches the plugin absolute (relative to the manifest, as the
    /// model path) and is the one path the worker may write.
    #[test]
    fn the_quantization_cache_is_resolved_and_made_writable() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("plugins.d")).unwrap();
        let manifest_path = root.path().join("plugins.d/q.toml");
        let text = "name = \"q\"\nversion = \"0.1.0\"\nlibrary = \"libq.so\"\napi = \"^1.0\"\ntier = \"low\"\n[model]\nquantization = \"q4\"\nquantization_cache = \"../cache\"\n";
        let manifest = Manifest::parse(&manifest_path, text).unwrap();
        let config = model_config(&manifest, &manifest_path);
        let cache = std::path::absolute(root.path().join("cache")).unwrap();
        assert_eq!(config.extra[CACHE_KEY], cache.display().to_string());
        let plan = crate::sandbox::plan(
            crate::sandbox::Subject {
                plugin: "q",
                tier: crate::sandbox::Tier::Low,
                limits: Default::default(),
                pinned: false,
                gpu: None,
                uid: 65534,
            },
            &Default::default(),
            &crate::sandbox::HostSupport::detect(),
        )
        .unwrap();
        let spec = worker_spec("q", Path::new("libq.so"), &config, plan, "pio".into());
        assert_eq!(spec.write_paths, [cache]);
    }
}
