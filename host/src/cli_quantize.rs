//! `pio quantize NAME`: loads a plugin's model once, confined as the daemon would run it, so that
//! its quantized weights land in the manifest's `quantization_cache` and every later start reads
//! them instead of quantizing again (minutes for a 30B model).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use pio_host::launch::CACHE_KEY;

use crate::cli_run::{prepare, start_loaded, Prepared, TierArgs};
use crate::SearchArgs;

/// Arguments of `pio quantize`.
#[derive(Args)]
pub struct QuantizeArgs {
    /// The plugin whose model to quantize, by name.
    name: String,
    #[command(flatten)]
    search: SearchArgs,
    /// Use this model folder instead of the manifest's `[model] path`.
    #[arg(long, value_name = "DIR")]
    model_path: Option<PathBuf>,
    #[command(flatten)]
    tiers: TierArgs,
}

/// Runs `pio quantize`.
pub fn run(args: QuantizeArgs) -> anyhow::Result<u8> {
    let Prepared { config, spec, .. } = prepare(
        &args.name,
        &args.search,
        &args.tiers,
        args.model_path.as_ref(),
    )?;
    let name = &args.name;
    if config.quantization.as_deref().is_none_or(|q| q == "none") {
        bail!(
            "{name} loads unquantized: set [model] quantization = \"q8\" or \"q4\" in its manifest"
        );
    }
    let Some(dir) = config.extra.get(CACHE_KEY).and_then(|v| v.as_str()) else {
        bail!("{name} keeps no quantized weights: set [model] quantization_cache to a folder in its manifest");
    };
    let dir = PathBuf::from(dir);
    // A folder that exists is used as the operator made it (the worker creates a missing one,
    // owned by its user); one the worker cannot write would only be warned about after minutes
    // of quantizing.
    if let Some((uid, gid)) = spec.plan.drop_to.filter(|_| dir.is_dir()) {
        use pio_host::sandbox::readable::{writable_folder, Reach};
        // At `maximum` the folder is mounted into an empty root: the folders above do not count.
        if !writable_folder(&dir, uid, gid, Reach::of(&spec.plan)) {
            bail!(
                "{name}: the worker runs as uid {uid} (its plugin's own, from sandbox.worker_uids; or sandbox.worker_uid), gid {gid} (sandbox.worker_gid) and cannot write the quantization_cache folder {}: give it that user (chown {uid}:{gid} {}) or remove it so that the worker creates it",
                dir.display(),
                dir.display()
            );
        }
    }
    // This model's among the folder's (it may be shared): named by the engine as
    // `{checkpoint}-{quantization}-{hash of its path}.pio-cache.gguf`.
    let prefixes = cache_prefixes(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut signals = crate::cli_run::StopSignals::new()?;
        let (worker, _) = start_loaded(spec, config, &mut signals).await?;
        worker.shutdown().await;
        anyhow::Ok(())
    })?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                n.ends_with(".pio-cache.gguf") && prefixes.iter().any(|p| n.starts_with(p))
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{name} loaded but wrote nothing to {}: its plugin may keep no quantization cache (the worker's output above says why)",
            dir.display()
        );
    }
    for file in files {
        outln!("{}", file.display())?;
    }
    Ok(0)
}

/// How the names of `config`'s cache files may begin: its checkpoint's name (the folder's, or a
/// GGUF file's stem: the model path's, or those of the GGUF files in its folder, one of which
/// the engine reads), then its quantization.
fn cache_prefixes(config: &pio_plugin_api::wire::ModelConfig) -> Vec<String> {
    let path = (config.model_path.as_deref())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    let gguf =
        |p: &std::path::Path| (p.extension()).is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
    let stem = |p: &std::path::Path| p.file_stem().map(|n| n.to_string_lossy().into_owned());
    let names: Vec<String> = match &path {
        Some(p) if gguf(p) => stem(p).into_iter().collect(),
        Some(p) => {
            let inside = std::fs::read_dir(p).into_iter().flatten().flatten();
            let stems = inside
                .map(|e| e.path())
                .filter(|f| gguf(f))
                .filter_map(|f| stem(&f));
            (p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .into_iter()
                .chain(stems)
                .collect()
        }
        None => vec!["model".into()],
    };
    let q = config.quantization.as_deref().unwrap_or_default();
    names.into_iter().map(|n| format!("{n}-{q}-")).collect()
}
