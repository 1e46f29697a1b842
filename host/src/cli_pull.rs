//! `pio pull REPO[@REVISION]`: a Hugging Face snapshot downloaded (resumable, checked), and a
//! manifest written for the shipped plugin whose family serves its architecture.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use pio_host::discovery::{self, Candidate, SearchPaths};
use pio_host::hub::stage::Stage;
use pio_host::hub::{self, record, Hub, RemoteFile};
use pio_host::manifest::{Manifest, Tier};
use pio_host::probe::{LibraryReport, ProbeError, Prober};
use pio_plugin_api::wire::WeightQuantization;

use crate::cli_run::parse_tier;
use crate::{prober, SearchArgs};

/// Arguments of `pio pull`.
#[derive(Args)]
pub struct PullArgs {
    /// The repository, `owner/name`, with an optional `@revision` (branch, tag or commit;
    /// default `main`).
    repo: String,
    #[command(flatten)]
    search: SearchArgs,
    /// Where snapshots go (each in `OWNER/NAME`).
    #[arg(long, value_name = "DIR", default_value = "models")]
    models: PathBuf,
    /// The name to serve the model under (default: the plugin's name). A plugin serves any
    /// number of models, each under a name of its own.
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// The manifest's tier (default: the plugin's own manifest's).
    #[arg(long, value_parser = parse_tier)]
    tier: Option<Tier>,
    /// Quantize the weights at load (`q8` or `q4`).
    #[arg(long, value_parser = WeightQuantization::parse)]
    quantization: Option<WeightQuantization>,
    /// Replace a manifest that already serves this plugin from another snapshot.
    #[arg(long)]
    force: bool,
}

/// The files a plugin reads: configuration, tokenizer, chat template, safetensors weights.
fn wanted(name: &str) -> bool {
    let top = !name.contains('/');
    let kind = [".json", ".jinja", ".safetensors", ".txt"]
        .iter()
        .any(|e| name.ends_with(e));
    top && kind
}

/// The largest `config.json` a pull fetches.
const CONFIG_MOST: u64 = 16 << 20;

/// A served model's name: what clients put in `model`.
fn parse_name(s: &str) -> Result<String, String> {
    use pio_host::names::{is_model_name, MODEL_NAME_RULE};
    is_model_name(s)
        .then(|| s.to_string())
        .ok_or_else(|| format!("\"{s}\" is not a model name: {MODEL_NAME_RULE}"))
}

/// `owner/name[@revision]`, checked.
fn repo_and_revision(arg: &str) -> anyhow::Result<(String, String)> {
    let (repo, revision) = arg.split_once('@').unwrap_or((arg, "main"));
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok(owner) && ok(name) && !revision.is_empty() => {
            Ok((repo.to_string(), revision.to_string()))
        }
        _ => bail!("`{arg}` is not a repository: give OWNER/NAME[@REVISION], e.g. Qwen/Qwen3-4B-Instruct-2507"),
    }
}

