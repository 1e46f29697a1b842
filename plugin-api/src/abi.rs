//! The frozen binary interface: the root module every plugin exports, the plugin object and the
//! sinks the host hands to it. Changing anything here that is not an addition after a
//! `last_prefix_field` is a major version bump (see the crate docs for the evolution rules).

// `#[sabi_trait]` expands to impls inside consts, which this newer lint flags; the code is abi_stable's.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::error::PluginError;

/// What a plugin can do, as bit flags (an open set: unknown bits are kept and ignored).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Raw text completion.
    pub const TEXT: Self = Self(1);
    /// Chat messages rendered with the model's chat template.
    pub const CHAT: Self = Self(1 << 1);
    /// Tool (function) calling in chat.
    pub const TOOLS: Self = Self(1 << 2);
    /// Images in the input.
    pub const VISION: Self = Self(1 << 3);
    /// Log-probabilities of generated tokens and their top alternatives.
    pub const LOGPROBS: Self = Self(1 << 4);
    /// Output constrained to a grammar (`InferRequest::constraint`, since 1.4). The host sends a
    /// constraint only to a plugin that sets this: an older one would ignore the field and
    /// return unconstrained text.
    pub const STRUCTURED_OUTPUT: Self = Self(1 << 5);
    /// Answers an `InferRequest` whose `stats_only` is set at once, with its engine's figures
    /// and generating nothing (since 1.7). The host asks only plugins that set this: one built
    /// against 1.7 without knowing the field would run the empty request as a generation.
    pub const ENGINE_STATS: Self = Self(1 << 6);
    /// Answers an `InferRequest` whose `tokenize_only` is set with the prompt's token ids
    /// (`InferOutcome::prompt_token_ids`), generating nothing (since 1.9). The host asks only
    /// plugins that set this, for the API's `/tokenize`.
    pub const TOKENIZE: Self = Self(1 << 7);
    /// Adds `InferRequest::logit_bias` to the logits before sampling (since 1.9). The host
    /// sends a bias only to plugins that set this: an older one would ignore it.
    pub const LOGIT_BIAS: Self = Self(1 << 8);
    /// Ends the output after a token of `InferRequest::stop_token_ids` (since 1.9). The host
    /// sends them only to plugins that set this: an older one would run past them.
    pub const STOP_TOKEN_IDS: Self = Self(1 << 9);

    /// Scores the prompt on request (`InferRequest::prompt_logprobs`, since 1.10): each prompt
    /// token's logprob, rank and best alternatives in `InferOutcome::prompt_logprobs`. The host
    /// asks only plugins that set this: an older one would ignore the field.
    pub const PROMPT_LOGPROBS: Self = Self(1 << 10);
    /// Takes a prompt of token ids (`Prompt::Tokens`, since 1.10), run as given. The host sends
    /// one only to plugins that set this: an older one cannot read the variant.
    pub const TOKEN_PROMPTS: Self = Self(1 << 11);

    const NAMES: [(Self, &'static str); 12] = [
        (Self::TEXT, "text"),
        (Self::CHAT, "chat"),
        (Self::TOOLS, "tools"),
        (Self::VISION, "vision"),
        (Self::LOGPROBS, "logprobs"),
        (Self::STRUCTURED_OUTPUT, "structured_output"),
        (Self::ENGINE_STATS, "engine_stats"),
        (Self::TOKENIZE, "tokenize"),
        (Self::LOGIT_BIAS, "logit_bias"),
        (Self::STOP_TOKEN_IDS, "stop_token_ids"),
        (Self::PROMPT_LOGPROBS, "prompt_logprobs"),
        (Self::TOKEN_PROMPTS, "token_prompts"),
    ];

    /// The empty set.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The union of two sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the known flags that are set, in a fixed order; unknown bits as `bitN`.
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> = Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| (*name).to_string())
            .collect();
        let known = Self::NAMES.iter().fold(0, |acc, (flag, _)| acc | flag.0);
        for bit in 0..64 {
            if self.0 & !known & (1 << bit) != 0 {
                names.push(format!("bit{bit}"));
            }
        }
        names
    }

    /// Parses a flag name as `pio list`, `/v1/plugins` and `pio check --json` print it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(flag, _)| *flag)
    }
}

impl std::fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.names().join(","))
    }
}

