//! `pio run`: one request to one plugin through the same worker path the daemon uses,
//! streaming the output as it is generated.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use pio_host::discovery::{self, Status};
use pio_host::launch;
use pio_host::sandbox::{HostSupport, Policy, Tier};
use pio_host::serve::openai::{self, Endpoint, Limits, Parsed};
use pio_host::serve::structure;
use pio_host::supervisor::{Event, Worker, WorkerSpec};
use pio_plugin_api::wire::{InferRequest, ModelInfo};

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

/// A JSON array given inline or as a file (inline JSON of another shape is refused as such,
/// not looked for as a file).
fn json_array(flag: &str, value: &str, what: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = if value.trim_start().starts_with(['[', '{']) {
        value.to_string()
    } else {
        std::fs::read_to_string(value)
            .with_context(|| format!("cannot read the {flag} file {value}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{flag} must be a JSON array of {what}"))
}

/// The request `pio run` sends, built as the API request its flags amount to and checked by
/// the daemon's own parser: the CLI refuses what the API refuses, in the same words. A prompt
/// with no images is a completion (no chat template); messages, or images, make a chat, whose
/// image parts may name any file the user can read.
fn request(
    args: &RunArgs,
    capabilities: Capabilities,
    config: &pio_host::config::Config,
) -> anyhow::Result<Parsed> {
    use serde_json::json;
    let mut body = json!({
        "model": args.name,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
    });
    let endpoint = match messages(args, &mut body)? {
        Some(messages) => {
            body["messages"] = json!(messages);
            chat_fields(args, &mut body)?;
            Endpoint::Chat
        }
        None => {
            body["logprobs"] = json!(args.logprobs);
            Endpoint::Completions
        }
    };
    structure_fields(args, &mut body)?;
    // Null fields are flags not given.
    if let Some(fields) = body.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    let limits = Limits {
        max_tokens: config.server.max_tokens_limit,
        image_root: Some(PathBuf::from("/")),
    };
    let mut parsed = openai::parse(&body, endpoint, capabilities, &limits)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    // A prompt typed here runs to the context's end, as llama.cpp's CLI does: the API's 16
    // tokens for a completion are OpenAI's clients' expectation, not a terminal user's.
    if args.max_tokens.is_none() {
        parsed.request.max_tokens = (limits.max_tokens > 0).then_some(limits.max_tokens);
    }
    Ok(parsed)
}

/// A number that JSON can carry: NaN and infinity would reach the request as `null`, the
/// model's default, as if the flag were not given.
fn finite(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err("must be a finite number".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The chat messages the flags amount to, or `None` for a completion (the prompt then goes into
/// `body`): a prompt with images becomes one user message with image parts.
fn messages(
    args: &RunArgs,
    body: &mut serde_json::Value,
) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    use serde_json::json;
    Ok(match (&args.prompt, &args.messages) {
        (Some(text), _) if !args.images.is_empty() => {
            let mut content: Vec<_> = args
                .images
                .iter()
                .map(
                    |p| json!({"type": "image_url", "image_url": {"url": p.display().to_string()}}),
                )
                .collect();
            content.push(json!({"type": "text", "text": text}));
            Some(vec![json!({"role": "user", "content": content})])
        }
        (Some(text), _) => {
            body["prompt"] = json!(text);
            None
        }
        (None, Some(m)) => Some(json_array(
            "--messages",
            m,
            "{\"role\", \"content\"} objects",
        )?),
        (None, None) => bail!("give --prompt TEXT or --messages FILE_OR_JSON"),
    })
}

/// The flags only a chat takes: logprobs in its shape, tools, template arguments.
fn chat_fields(args: &RunArgs, body: &mut serde_json::Value) -> anyhow::Result<()> {
    use serde_json::json;
    if let Some(k) = args.logprobs {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(k);
    }
    if let Some(t) = &args.tools {
        body["tools"] = json!(json_array(
            "--tools",
            t,
            "{\"type\": \"function\", \"function\": {...}} objects",
        )?);
    }
    if let Some(k) = &args.chat_template_kwargs {
        body["chat_template_kwargs"] = serde_json::from_str(k).context(
            "--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'",
        )?;
    }
    Ok(())
}

/// The output structure flags: a JSON schema or a grammar, read from their files.
fn structure_fields(args: &RunArgs, body: &mut serde_json::Value) -> anyhow::Result<()> {
    use serde_json::json;
    if let Some(path) = &args.json_schema {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --json-schema {}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--json-schema {}: not JSON", path.display()))?;
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": true}});
    }
    if let Some(path) = &args.grammar {
        body["guided_grammar"] = json!(std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --grammar {}", path.display()))?);
    }
    Ok(())
}

/// The plugin request, with the grammar its output structure takes for the loaded model.
fn constrained(parsed: &Parsed, info: &ModelInfo) -> anyhow::Result<InferRequest> {
    let mut request = parsed.request.clone();
    if let Some(s) = &parsed.structure {
        let chat = parsed.endpoint == Endpoint::Chat;
        let c = structure::constraint(s, &request, chat, &parsed.model, info)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        request.constraint = Some(c);
    }
    Ok(request)
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
    let parsed = request(&args, capabilities, &settings)?;
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
    runtime.block_on(stream(spec, config, parsed, args.shown(), timeout))
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

/// SIGINT and SIGTERM, watched from when this is made (a stream made anew on each wait
/// misses a signal that comes between two waits).
pub(crate) struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts watching.
    pub(crate) fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
        })
    }

    /// The next signal.
    pub(crate) async fn recv(&mut self) -> Stopped {
        tokio::select! {
            _ = self.interrupt.recv() => Stopped::Interrupted,
            _ = self.terminate.recv() => Stopped::Terminated,
        }
    }
}

/// A command stopped before its end (a signal, a deadline): what it says, and the exit status
/// a shell expects of it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Halted {
    /// Why.
    pub by: Stopped,
    message: String,
}

