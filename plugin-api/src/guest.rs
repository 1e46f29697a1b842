//! The plugin author's side: a plain Rust trait to implement, and the adapter that turns it into
//! the ABI object — parsing JSON, and catching panics so they never unwind into the host.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr, RString},
};
use serde::{de::DeserializeOwned, Serialize};

use crate::abi::{
    Capabilities, Flow, GeneratedToken, Plugin, PluginBox, PluginInfo, PluginMod, PluginModRef,
    Plugin_TO, ProgressSinkBox, TokenSinkBox,
};
use crate::error::{ErrorKind, PluginError};
use crate::wire::{HostContext, InferOutcome, InferRequest, ModelConfig, ModelInfo};

/// What a plugin author implements; [`crate::export_plugin!`] does the rest.
///
/// `infer` takes `&self` because the host may run several requests at once.
pub trait PluginImpl: Sized + Send + Sync + 'static {
    /// The plugin's name, as manifests refer to it.
    const NAME: &'static str;
    /// The plugin's version (usually `env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// The model family, e.g. the transformers class name.
    const FAMILY: &'static str;
    /// What it can do.
    const CAPABILITIES: Capabilities;

    /// Constructs the plugin; keep it cheap (no model loading here).
    fn new() -> Result<Self, PluginError>;

    /// Receives the host's context once, before anything else.
    fn initialize(&mut self, _host: HostContext) -> Result<(), PluginError> {
        Ok(())
    }

    /// Whether `config` is something this plugin can load; the error says why not. Judge the
    /// settings alone: the model's files may not be there yet (`pio pull` asks before it
    /// fetches the weights).
    fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError>;

    /// Loads the model, reporting progress as it goes.
    fn load_model(
        &mut self,
        config: ModelConfig,
        progress: &mut Progress,
    ) -> Result<ModelInfo, PluginError>;

    /// Runs one request, emitting each token to `sink` as soon as it exists.
    fn infer(&self, request: InferRequest, sink: &mut Sink) -> Result<InferOutcome, PluginError>;

    /// Releases the model.
    fn cleanup(&mut self) -> Result<(), PluginError>;
}

/// The host's token sink, as a plugin sees it.
pub struct Sink {
    inner: TokenSinkBox,
}

impl Sink {
    /// Wraps a host sink.
    pub fn new(inner: TokenSinkBox) -> Self {
        Self { inner }
    }

    /// Sends one token. On `Flow::Stop` the host no longer wants the request (its client left,
    /// or it was cancelled): the plugin stops generating and returns
    /// `Err(PluginError::cancelled(..))`, which the worker counts as ended, not failed.
    pub fn emit(&mut self, token: GeneratedToken) -> Flow {
        self.inner.emit(token)
    }

    /// Whether the host has cancelled the request.
    pub fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

/// The host's loading-progress sink, as a plugin sees it.
pub struct Progress {
    inner: ProgressSinkBox,
}

impl Progress {
    /// Wraps a host progress sink.
    pub fn new(inner: ProgressSinkBox) -> Self {
        Self { inner }
    }

    /// Reports `done` of `total` units of `stage`; `Flow::Stop` asks the plugin to give up.
    pub fn report(&mut self, stage: &str, done: u64, total: u64) -> Flow {
        self.inner.report(RStr::from_str(stage), done, total)
    }
}

/// Adapts a [`PluginImpl`] to the ABI: JSON in and out, panics caught.
///
/// After a panic the plugin's state can no longer be trusted, so every later call fails until the
/// host restarts the worker.
pub struct Guarded<P> {
    inner: P,
    poisoned: AtomicBool,
}

impl<P: PluginImpl> Guarded<P> {
    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, PluginError>,
    ) -> RResult<T, PluginError> {
        guarded_call(P::NAME, &self.poisoned, what, f)
    }
}

fn panic_error(plugin: &str, what: &str, payload: &(dyn std::any::Any + Send)) -> PluginError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string());
    PluginError::new(
        ErrorKind::PANICKED,
        format!("plugin {plugin} panicked in `{what}`: {message}"),
    )
}

fn parse<T: DeserializeOwned>(what: &str, json: RStr<'_>) -> Result<T, PluginError> {
    serde_json::from_str(json.as_str()).map_err(|e| {
        PluginError::invalid_config(format!("{what} is not valid JSON for this plugin-api: {e}"))
    })
}

fn to_json<T: Serialize>(value: &T) -> Result<RString, PluginError> {
    serde_json::to_string(value)
        .map(RString::from)
        .map_err(|e| PluginError::internal(format!("cannot encode result as JSON: {e}")))
}

impl<P: PluginImpl> Plugin for Guarded<P> {
    fn initialize(&mut self, host_context: RStr<'_>) -> RResult<(), PluginError> {
        let poisoned = &self.poisoned;
        let inner = &mut self.inner;
        guarded_call(P::NAME, poisoned, "initialize", || {
            inner.initialize(parse("host context", host_context)?)
        })
    }

    fn supports_config(&self, model_config: RStr<'_>) -> RResult<(), PluginError> {
        self.call("supports_config", || {
            self.inner
                .supports_config(&parse("model config", model_config)?)
        })
    }

    fn load_model(
        &mut self,
        model_config: RStr<'_>,
        progress: ProgressSinkBox,
    ) -> RResult<RString, PluginError> {
        let poisoned = &self.poisoned;
        let inner = &mut self.inner;
        guarded_call(P::NAME, poisoned, "load_model", || {
            let config = parse("model config", model_config)?;
            to_json(&inner.load_model(config, &mut Progress::new(progress))?)
        })
    }

