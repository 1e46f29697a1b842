//! The contract between the PIO host and its model plugins: a stable ABI (through `abi_stable`)
//! that third-party authors build against, with nothing else of PIO's.
//!
//! A plugin implements [`PluginImpl`] and calls [`export_plugin!`]; the host loads it with
//! [`PluginLibrary::load`] inside a confined worker process.
//!
//! # Versioning
//! This crate's version is the ABI version. A host loads plugins built against the same major and
//! an equal or older minor ([`ApiVersion::can_load`]). Within a major the root module
//! ([`PluginMod`]) and the traits are frozen: abi_stable refuses a library whose root module has
//! fewer prefix fields than the host's, so a field added there would lock out every older plugin
//! (a method appended to a host-implemented sink is refused the same way: its layout check counts
//! vtable fields too). Minor versions add only what old plugins can lack without harm: new
//! [`ErrorKind`] values and [`Capabilities`] bits (both open sets), and new JSON fields in
//! [`wire`] (all defaulted).
//!
//! History: 1.0.0 — first release. 1.1.0 — `ErrorKind::TIMEOUT`. 1.2.0 —
//! `ModelInfo::tool_call_format`. 1.3.0 — `ModelInfo::token_bytes` (every token's raw bytes). 1.4.0 —
//! `InferRequest::constraint` and `Capabilities::STRUCTURED_OUTPUT` (grammar-constrained output). 1.5.0 —
//! `ErrorKind::PANICKED` (a caught panic, after which the host restarts the worker). 1.6.0 —
//! `ErrorKind::CONTEXT_LENGTH` (an input longer than the model's context), `InferRequest::min_tokens`,
//! `InferRequest::ignore_eos`, `InferRequest::add_generation_prompt`,
//! `InferRequest::continue_final_message` and `InferRequest::include_stop_str_in_output`. 1.7.0 —
//! `InferRequest::stats_only` and `Capabilities::ENGINE_STATS` (the engine's figures at any
//! time, for live gauges). 1.8.0 — `ModelInfo::special_token_ids` (the tokenizer's special
//! tokens, which the host leaves out of the text as vLLM's `skip_special_tokens` does) and
//! `ErrorKind::CONSTRAINT` (an output constraint the plugin cannot use). 1.9.0 —
//! `InferRequest::tokenize_only`, `InferOutcome::prompt_token_ids` and `Capabilities::TOKENIZE`
//! (the prompt's token ids without generating, for the API's `/tokenize`);
//! `InferRequest::logit_bias` and `Capabilities::LOGIT_BIAS`; `InferRequest::stop_token_ids` and
//! `Capabilities::STOP_TOKEN_IDS`. 1.10.0 — `InferRequest::prompt_logprobs`,
//! `InferOutcome::prompt_logprobs` and `Capabilities::PROMPT_LOGPROBS` (the prompt's tokens
//! scored, for OpenAI's `echo` with `logprobs` and vLLM's `prompt_logprobs`); `Prompt::Tokens`
//! and `Capabilities::TOKEN_PROMPTS` (a prompt of token ids). 1.11.0 —
//! `ModelInfo::tokenizer_info` (the tokenizer's settings, for the API's `/tokenizer_info`).
//! 1.12.0 — `InferOutcome::stop_reason` (the stop string or stop token that ended the output,
//! for vLLM's `stop_reason`); a prompt score's `null` (a NaN written as JSON) reads as
//! `wire::LOGPROB_FLOOR`. 1.13.0 — `wire::guidance_schema` (a JSON Schema as the host and the
//! engine hand it to the grammar compiler: the layout, `oneOf` as `anyOf`, unknown formats as
//! annotations).

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod abi;
mod error;
mod guest;
mod loader;
pub mod sinks;
pub mod wire;

pub use abi::{
    Capabilities, Flow, GeneratedToken, Plugin, PluginBox, PluginInfo, PluginMod, PluginModRef,
    Plugin_TO, ProgressSink, ProgressSinkBox, ProgressSink_TO, TokenSink, TokenSinkBox,
    TokenSink_TO, TopLogprob,
};
/// The JSON library of the [`wire`] types, re-exported so plugins use the same version.
pub use serde_json;

pub use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec};
pub use error::{ErrorKind, PluginError};
pub use guest::{Guarded, PluginImpl, Progress, Sink};
pub use loader::{host_api_version, ApiVersion, LoadError, PluginLibrary};

/// The plugin-api version of this crate: what plugins built with it report, and what a host
/// built with it accepts.
pub const API_VERSION: ApiVersion = ApiVersion {
    major: parse_u32(env!("CARGO_PKG_VERSION_MAJOR")),
    minor: parse_u32(env!("CARGO_PKG_VERSION_MINOR")),
    patch: parse_u32(env!("CARGO_PKG_VERSION_PATCH")),
};

const fn parse_u32(digits: &str) -> u32 {
    let bytes = digits.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// Erases the host's sinks for the ABI: `TokenSink_TO::from_value(sink, TD_Opaque)` etc.
pub use abi_stable::sabi_trait::TD_Opaque;

#[doc(hidden)]
pub mod __private {
    pub use crate::guest::root_module;
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
}

/// Exports `$plugin` (a [`PluginImpl`]) as this library's PIO root module. Use it once, in the
/// plugin crate's `lib.rs`, which must be built with `crate-type = ["cdylib"]`.
///
/// This writes out what abi_stable's `#[export_root_module]` generates, so plugin crates need
/// no direct dependency on abi_stable; a test checks the symbol name against abi_stable's.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub fn __pio_root_module() -> $crate::PluginModRef {
            $crate::__private::root_module::<$plugin>()
        }

        #[doc(hidden)]
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = {
            extern "C" fn erased_module() -> $crate::__private::RootModuleResult {
                $crate::__private::__call_root_module_loader(__pio_root_module)
            }
            // SAFETY: `erased_module` returns the root module of type `PluginModRef`, as
            // `from_constructor` requires.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::PluginModRef>(
                    erased_module,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_macro_uses_abi_stables_symbol_name() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }

    #[test]
    fn api_version_matches_the_crate_version() {
        assert_eq!(super::API_VERSION.to_string(), env!("CARGO_PKG_VERSION"));
    }
}
