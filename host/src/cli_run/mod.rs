//! `pio run`: one request to one plugin through the same worker path the daemon uses,
//! streaming the output as it is generated.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use pio_host::discovery::{self, Status};
use pio_host::launch;
use pio_host::sandbox::{HostSupport, Policy, Tier};
use pio_host::serve::openai::Parsed;
use pio_host::supervisor::{Worker, WorkerSpec};
use pio_plugin_api::wire::ModelInfo;

mod request;
mod stream;

use request::{constrained, finite};

pub(crate) use stream::{Halted, OutputClosed, StopSignals};

use crate::cli_print::{LoadProgress, Shown, TokenPrinter};
use crate::{prober, SearchArgs};
use pio_host::protocol::TokenFrame;
use pio_plugin_api::{
    Capabilities, Flow, GeneratedToken, PluginLibrary, ProgressSink, ProgressSink_TO, RStr,
    TD_Opaque, TokenSink, TokenSink_TO,
};

/// Arguments of `pio run`.
#[derive(Args)]
pub struct RunArgs {
    /// The plugin to run, by name.
    name: String,
    #[command(flatten)]
    search: SearchArgs,
    /// Use this model folder instead of the manifest's `[model] path`.
    #[arg(long, value_name = "DIR")]
    model_path: Option<PathBuf>,
    /// Raw text to continue (no chat template).
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// OpenAI-style chat messages: a JSON array, or a file holding one. Image parts
    /// (`image_url`) may name local files; they are sent inline.
    #[arg(long, value_name = "FILE_OR_JSON")]
    messages: Option<String>,
    /// An image for a vision model (PNG, JPEG, WebP or GIF; repeatable): with `--prompt`, the
    /// images and then the prompt become one user message, rendered with the chat template.
    #[arg(long = "image", value_name = "FILE", requires = "prompt")]
    images: Vec<PathBuf>,
    /// Tools the model may call (OpenAI's `tools`): a JSON array, or a file holding one.
    #[arg(long, value_name = "FILE_OR_JSON", requires = "messages")]
    tools: Option<String>,
    /// Variables for the chat template, e.g. '{"enable_thinking": false}' (a JSON object).
    #[arg(long, value_name = "JSON", requires = "messages")]
    chat_template_kwargs: Option<String>,
    /// Constrain the output to JSON valid against the JSON Schema in FILE (the API's
    /// `response_format` of type `json_schema`).
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to the Lark grammar in FILE (llguidance's dialect; the API's
    /// `guided_grammar`).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
    /// The most tokens to generate.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy.
    // Negative numbers are values here, so the range check (not the parser) answers them.
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
    temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<u32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Penalty on tokens already seen (1: none; default: the model's generation config).
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = finite)]
    repetition_penalty: Option<f32>,
    /// Stop before this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Report each token's logprob and this many alternatives (in the `--json` lines).
    #[arg(long, value_name = "K", requires = "json")]
    logprobs: Option<u32>,
    /// Print one JSON object per token, then a summary line.
    #[arg(long)]
    json: bool,
    /// Print the model's special tokens (`<|im_end|>`, ...) in the text; by default they are
    /// left out, but for the markers of reasoning and tool calls. `--json` always shows them.
    #[arg(long, conflicts_with = "json")]
    special: bool,
    #[command(flatten)]
    tiers: TierArgs,
    /// Load the plugin into this process, unconfined: for debugging a plugin only.
    #[arg(long)]
    in_process: bool,
    /// Stop the request after this many seconds, 0 for no limit (default: the config's
    /// `supervisor.request_timeout_secs`, 600; `maximum` always has one).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
}

impl RunArgs {
    /// How the output is shown.
    fn shown(&self) -> Shown {
        Shown {
            json: self.json,
            special: self.special,
        }
    }
}

/// The sandbox flags shared by `pio run` and `pio list --start`.
#[derive(Args)]
pub struct TierArgs {
    /// Run every plugin at least at this tier, whatever its manifest says.
    #[arg(long, value_name = "TIER", value_parser = parse_tier)]
    min_tier: Option<Tier>,
    /// Run less confined than asked (with a warning) if this host lacks a mechanism.
    #[arg(long)]
    allow_downgrade: bool,
}