/// Runs `pio pull`; returns the process exit code.
pub fn run(args: PullArgs) -> anyhow::Result<u8> {
    let (repo, revision) = repo_and_revision(&args.repo)?;
    let crate::Settings { config, search } = crate::settings(&args.search)?;
    let hub = Hub::from_env()?;
    let snapshot = hub.snapshot(&repo, &revision)?;
    let files: Vec<&RemoteFile> = snapshot.files.iter().filter(|f| wanted(&f.name)).collect();
    match files.iter().find(|f| f.name == "config.json") {
        None => bail!("{repo}@{revision} has no config.json: not a transformers checkpoint a plugin can serve"),
        // Read whole to pick the plugin before anything else is fetched: a model's is kilobytes.
        Some(f) if f.size.is_some_and(|s| s > CONFIG_MOST) => bail!(
            "{repo}@{revision}'s config.json is {} bytes: not a model's configuration (those are kilobytes); check the repository",
            f.size.unwrap_or_default()
        ),
        Some(_) => {}
    }
    let dest = std::path::absolute(args.models.join(&repo))
        .with_context(|| format!("cannot use {}", args.models.display()))?;
    eprintln!("{repo}@{} → {}", &snapshot.commit, dest.display());
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    // Fetched beside the folder's files and moved in at the end: the folder may be served, and
    // a pull refused or cut short midway must leave it as it was.
    let stage = Stage::open(&dest, &snapshot.commit)?;
    let previous = record::read(&dest);
    let changes = record::changes(previous.as_ref(), &snapshot, &names);
    if !changes.refetch.is_empty() || !changes.remove.is_empty() {
        eprintln!(
            "{} held another commit: fetching again {}; removing once pulled {}",
            dest.display(),
            list(&changes.refetch),
            list(&changes.remove)
        );
    }
    // The config first: which plugin serves it, and whether its manifest may be written, are
    // known before gigabytes of weights are fetched.
    let (config_file, rest): (Vec<&RemoteFile>, Vec<&RemoteFile>) =
        files.iter().partition(|f| f.name == "config.json");
    let fetch = Fetch {
        hub: &hub,
        repo: &repo,
        commit: &snapshot.commit,
        stage: &stage,
        dest: &dest,
        refetch: &changes.refetch,
    };
    fetch.all(&config_file)?;
    let pulled = Pulled::read(
        &stage.current("config.json"),
        dest.clone(),
        repo.clone(),
        snapshot.commit.clone(),
    )?;
    let dir = search
        .plugin_dirs
        .first()
        .context("no plugin directory: pass --plugins DIR")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let prober = prober(&config)?;
    let candidates = discovery::discover(&search, &prober)?;
    let chosen = serving(&candidates, &search, &prober, &pulled.architecture)?;
    let name = manifest_name(&args, &chosen)?;
    let path = manifest_path(&chosen, name, dir, &pulled.dest, args.force)?;
    let text = manifest_text(&args, &chosen, &pulled)?;
    check_config(&prober, &chosen, &path, &text)?;
    fetch.all(&rest)?;
    stage.finish(&snapshot, &names, previous.as_ref(), &changes.remove)?;
    write_manifest(&path, &text)?;
    eprintln!(
        "wrote {} (plugin {}); `pio serve --plugins {}` serves it",
        path.display(),
        chosen.report.name,
        dir.display()
    );
    Ok(0)
}

/// `names`, listed for a message; "nothing" when none.
fn list(names: &[String]) -> String {
    match names.is_empty() {
        true => "nothing".into(),
        false => names.join(", "),
    }
}

/// Where a pull fetches from and to.
struct Fetch<'a> {
    hub: &'a Hub,
    repo: &'a str,
    commit: &'a str,
    stage: &'a Stage,
    /// The model's folder: a file there that checks out is not fetched again.
    dest: &'a Path,
    /// Files that may be in the folder, of the same size, yet another commit's.
    refetch: &'a [String],
}

impl Fetch<'_> {
    /// Downloads `files` into the stage, a progress bar each, but those the folder holds already.
    fn all(&self, files: &[&RemoteFile]) -> anyhow::Result<()> {
        let bars = MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{msg:40!} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        for file in files {
            let kept = self.dest.join(&file.name);
            if !self.refetch.contains(&file.name) && hub::holds(file, &kept)? {
                continue;
            }
            let bar = bars.add(ProgressBar::new(file.size.unwrap_or(0)));
            bar.set_style(style.clone());
            bar.set_message(file.name.clone());
            let result = self.hub.download(
                self.repo,
                self.commit,
                file,
                &self.stage.staged(&file.name),
                &mut |done, total| {
                    if let Some(t) = total {
                        bar.set_length(t);
                    }
                    bar.set_position(done);
                },
            );
            bar.finish();
            result?;
        }
        Ok(())
    }
}

/// A downloaded snapshot and what its `config.json` says.
struct Pulled {
    dest: PathBuf,
    repo: String,
    commit: String,
    /// The model class (`architectures[0]`), which picks the plugin.
    architecture: String,
    /// The dtype it was saved in (`torch_dtype` or `dtype`), as a manifest names it; bf16 when
    /// it names none the engine runs.
    dtype: &'static str,
}

impl Pulled {
    /// What `path` (the snapshot's `config.json`, where it is now) says of the model bound for
    /// `dest`, pulled from `repo` at `commit`.
    fn read(path: &Path, dest: PathBuf, repo: String, commit: String) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let architecture = config["architectures"][0]
            .as_str()
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: no `architectures` entry names the model class",
                    path.display()
                )
            })?;
        let saved = config.get("torch_dtype").or_else(|| config.get("dtype"));
        let dtype = match saved.and_then(|v| v.as_str()) {
            Some("float32") => "f32",
            Some("float16") => "f16",
            _ => "bf16",
        };
        Ok(Self {
            dest,
            repo,
            commit,
            architecture,
            dtype,
        })
    }
}

