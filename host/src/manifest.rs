//! Plugin manifests: the TOML file beside a plugin library that tells the host what the library
//! is, which plugin-api it needs, how to confine it and which model to load. Parsed once into a
//! [`Manifest`]; every syntax or value error names the file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub use crate::tomlfile::line_column;
use crate::tomlfile::TomlError;
use crate::units::ByteSize;

/// How much the host trusts a plugin; decides how tightly its worker is confined.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// First-party code, speed first.
    Low,
    /// Trusted third party.
    Medium,
    /// Unreviewed plugins.
    High,
    /// Untrusted plugins.
    Maximum,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Low => "low",
            Tier::Medium => "medium",
            Tier::High => "high",
            Tier::Maximum => "maximum",
        })
    }
}

/// Resource limits for the plugin's worker; unset ones take the daemon's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (RAM, no swap) the worker may use.
    #[serde(default, deserialize_with = "enough_to_start")]
    pub memory: Option<ByteSize>,
    /// CPU cores' worth of time per period (e.g. 1.5).
    pub cpus: Option<PositiveF64>,
    /// Processes and threads the worker may have.
    #[serde(default, deserialize_with = "more_than_none")]
    pub pids: Option<u32>,
    /// GPU memory the plugin's allocator may take.
    #[serde(default, deserialize_with = "more_than_none")]
    pub gpu_memory: Option<ByteSize>,
    /// Size of the worker's private scratch directory (its disk allowance).
    pub scratch: Option<ByteSize>,
    /// Whether the worker may use the network at all (default: open at `low`, closed above;
    /// `true` is only possible at `low`).
    pub network: Option<bool>,
}

/// Weight and activation dtype (plugin-api's type: one definition from manifest to plugin).
pub use pio_plugin_api::wire::FloatType as Dtype;
/// Weight quantization applied while loading (plugin-api's type).
pub use pio_plugin_api::wire::WeightQuantization as Quantization;

/// The `[model]` table: what the plugin loads and its default configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face snapshot folder; relative paths are relative to the manifest's folder.
    pub path: Option<Spanned<PathBuf>>,
    /// Data type.
    pub dtype: Option<Dtype>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: Option<Device>,
    /// Weight quantization.
    pub quantization: Option<Quantization>,
    /// A folder the quantized weights are kept in between starts (created for the worker and
    /// writable to it); relative paths are relative to the manifest's folder.
    pub quantization_cache: Option<PathBuf>,
    /// Generation defaults (override the model's `generation_config.json`), each held to what a
    /// request may ask.
    #[serde(default, deserialize_with = "checked_generation")]
    pub generation: pio_plugin_api::wire::GenerationDefaults,
    /// Plugin-specific settings, passed to the plugin untouched.
    #[serde(default, deserialize_with = "plugin_options")]
    pub options: toml::Table,
}

/// The keys of the config a plugin gets beside its options (which are flattened in with them):
/// an option by one of these names would collide with the `[model]` key.
const MODEL_KEYS: [&str; 6] = [
    "model_path",
    "dtype",
    "device",
    "quantization",
    "generation",
    crate::launch::CACHE_KEY,
];

/// `[model.options]`, refused where a key is one of the `[model]` table's own: the plugin gets
/// both in one object, and a worker handed the same key twice could not start.
fn plugin_options<'de, D: Deserializer<'de>>(d: D) -> Result<toml::Table, D::Error> {
    let options = toml::Table::deserialize(d)?;
    match MODEL_KEYS.iter().find(|k| options.contains_key(**k)) {
        Some(key) => {
            let hint = match *key {
                "model_path" => "`path`".to_string(),
                "generation" => "the `[model.generation]` table".to_string(),
                other => format!("`{other}`"),
            };
            Err(serde::de::Error::custom(format!(
                "`{key}` is a key of the config every plugin gets, not a plugin option: set it in `[model]` as {hint}"
            )))
        }
        None => Ok(options),
    }
}

/// `[model.generation]`, refused where a default is outside what a request may ask (a
/// `max_tokens` of 0 would end every request at once, a negative temperature fail each one).
fn checked_generation<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<pio_plugin_api::wire::GenerationDefaults, D::Error> {
    let defaults = pio_plugin_api::wire::GenerationDefaults::deserialize(d)?;
    match crate::sampling::defaults_problem(&defaults) {
        Some(problem) => Err(serde::de::Error::custom(format!(
            "[model.generation]: {problem}"
        ))),
        None => Ok(defaults),
    }
}