impl TierArgs {
    /// `base` (the configuration's policy) with these flags applied over it.
    pub fn policy(&self, base: Policy) -> Policy {
        Policy {
            min_tier: self.min_tier.unwrap_or(base.min_tier),
            allow_downgrade: self.allow_downgrade || base.allow_downgrade,
            ..base
        }
    }
}

pub(crate) fn parse_tier(s: &str) -> Result<Tier, String> {
    match s {
        "low" => Ok(Tier::Low),
        "medium" => Ok(Tier::Medium),
        "high" => Ok(Tier::High),
        "maximum" => Ok(Tier::Maximum),
        _ => Err(format!(
            "unknown tier \"{s}\"; expected low, medium, high or maximum"
        )),
    }
}

/// A plugin found, checked and planned: what starting its worker takes.
pub(crate) struct Prepared {
    /// The daemon settings in force.
    pub settings: pio_host::config::Config,
    /// What the plugin can do.
    pub capabilities: Capabilities,
    /// The plugin's library.
    pub library: PathBuf,
    /// Its model configuration (with `--model-path` applied).
    pub config: pio_plugin_api::wire::ModelConfig,
    /// Its worker, confined by the plan.
    pub spec: WorkerSpec,
}

/// Finds the ready plugin `name` in the search path and plans its worker.
pub(crate) fn prepare(
    name: &str,
    search_args: &SearchArgs,
    tiers: &TierArgs,
    model_path: Option<&PathBuf>,
) -> anyhow::Result<Prepared> {
    let crate::Settings {
        config: settings,
        search,
    } = crate::settings(search_args)?;
    let candidates = discovery::discover(&search, &prober(&settings)?)?;
    let named: Vec<_> = candidates
        .iter()
        .filter(|c| c.manifest.as_ref().is_some_and(|m| m.name == name))
        .collect();
    // With a model of its own, a plugin whose manifest's model is missing runs too.
    let usable = |c: &discovery::Candidate| match model_path {
        Some(_) => c.ready_given_a_model() && c.report.is_some(),
        None => matches!(c.status, Status::Ready),
    };
    let Some(chosen) = named.iter().find(|c| usable(c)) else {
        return Err(not_found(name, &named, &candidates, &search));
    };
    let (Some(manifest), Some(library), Some(report)) =
        (&chosen.manifest, &chosen.library, &chosen.report)
    else {
        bail!("plugin {name} has no checked manifest");
    };
    let policy = tiers.policy(settings.policy());
    let plan = launch::plan(manifest, &settings, &policy, &HostSupport::detect())?;
    if let Some(reason) = &plan.downgrade_reason {
        eprintln!(
            "warning: running {} at tier {} instead of {}: {reason}",
            manifest.name, plan.applied, plan.requested
        );
    }
    let mut config = launch::model_config(manifest, &chosen.manifest_path);
    if let Some(path) = model_path {
        config.model_path = Some(launch::resolved(path));
    }
    let exe = std::env::current_exe().context("cannot find the running `pio` executable")?;
    let spec = launch::worker_spec(&manifest.name, library, &config, plan, exe);
    Ok(Prepared {
        settings,
        capabilities: report.capabilities,
        library: library.clone(),
        config,
        spec,
    })
}

/// Why no plugin `name` can run: its own failure if one by that name was found, else what is
/// in the search path, with the manifests that did not parse (one of them may be the one wanted).
fn not_found(
    name: &str,
    named: &[&discovery::Candidate],
    candidates: &[discovery::Candidate],
    search: &discovery::SearchPaths,
) -> anyhow::Error {
    if let Some(Status::Failed(e)) = named.first().map(|c| &c.status) {
        return anyhow::anyhow!("plugin {name} cannot run: {e}");
    }
    let broken: Vec<String> = candidates
        .iter()
        .filter(|c| c.manifest.is_none())
        .filter_map(|c| match &c.status {
            Status::Failed(e) => Some(format!("\n  {e}")),
            _ => None,
        })
        .collect();
    anyhow::anyhow!(
        "no plugin named {name} in {}; `pio list` shows what is there{}",
        search
            .plugin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if broken.is_empty() {
            String::new()
        } else {
            format!("\nmanifests that failed to parse:{}", broken.concat())
        }
    )
}