/// The plugin that will serve a snapshot: its library and report, and its manifest if one
/// was found in the plugin directories.
struct Chosen {
    library: PathBuf,
    report: LibraryReport,
    manifest: Option<(PathBuf, Manifest)>,
}

/// The plugin whose family is `architecture`: a ready manifest's, else a plugin library in the
/// library directories or beside `pio` (so the first pull needs no manifest at all).
fn serving(
    candidates: &[Candidate],
    search: &SearchPaths,
    prober: &Prober,
    architecture: &str,
) -> anyhow::Result<Chosen> {
    let ready = candidates
        .iter()
        // The pull brings the model: a manifest waiting for one counts.
        .filter(|c| c.ready_given_a_model())
        .filter_map(|c| {
            Some((
                c,
                c.report.as_ref()?,
                c.library.as_ref()?,
                c.manifest.as_ref()?,
            ))
        });
    let mut served = Vec::new();
    for (c, report, library, manifest) in ready {
        if report.family == architecture {
            return Ok(Chosen {
                library: library.clone(),
                report: report.clone(),
                manifest: Some((c.manifest_path.clone(), manifest.clone())),
            });
        }
        served.push(format!("{} ({})", report.family, report.name));
    }
    let dirs = search.library_dirs.iter().chain(search.exe_dir.iter());
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut libraries: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "so"))
            .collect();
        libraries.sort();
        for library in libraries {
            let Ok(report) = prober.probe(&library) else {
                continue;
            };
            if report.family == architecture {
                return Ok(Chosen {
                    library,
                    report,
                    manifest: None,
                });
            }
            served.push(format!("{} ({})", report.family, report.name));
        }
    }
    served.sort();
    served.dedup();
    bail!(
        "no plugin serves {architecture}; the plugins found serve: {}",
        if served.is_empty() {
            "nothing (are --plugins and --library-dir right?)".to_string()
        } else {
            served.join(", ")
        }
    )
}

/// Where the manifest goes: the plugin's own when it is in `dir` (one manifest per plugin in
/// a directory: discovery matches them to libraries by name), else `dir/NAME.toml`. Replacing
/// a manifest that serves another model takes `--force`.
fn manifest_path(
    chosen: &Chosen,
    name: &str,
    dir: &Path,
    dest: &Path,
    force: bool,
) -> anyhow::Result<PathBuf> {
    let in_dir = |p: &Path| -> anyhow::Result<bool> {
        Ok(p.parent().map(std::path::absolute).transpose()? == Some(std::path::absolute(dir)?))
    };
    let (path, elsewhere) = match &chosen.manifest {
        Some((path, manifest)) if manifest.name == name && in_dir(path)? => {
            let model = manifest.model.path.as_ref().map(|p| {
                path.parent()
                    .map_or(p.get_ref().clone(), |d| d.join(p.get_ref()))
            });
            let same = model.and_then(|m| std::path::absolute(m).ok()).as_deref() == Some(dest);
            (path.clone(), !same)
        }
        _ => {
            let path = dir.join(format!("{name}.toml"));
            let exists = path.exists();
            (path, exists)
        }
    };
    if elsewhere && !force {
        bail!(
            "{} already serves {name} from another model; pass --force to point it at {} (the old manifest is kept as .toml.bak), --name to serve it under another name, or --plugins another directory",
            path.display(),
            dest.display()
        );
    }
    Ok(path)
}

/// The plugin's word on the manifest about to be written (`supports_config`: a quantization or
/// an option it does not have), asked before the weights are fetched rather than at the first
/// load after them.
fn check_config(prober: &Prober, chosen: &Chosen, path: &Path, text: &str) -> anyhow::Result<()> {
    let manifest = Manifest::parse(path, text)
        .with_context(|| format!("the manifest for {} does not parse", path.display()))?;
    let config = pio_host::launch::model_config(&manifest, path);
    match prober.probe_for(&chosen.library, &manifest.name, &config) {
        Ok(_) => Ok(()),
        Err(ProbeError::ConfigRefused { message, .. }) => bail!(
            "plugin {} refuses this model's settings: {message}; only config.json was downloaded, and the model's folder is as it was",
            chosen.report.name
        ),
        // The library answered a plain probe a moment ago: failing on this config (crashing,
        // hanging in `supports_config`) is what the weights would meet too.
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "plugin {} failed when asked about this model's settings; only config.json was downloaded, and the model's folder is as it was",
            chosen.report.name
        ))),
    }
}

