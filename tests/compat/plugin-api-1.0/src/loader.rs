//! The host's side of loading: open a library, read which plugin-api it was built against, check
//! that version and then abi_stable's layout, and only then hand out the root module.
//!
//! Loading runs the library's constructors, so only a (confined) worker process may call this;
//! the daemon and the CLI never load plugin code into themselves.

use std::fmt;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_raw_library, LibraryError, RawLibrary};

use crate::abi::{PluginBox, PluginInfo, PluginModRef};
use crate::error::PluginError;

/// A plugin-api version: the one a library was built against, or the host's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Additions.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl ApiVersion {
    /// Whether a host at `self` can load a plugin built against `plugin`: same major, and the
    /// plugin's minor no newer than the host's (it may use additions the host lacks).
    pub fn can_load(self, plugin: ApiVersion) -> bool {
        self.major == plugin.major && plugin.minor <= self.minor
    }
}

/// Why a library could not be loaded as a plugin. Every message names the file and what to do.
#[derive(Debug)]
pub enum LoadError {
    /// The dynamic loader refused the file (missing, truncated, wrong architecture, ...).
    Open {
        /// The library.
        path: PathBuf,
        /// The loader's reason.
        reason: String,
    },
    /// A shared library, but not a PIO plugin (no abi_stable root module).
    NotAPlugin {
        /// The library.
        path: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// Built against a plugin-api this host cannot load.
    IncompatibleApi {
        /// The library.
        path: PathBuf,
        /// The version it was built against.
        plugin: ApiVersion,
        /// The host's version.
        host: ApiVersion,
    },
    /// The root module's layout differs from the host's: built from a modified or foreign plugin-api.
    Layout {
        /// The library.
        path: PathBuf,
        /// One line saying what differs.
        summary: String,
        /// abi_stable's full report, for the log.
        report: String,
    },
    /// Another abi_stable failure (header, version strings, root module constructor).
    Other {
        /// The library.
        path: PathBuf,
        /// abi_stable's message.
        reason: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, reason } => write!(
                f,
                "{}: cannot be loaded as a shared library ({reason}); rebuild or re-copy the plugin",
                path.display()
            ),
            Self::NotAPlugin { path, reason } => write!(
                f,
                "{}: not a PIO plugin ({reason}); a plugin library must be built with \
                 pio_plugin_api::export_plugin!",
                path.display()
            ),
            Self::IncompatibleApi { path, plugin, host } => {
                let advice = if plugin.major != host.major {
                    format!("rebuild the plugin against plugin-api {}.x", host.major)
                } else {
                    format!(
                        "upgrade PIO to a version with plugin-api >= {}.{}, or rebuild the plugin \
                         against plugin-api {}.{}",
                        plugin.major, plugin.minor, host.major, host.minor
                    )
                };
                write!(
                    f,
                    "{}: built against plugin-api {plugin}, but this host has plugin-api {host}; {advice}",
                    path.display()
                )
            }
            Self::Layout { path, summary, .. } => write!(
                f,
                "{}: ABI layout mismatch ({summary}); the plugin was built from a modified or \
                 foreign plugin-api: rebuild it against the released pio-plugin-api",
                path.display()
            ),
            Self::Other { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for LoadError {}

/// The plugin-api version this crate is (and so the version of a host built with it).
pub fn host_api_version() -> ApiVersion {
    crate::API_VERSION
}

/// A plugin library, loaded and checked. The library stays mapped for the life of the process:
/// unloading Rust libraries with thread-locals crashes, and workers restart instead.
pub struct PluginLibrary {
    path: PathBuf,
    built_with: ApiVersion,
    module: PluginModRef,
}

impl fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("built_with", &self.built_with)
            .finish_non_exhaustive()
    }
}

impl PluginLibrary {
    /// Loads `path` and runs every check, in order: loadable, a PIO plugin, plugin-api version,
    /// layout.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let raw = RawLibrary::load_at(path).map_err(|e| LoadError::Open {
            path: path.to_owned(),
            reason: one_line(&e.to_string()),
        })?;
        // Never unloaded: see the type's docs.
        let raw: &'static RawLibrary = Box::leak(Box::new(raw));
        // SAFETY: the header symbol, when present, was generated by `export_plugin!` through
        // abi_stable, which also checks the header's own abi_stable version before upgrading it.
        let header = unsafe { lib_header_from_raw_library(raw) }.map_err(|e| match e {
            LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
                path: path.to_owned(),
                reason: "it exports no abi_stable root module".into(),
            },
            other => LoadError::Other {
                path: path.to_owned(),
                reason: one_line(&other.to_string()),
            },
        })?;

        let built_with = header
            .version_strings()
            .parsed()
            .map_err(|e| LoadError::Other {
                path: path.to_owned(),
                reason: format!("unreadable plugin-api version in the library header: {e}"),
            })?;
        let built_with = ApiVersion {
            major: built_with.major,
            minor: built_with.minor,
            patch: built_with.patch,
        };
        let host = host_api_version();
        if !host.can_load(built_with) {
            return Err(LoadError::IncompatibleApi {
                path: path.to_owned(),
                plugin: built_with,
                host,
            });
        }

        let module = header
            .init_root_module::<PluginModRef>()
            .map_err(|e| match e {
                LibraryError::AbiInstability(report) => {
                    let report = report.to_string();
                    LoadError::Layout {
                        path: path.to_owned(),
                        summary: summarize_layout_report(&report),
                        report,
                    }
                }
                other => LoadError::Other {
                    path: path.to_owned(),
                    reason: one_line(&other.to_string()),
                },
            })?;
        Ok(Self {
            path: path.to_owned(),
            built_with,
            module,
        })
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The plugin-api version the library was built against.
    pub fn built_with(&self) -> ApiVersion {
        self.built_with
    }

    /// The plugin's static facts.
    pub fn info(&self) -> PluginInfo {
        (self.module.info())()
    }

    /// Constructs the plugin object.
    pub fn instantiate(&self) -> Result<PluginBox, PluginError> {
        (self.module.new())().into_result()
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// abi_stable's layout reports run to dozens of lines; the operator needs the first concrete
/// difference, which it prints after the last `Error:` heading, followed by `Expected:` and
/// `Found:` blocks.
fn summarize_layout_report(report: &str) -> String {
    let tail = report.rsplit("Error:").next().unwrap_or(report);
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let after = |heading: &str| {
        lines
            .iter()
            .position(|l| *l == heading)
            .and_then(|i| lines.get(i + 1))
            .copied()
    };
    let mut summary = lines
        .first()
        .copied()
        .unwrap_or("layouts differ")
        .to_string();
    if let (Some(expected), Some(found)) = (after("Expected:"), after("Found:")) {
        summary = format!("{summary}: expected {expected}, found {found}");
    }
    let mut summary = one_line(&summary);
    if summary.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| summary.is_char_boundary(i))
            .unwrap_or(0);
        summary.truncate(cut);
        summary.push('…');
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> ApiVersion {
        ApiVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn same_major_older_or_equal_minor_loads() {
        assert!(v(1, 3, 0).can_load(v(1, 0, 7)));
        assert!(v(1, 3, 0).can_load(v(1, 3, 2)));
    }

    #[test]
    fn newer_minor_or_other_major_is_refused() {
        assert!(!v(1, 3, 0).can_load(v(1, 4, 0)));
        assert!(!v(1, 3, 0).can_load(v(2, 0, 0)));
        assert!(!v(2, 0, 0).can_load(v(1, 9, 0)));
    }

    #[test]
    fn layout_summary_is_one_line_from_the_last_error_block() {
        let report = "Error:\n  outer\nError:mismatched type\nExpected:\n    PluginMod\nFound:\n    ForeignMod\n";
        assert_eq!(
            summarize_layout_report(report),
            "mismatched type: expected PluginMod, found ForeignMod"
        );
    }
}