/// A name that goes into URLs, cgroup and file names and log lines as it is: 1 to 64 letters,
/// digits, `_`, `-` and `.`, beginning with a letter or digit (no path, no `..`).
fn plain_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if crate::names::is_model_name(&s) {
        return Ok(s);
    }
    Err(serde::de::Error::custom(format!(
        "expected {} (the name is used in URLs, cgroups and logs), found {s:?}; e.g. \"qwen3-4b-instruct-2507\"",
        crate::names::MODEL_NAME_RULE
    )))
}

fn some_plain_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    plain_name(d).map(Some)
}

/// A limit that must be more than nothing: a worker given none of it could never start.
fn more_than_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Copy + Into<u64>,
{
    let value = T::deserialize(d)?;
    if value.into() == 0 {
        return Err(serde::de::Error::custom(
            "must be more than 0 (no worker could start with none); leave it out for the default",
        ));
    }
    Ok(Some(value))
}

/// The least memory a worker can start in: the `pio` process itself, its async runtime and the
/// plugin's library mapped in, before any model.
pub const MIN_WORKER_MEMORY: u64 = 16 << 20;

/// A memory limit no worker could start under is refused where it is written (it would otherwise
/// show as a worker killed at start, over and over).
fn enough_to_start<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    let value = ByteSize::deserialize(d)?;
    if value.0 < MIN_WORKER_MEMORY {
        return Err(serde::de::Error::custom(format!(
            "must be at least 16MiB (found {} bytes): a worker needs that much to start, before its model; leave it out for the default",
            value.0
        )));
    }
    Ok(Some(value))
}

/// A compute device name, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device(pub String);

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s == "cpu"
            || s == "cuda"
            || s.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u32>().is_ok());
        if ok {
            Ok(Device(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "device must be \"cpu\", \"cuda\" or \"cuda:N\", found \"{s}\""
            )))
        }
    }
}

/// A float that must be > 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositiveF64(pub f64);

impl<'de> Deserialize<'de> for PositiveF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v > 0.0 && v.is_finite() {
            Ok(Self(v))
        } else {
            Err(serde::de::Error::custom(format!(
                "expected a number > 0, found {v}"
            )))
        }
    }
}

/// A lowercase hex SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(pub String);

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(serde::de::Error::custom(
                "sha256 must be 64 hex digits (as printed by `sha256sum LIBRARY`)",
            ))
        }
    }
}

/// A parsed, value-checked manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name the model is served and run under; the library must report it, unless
    /// `plugin` names what it reports (one plugin serving several models).
    #[serde(deserialize_with = "plain_name")]
    pub name: String,
    /// The plugin's own name, as the library reports it, when `name` is another.
    #[serde(default, deserialize_with = "some_plain_name")]
    pub plugin: Option<String>,
    /// The plugin's version; must equal what the library reports.
    pub version: semver::Version,
    /// The library file (a file name or path; see [`crate::discovery`] for where it is looked up).
    pub library: Spanned<PathBuf>,
    /// Which plugin-api versions the plugin needs, e.g. `"^1.0"`.
    pub api: Spanned<semver::VersionReq>,
    /// SHA-256 of the library; when set, a library with another digest is refused.
    pub sha256: Option<Spanned<Sha256Hex>>,
    /// Trust tier.
    #[serde(default = "default_tier")]
    pub tier: Tier,
    /// One line for `pio list`.
    #[serde(default)]
    pub description: String,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The model to load and its defaults.
    #[serde(default)]
    pub model: ModelSection,
}

fn default_tier() -> Tier {
    Tier::Medium
}

/// A manifest that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{path}: cannot read manifest: {source}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a bad value, with its position.
    #[error("{0}")]
    Parse(#[from] TomlError),
}

/// The most bytes a manifest may hold (they are a few hundred).
const MOST_BYTES: u64 = 1 << 20;

/// The text of the manifest at `path`: a regular file (a FIFO or device named `*.toml` would
/// block the scan, or never end) of at most a MiB, UTF-8.
pub fn read(path: &Path) -> Result<String, ManifestError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    if !meta.is_file() {
        return Err(failed(std::io::Error::other(
            "not a regular file (a manifest is a TOML file)",
        )));
    }
    if meta.len() > MOST_BYTES {
        return Err(failed(std::io::Error::other(format!(
            "{} bytes: a manifest is a small TOML file (at most {MOST_BYTES} bytes)",
            meta.len()
        ))));
    }
    let mut text = String::new();
    file.take(MOST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    Ok(text)
}

impl Manifest {
    /// Parses manifest `text`; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ManifestError> {
        Ok(crate::tomlfile::parse(path, text)?)
    }
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