    fn infer(&self, request: RStr<'_>, sink: TokenSinkBox) -> RResult<RString, PluginError> {
        self.call("infer", || {
            let request = parse::<InferRequest>("request", request)
                .map_err(|e| PluginError::invalid_input(e.message.to_string()))?;
            to_json(&self.inner.infer(request, &mut Sink::new(sink))?)
        })
    }

    fn cleanup(&mut self) -> RResult<(), PluginError> {
        let poisoned = &self.poisoned;
        let inner = &mut self.inner;
        guarded_call(P::NAME, poisoned, "cleanup", || inner.cleanup())
    }
}

/// [`Guarded::call`] for `&mut self` methods, where the borrow of `inner` must be split off first.
fn guarded_call<T>(
    plugin: &str,
    poisoned: &AtomicBool,
    what: &str,
    f: impl FnOnce() -> Result<T, PluginError>,
) -> RResult<T, PluginError> {
    if poisoned.load(Ordering::Acquire) {
        return RResult::RErr(PluginError::new(
            ErrorKind::PANICKED,
            format!("plugin {plugin} panicked earlier and must be restarted before `{what}`"),
        ));
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.into(),
        Err(payload) => {
            poisoned.store(true, Ordering::Release);
            RResult::RErr(panic_error(plugin, what, payload.as_ref()))
        }
    }
}

extern "C" fn info<P: PluginImpl>() -> PluginInfo {
    PluginInfo {
        name: P::NAME.into(),
        version: P::VERSION.into(),
        family: P::FAMILY.into(),
        capabilities: P::CAPABILITIES,
    }
}

extern "C" fn construct<P: PluginImpl>() -> RResult<PluginBox, PluginError> {
    match catch_unwind(P::new) {
        Ok(Ok(plugin)) => {
            let guarded = Guarded {
                inner: plugin,
                poisoned: AtomicBool::new(false),
            };
            RResult::ROk(Plugin_TO::from_value(guarded, TD_Opaque))
        }
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => RResult::RErr(panic_error(P::NAME, "new", payload.as_ref())),
    }
}

/// Builds the root module for `P`; called by the code [`crate::export_plugin!`] generates.
#[doc(hidden)]
pub fn root_module<P: PluginImpl>() -> PluginModRef {
    PluginMod {
        info: info::<P>,
        new: construct::<P>,
    }
    .leak_into_prefix()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{CollectSink, NoProgress};
    use crate::ErrorKind;

    /// A plugin whose `infer` panics on the prompt "boom".
    struct Touchy;

    impl PluginImpl for Touchy {
        const NAME: &'static str = "touchy";
        const VERSION: &'static str = "0.1.0";
        const FAMILY: &'static str = "test";
        const CAPABILITIES: Capabilities = Capabilities::TEXT;

        fn new() -> Result<Self, PluginError> {
            Ok(Touchy)
        }
        fn supports_config(&self, _: &ModelConfig) -> Result<(), PluginError> {
            Ok(())
        }
        fn load_model(
            &mut self,
            _: ModelConfig,
            _: &mut Progress,
        ) -> Result<ModelInfo, PluginError> {
            Ok(ModelInfo::default())
        }
        fn infer(
            &self,
            request: InferRequest,
            sink: &mut Sink,
        ) -> Result<InferOutcome, PluginError> {
            if request.prompt == crate::wire::Prompt::Text("boom".into()) {
                panic!("touchy does not like {:?}", request.prompt);
            }
            sink.emit(GeneratedToken {
                token_id: 1,
                text: "ok".into(),
                logprob: None.into(),
                top_logprobs: Default::default(),
            });
            Ok(InferOutcome::default())
        }
        fn cleanup(&mut self) -> Result<(), PluginError> {
            Ok(())
        }
    }

    fn request(prompt: &str) -> String {
        serde_json::to_string(&InferRequest {
            prompt: crate::wire::Prompt::Text(prompt.into()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn a_panic_becomes_an_error_and_poisons_the_plugin() {
        let mut plugin = construct::<Touchy>().unwrap();
        plugin.load_model("{}".into(), NoProgress::boxed()).unwrap();
        let sink = CollectSink::new();
        plugin
            .infer(request("hi").as_str().into(), sink.boxed())
            .unwrap();
        assert_eq!(sink.text(), "ok");

        let e = plugin
            .infer(request("boom").as_str().into(), sink.boxed())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PANICKED);
        assert!(
            e.message
                .contains("panicked in `infer`: touchy does not like"),
            "{e}"
        );

        let e = plugin
            .infer(request("hi").as_str().into(), sink.boxed())
            .unwrap_err();
        assert!(e.message.contains("must be restarted"), "{e}");
        assert_eq!(e.kind, ErrorKind::PANICKED);
        let e = plugin.cleanup().unwrap_err();
        assert!(e.message.contains("must be restarted"), "{e}");
    }

    #[test]
    fn malformed_json_is_a_typed_error() {
        let mut plugin = construct::<Touchy>().unwrap();
        let e = plugin
            .load_model("{not json".into(), NoProgress::boxed())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::INVALID_CONFIG);
        assert!(e.message.contains("model config"), "{e}");
        let e = plugin
            .infer("42".into(), CollectSink::new().boxed())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::INVALID_INPUT);
    }

    #[test]
    fn info_comes_from_the_impl() {
        let module = root_module::<Touchy>();
        let info = (module.info())();
        assert_eq!(info.name.as_str(), "touchy");
        assert_eq!(info.capabilities, Capabilities::TEXT);
    }
}