/// The manifest for `chosen` over the `pulled` snapshot.
fn manifest_text(args: &PullArgs, chosen: &Chosen, pulled: &Pulled) -> anyhow::Result<String> {
    let Pulled {
        dest, repo, commit, ..
    } = pulled;
    let report = &chosen.report;
    let name = manifest_name(args, chosen)?;
    let api = semver::Version::parse(&report.api_version).map_or_else(
        |_| report.api_version.clone(),
        |v| format!("^{}.{}", v.major, v.minor),
    );
    let own = chosen.manifest.as_ref();
    let tier = args.tier.or(own.map(|(_, m)| m.tier)).unwrap_or(Tier::Low);
    let mut model = toml::Table::new();
    model.insert("path".into(), dest.display().to_string().into());
    model.insert("dtype".into(), pulled.dtype.into());
    if let Some(q) = args.quantization {
        model.insert("quantization".into(), q.name().into());
    }
    let mut table = toml::Table::new();
    table.insert("name".into(), name.into());
    if name != report.name {
        table.insert("plugin".into(), report.name.clone().into());
    }
    table.insert("version".into(), report.version.clone().into());
    table.insert(
        "description".into(),
        format!("{repo} at {commit}, pulled by pio pull").into(),
    );
    table.insert(
        "library".into(),
        chosen.library.display().to_string().into(),
    );
    table.insert("api".into(), api.into());
    table.insert("tier".into(), toml::Value::try_from(tier)?);
    // The plugin's own limits, as its manifest writes them.
    let limits = own
        .and_then(|(p, _)| std::fs::read_to_string(p).ok())
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|mut t| t.remove("limits"));
    if let Some(limits) = limits {
        table.insert("limits".into(), limits);
    }
    table.insert("model".into(), model.into());
    Ok(format!(
        "# Written by `pio pull {repo}` ({commit}).\n{}",
        toml::to_string(&table)?
    ))
}

/// Writes the manifest `text` at `path`.
fn write_manifest(path: &Path, text: &str) -> anyhow::Result<()> {
    // The one replaced is kept, unless it says the same (a second pull of the same snapshot).
    let old = std::fs::read_to_string(path).ok();
    if old.as_ref().is_some_and(|old| *old != text) {
        std::fs::copy(path, path.with_extension("toml.bak"))
            .with_context(|| format!("cannot back up {}", path.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The name the manifest serves the model under: `--name`, else the plugin's own (held to the
/// rule a manifest's `name` is, since it also becomes a file name).
fn manifest_name<'a>(args: &'a PullArgs, chosen: &'a Chosen) -> anyhow::Result<&'a str> {
    let report = &chosen.report;
    if let Err(e) = parse_name(&report.name) {
        bail!("the plugin reports a name no manifest can hold ({e}): use a build of the plugin that reports a plain name");
    }
    Ok(args.name.as_deref().unwrap_or(&report.name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn repositories_and_revisions_are_checked() {
        assert_eq!(
            repo_and_revision("Qwen/Qwen3-4B").unwrap(),
            ("Qwen/Qwen3-4B".into(), "main".into())
        );
        assert_eq!(
            repo_and_revision("a/b@v1.0").unwrap(),
            ("a/b".into(), "v1.0".into())
        );
        for bad in ["nope", "a/b/c", "../x", "a/", "a/b@", "a b/c"] {
            assert!(repo_and_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_what_a_plugin_reads_is_fetched() {
        for name in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "chat_template.jinja",
            "merges.txt",
        ] {
            assert!(wanted(name), "{name}");
        }
        for name in [
            "pytorch_model.bin",
            "original/consolidated.pth",
            "onnx/model.onnx",
            "README.md",
            "x.gguf",
        ] {
            assert!(!wanted(name), "{name}");
        }
    }
}