/// Static facts about a plugin, readable before it is constructed.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    /// The plugin's name, as manifests and API clients refer to it (e.g. `qwen3-4b-instruct-2507`).
    pub name: RString,
    /// The plugin's own semver version (not the plugin-api version).
    pub version: RString,
    /// The model family it serves, e.g. the transformers class `Qwen3ForCausalLM`.
    pub family: RString,
    /// What it can do.
    pub capabilities: Capabilities,
}

/// One alternative token and its log-probability.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TopLogprob {
    /// The token's id in the model's vocabulary.
    pub token_id: u32,
    /// The token's text (may be a partial UTF-8 character rendered lossily).
    pub text: RString,
    /// Natural log-probability.
    pub logprob: f32,
}

/// One generated token, streamed to the host as soon as it is produced.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    /// The token's id in the model's vocabulary.
    pub token_id: u32,
    /// The text this token completes. Always valid UTF-8: a character split across tokens is
    /// emitted with the token that completes it, so this may be empty.
    pub text: RString,
    /// Natural log-probability of the chosen token, when logprobs were requested.
    pub logprob: ROption<f32>,
    /// The most likely alternatives, best first, when top logprobs were requested.
    pub top_logprobs: RVec<TopLogprob>,
}

/// Whether the producer should go on.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Stop now: the host no longer wants the output (the client went away or cancelled).
    Stop,
}

/// Where generated tokens go; implemented by the host.
#[sabi_trait]
pub trait TokenSink: Send {
    /// Receives the next token. `Flow::Stop` means: stop generating and return `cancelled`.
    fn emit(&mut self, token: GeneratedToken) -> Flow;

    /// Whether the host has cancelled the request; checked between forward passes.
    #[sabi(last_prefix_field)]
    fn is_cancelled(&self) -> bool;
}

/// Where model-loading progress goes; implemented by the host.
#[sabi_trait]
pub trait ProgressSink: Send {
    /// `done` of `total` units (bytes, tensors: the plugin's choice) of `stage` are finished.
    #[sabi(last_prefix_field)]
    fn report(&mut self, stage: RStr<'_>, done: u64, total: u64) -> Flow;
}

/// An owned token sink handed to [`Plugin::infer`].
pub type TokenSinkBox = TokenSink_TO<'static, RBox<()>>;
/// An owned progress sink handed to [`Plugin::load_model`].
pub type ProgressSinkBox = ProgressSink_TO<'static, RBox<()>>;

/// The plugin object. Every structured argument and result is JSON text (see [`crate::wire`]), so
/// new fields never change this interface. Implemented by [`crate::export_plugin!`], not by hand.
#[sabi_trait]
pub trait Plugin: Send + Sync {
    /// Called once after construction with the host's context (`wire::HostContext` as JSON).
    fn initialize(&mut self, host_context: RStr<'_>) -> RResult<(), PluginError>;

    /// Whether the plugin can load a model with this config (`wire::ModelConfig` as JSON);
    /// `Err` carries the reason (usually `unsupported` or `invalid_config`). A check of the
    /// settings alone: the model's files may not be there yet (`pio pull` asks before it
    /// fetches the weights), and loading reports what is wrong with them.
    fn supports_config(&self, model_config: RStr<'_>) -> RResult<(), PluginError>;

    /// Loads the model (`wire::ModelConfig` as JSON); returns `wire::ModelInfo` as JSON.
    fn load_model(
        &mut self,
        model_config: RStr<'_>,
        progress: ProgressSinkBox,
    ) -> RResult<RString, PluginError>;

    /// Runs one request (`wire::InferRequest` as JSON), streaming tokens to `sink` as they are
    /// produced; returns `wire::InferOutcome` as JSON. May be called from several threads at once.
    fn infer(&self, request: RStr<'_>, sink: TokenSinkBox) -> RResult<RString, PluginError>;

    /// Releases the model and everything it holds; the plugin may be loaded again afterwards.
    #[sabi(last_prefix_field)]
    fn cleanup(&mut self) -> RResult<(), PluginError>;
}

/// An owned plugin object.
pub type PluginBox = Plugin_TO<'static, RBox<()>>;

/// The root module every plugin library exports (through [`crate::export_plugin!`]).
///
/// The plugin-api version the library was built against travels in abi_stable's library header
/// (`VERSION_STRINGS`), which the host reads before it checks this module's layout.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// Static facts about the plugin; never fails.
    pub info: extern "C" fn() -> PluginInfo,

    /// Constructs the plugin object.
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn() -> RResult<PluginBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "pio_plugin";
    const NAME: &'static str = "pio_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