impl Halted {
    /// Stopped `by`, saying `message`.
    pub(crate) fn new(by: Stopped, message: String) -> Self {
        Self { by, message }
    }
}

async fn stream(
    spec: WorkerSpec,
    config: pio_plugin_api::wire::ModelConfig,
    parsed: Parsed,
    shown: Shown,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<u8> {
    let mut signals = StopSignals::new()?;
    let (worker, info) = start_loaded(spec, config, &mut signals).await?;
    let request = match constrained(&parsed, &info) {
        Ok(r) => r,
        Err(e) => {
            worker.shutdown().await;
            return Err(e);
        }
    };
    let mut printer = TokenPrinter::new(shown.json).parsing(&request, &info, shown.special);
    let (id, mut events) = worker.infer(request)?;
    let deadline = tokio::time::sleep(timeout.unwrap_or(std::time::Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut stopped: Option<Stopped> = None;
    let code = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            by = signals.recv() => {
                stop(&worker, id, &mut stopped, by);
                continue;
            }
            _ = &mut deadline, if timeout.is_some() => {
                let secs = timeout.map_or(0, |t| t.as_secs());
                printer.failed(&format!(
                    "timeout: the request ran past its {secs} s deadline (--timeout) and was cancelled"
                ));
                stopped = Some(Stopped::PastDeadline);
                if let Some(by) = past_deadline(&worker, id, &mut events, &mut signals, secs).await {
                    stopped = Some(by);
                }
                break 1;
            }
        };
        let failure = match event {
            Some(Event::Token(t)) => {
                if let Err(e) = printer.token(&t) {
                    return output_closed(&worker, e).await;
                }
                continue;
            }
            Some(Event::Done(outcome)) => {
                if let Err(e) = printer.done(&outcome) {
                    return output_closed(&worker, e).await;
                }
                break 0;
            }
            Some(Event::Failed(e)) => e.to_string(),
            None => worker.exited().await.to_string(),
        };
        printer.failed(&failure);
        break 1;
    };
    worker.shutdown().await;
    Ok(stopped.map_or(code, Stopped::exit_code))
}

/// The output's reader is gone: nobody reads the rest, so the worker (and its cgroup) goes now.
async fn output_closed(worker: &Worker, e: std::io::Error) -> anyhow::Result<u8> {
    worker.shutdown().await;
    Err(OutputClosed(e).into())
}

/// Writing the output failed (its reader went away, `pio run ... | head`): `main` exits as a
/// command SIGPIPE ended, without a message.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output: {0}")]
pub struct OutputClosed(#[source] pub std::io::Error);

/// What a signal does to a running request: a first Ctrl-C cancels it (the plugin stops at its
/// next token); a second one, or SIGTERM, stops the worker at once (a plugin stuck in a loop
/// never sees a cancel, and the worker's cgroup goes with us).
fn stop(worker: &Worker, id: u64, stopped: &mut Option<Stopped>, by: Stopped) {
    let again = stopped.replace(by).is_some();
    match by {
        Stopped::Interrupted if !again => worker.cancel(id),
        _ => worker.kill_because(format!("was stopped: pio run was {by}")),
    }
}

/// A request past its deadline, as the daemon treats one: cancelled, and its worker stopped
/// only if it does not end within [`DEADLINE_GRACE`] (a plugin stuck in a loop never sees a
/// cancel) or a signal comes meanwhile, which is returned.
async fn past_deadline(
    worker: &Worker,
    id: u64,
    events: &mut pio_host::supervisor::Events,
    signals: &mut StopSignals,
    secs: u64,
) -> Option<Stopped> {
    worker.cancel(id);
    let ended = async { while let Some(Event::Token(_)) = events.recv().await {} };
    tokio::select! {
        ended = tokio::time::timeout(DEADLINE_GRACE, ended) => {
            if ended.is_err() {
                eprintln!("the request did not end when cancelled: its worker is stopped");
                worker.kill_because(format!(
                    "was stopped: the request ran past its {secs} s deadline and did not end when cancelled"
                ));
            }
            None
        }
        by = signals.recv() => {
            worker.kill_because(format!("was stopped: pio run was {by}"));
            Some(by)
        }
    }
}

/// How long a request cancelled at its deadline has to end before its worker is stopped.
const DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a command stopped its work before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// SIGINT (Ctrl-C).
    Interrupted,
    /// SIGTERM.
    Terminated,
    /// `--timeout`.
    PastDeadline,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupted => "interrupted (SIGINT)",
            Self::Terminated => "stopped (SIGTERM)",
            Self::PastDeadline => "past its deadline (--timeout)",
        })
    }
}

impl Stopped {
    /// The exit status, as shells and `timeout(1)` have it: 128 + the signal, 124 for a deadline.
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Self::Interrupted => 130,
            Self::Terminated => 143,
            Self::PastDeadline => 124,
        }
    }
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