/// Runs `pio run`; returns the process exit code.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let Prepared {
        settings,
        capabilities,
        library,
        config,
        spec,
    } = prepare(
        &args.name,
        &args.search,
        &args.tiers,
        args.model_path.as_ref(),
    )?;
    let parsed = request::request(&args, capabilities, &settings, config.generation.max_tokens)?;
    if args.in_process {
        return in_process(&library, &config, &parsed, args.shown());
    }
    let maximum = spec.plan.applied == Tier::Maximum;
    // 0 is no limit, as in the config (where `maximum`'s watchdog still holds).
    let timeout = match args.timeout {
        Some(0) => None,
        Some(secs) => Some(std::time::Duration::from_secs(secs)),
        None => settings.restart_policy().request_timeout,
    }
    .or(maximum.then_some(pio_host::supervisor::supervised::MAXIMUM_WATCHDOG));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(stream::stream(spec, config, parsed, args.shown(), timeout))
}

/// Starts the worker of `spec` and loads `config` into it, with a progress bar. SIGINT or
/// SIGTERM during the load stops the worker (a 60 GB model would go on loading for minutes) and
/// fails.
pub(crate) async fn start_loaded(
    spec: WorkerSpec,
    config: pio_plugin_api::wire::ModelConfig,
    stop: &mut StopSignals,
) -> anyhow::Result<(Worker, ModelInfo)> {
    let progress = LoadProgress::new(&spec.name);
    let worker = Worker::start(spec).await?;
    let loaded = tokio::select! {
        loaded = worker.load(config, |stage, done, total| progress.update(stage, done, total)) => loaded,
        by = stop.recv() => {
            progress.finish();
            worker.shutdown().await;
            return Err(Halted::new(by, format!("{by} while the model loaded: the worker was stopped")).into());
        }
    };
    progress.finish();
    Ok((worker, loaded?))
}
/// Prints tokens as a plugin loaded in this process produces them.
struct PrintSink(TokenPrinter);

impl TokenSink for PrintSink {
    fn emit(&mut self, t: GeneratedToken) -> Flow {
        let frame = TokenFrame::from(t);
        match self.0.token(&frame) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    fn is_cancelled(&self) -> bool {
        false
    }
}

impl ProgressSink for LoadProgress {
    fn report(&mut self, stage: RStr<'_>, done: u64, total: u64) -> Flow {
        self.update(stage.as_str(), done, total);
        Flow::Continue
    }
}

/// `--in-process`: the plugin runs inside `pio`, with no worker and no confinement.
fn in_process(
    library: &std::path::Path,
    config: &pio_plugin_api::wire::ModelConfig,
    parsed: &Parsed,
    shown: Shown,
) -> anyhow::Result<u8> {
    let json = shown.json;
    eprintln!(
        "warning: --in-process runs the plugin's code inside pio, unconfined: for debugging only"
    );
    let lib = PluginLibrary::load(library)?;
    let mut plugin = lib.instantiate()?;
    plugin.initialize("{}".into()).into_result()?;
    let progress = LoadProgress::new(lib.info().name.as_str());
    let config = serde_json::to_string(config)?;
    let loaded = plugin
        .load_model(
            config.as_str().into(),
            ProgressSink_TO::from_value(progress.clone(), TD_Opaque),
        )
        .into_result();
    progress.finish();
    let info: ModelInfo = serde_json::from_str(&loaded?)?;
    let request = constrained(parsed, &info)?;
    let printer = TokenPrinter::new(json).parsing(&request, &info, shown.special);
    let request = serde_json::to_string(&request)?;
    let sink = TokenSink_TO::from_value(PrintSink(printer), TD_Opaque);
    match plugin.infer(request.as_str().into(), sink).into_result() {
        Ok(outcome) => {
            let outcome: pio_plugin_api::wire::InferOutcome = serde_json::from_str(&outcome)?;
            TokenPrinter::new(json).done(&outcome)?;
            Ok(0)
        }
        Err(e) => {
            TokenPrinter::new(json).failed(&e);
            Ok(1)
        }
    }
}
