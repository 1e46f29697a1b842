//! The `qwen3-4b-instruct-2507` plugin: serves any Qwen3ForCausalLM checkpoint (Qwen3-4B-Instruct-2507,
//! Qwen3-0.6B, Qwen3-8B, ...) from a Hugging Face snapshot folder; the manifest's model path decides.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod model;

use pio_engine::candle_core::{DType, Device};
use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{generate, Finish, Request};
use pio_engine::generation_config::GenerationConfig;
use pio_engine::sampling::SamplingParams;
use pio_engine::text::TextCodec;
use pio_engine::EngineError;
use pio_plugin_api::wire::{
    FinishReason, GenerationDefaults, InferOutcome, InferRequest, ModelConfig, ModelInfo, Prompt,
    Usage,
};
use pio_plugin_api::{
    export_plugin, Capabilities, ErrorKind, Flow, GeneratedToken, PluginError, PluginImpl,
    Progress, RString, RVec, Sink, TopLogprob,
};

use crate::model::Qwen3;

/// A loaded model and everything needed to talk to it.
struct Loaded {
    model: Qwen3,
    codec: TextCodec,
    template: Option<ChatTemplate>,
    generation: GenerationConfig,
    defaults: GenerationDefaults,
    dtype: DType,
}

/// The plugin.
pub struct Qwen3Plugin {
    loaded: Option<Loaded>,
}

/// Maps engine errors onto the plugin-api's kinds.
pub fn plugin_error(e: EngineError) -> PluginError {
    let kind = match &e {
        EngineError::MissingFile { .. }
        | EngineError::BadFile { .. }
        | EngineError::BadField { .. }
        | EngineError::Weights { .. } => ErrorKind::MODEL_FILES,
        EngineError::InvalidInput(_) => ErrorKind::INVALID_INPUT,
        EngineError::Unsupported(_) => ErrorKind::UNSUPPORTED,
        EngineError::Compute(_) => ErrorKind::INTERNAL,
    };
    PluginError::new(kind, e.to_string())
}

fn dtype_of(config: &ModelConfig) -> Result<DType, PluginError> {
    match config.dtype.as_deref() {
        None | Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => Err(PluginError::invalid_config(format!(
            "dtype \"{other}\" is not one of f32, bf16, f16"
        ))),
    }
}

fn device_of(config: &ModelConfig) -> Result<Device, PluginError> {
    match config.device.as_deref() {
        None | Some("cpu") => Ok(Device::Cpu),
        Some(cuda) if cuda.starts_with("cuda") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Device::new_cuda(ordinal).map_err(|e| {
                PluginError::unsupported(format!(
                    "device \"{cuda}\" is unavailable ({e}); build the plugin with the `cuda` feature on a machine with CUDA, or use device = \"cpu\""
                ))
            })
        }
        Some(other) => Err(PluginError::invalid_config(format!(
            "unknown device \"{other}\""
        ))),
    }
}

impl Loaded {
    fn prompt_ids(&self, request: &InferRequest) -> Result<Vec<u32>, PluginError> {
        let text = match &request.prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Messages(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    PluginError::unsupported(
                        "this checkpoint has no chat template; send a raw text prompt",
                    )
                })?;
                template
                    .render(
                        messages,
                        request.tools.as_deref(),
                        true,
                        &request.chat_template_kwargs,
                    )
                    .map_err(plugin_error)?
            }
        };
        self.codec.encode(&text).map_err(plugin_error)
    }

    /// Request values first, then the manifest's defaults, then the checkpoint's.
    fn sampling(&self, r: &InferRequest) -> SamplingParams {
        let (d, g) = (&self.defaults, &self.generation);
        let sampled = g.do_sample.unwrap_or(true);
        let temperature =
            r.temperature
                .or(d.temperature)
                .or(if sampled { g.temperature } else { Some(0.0) });
        SamplingParams {
            temperature,
            top_k: r.top_k.or(d.top_k).or(g.top_k),
            top_p: r.top_p.or(d.top_p).or(g.top_p),
            min_p: r.min_p.or(d.min_p).or(g.min_p),
            repetition_penalty: r
                .repetition_penalty
                .or(d.repetition_penalty)
                .or(g.repetition_penalty),
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            seed: r.seed,
        }
    }
}

impl PluginImpl for Qwen3Plugin {
    const NAME: &'static str = "qwen3-4b-instruct-2507";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILY: &'static str = "Qwen3ForCausalLM";
    const CAPABILITIES: Capabilities = Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::LOGPROBS);

    fn new() -> Result<Self, PluginError> {
        Ok(Self { loaded: None })
    }

    fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError> {
        dtype_of(config)?;
        if config.model_path.is_none() {
            return Err(PluginError::invalid_config(
                "no model path: set [model] path in the manifest to a Qwen3 snapshot folder",
            ));
        }
        match config.quantization.as_deref() {
            None | Some("none") => Ok(()),
            Some(q) => Err(PluginError::unsupported(format!(
                "quantization \"{q}\" is not supported by this plugin yet; use \"none\""
            ))),
        }
    }

    fn load_model(
        &mut self,
        config: ModelConfig,
        progress: &mut Progress,
    ) -> Result<ModelInfo, PluginError> {
        self.supports_config(&config)?;
        let (dtype, device) = (dtype_of(&config)?, device_of(&config)?);
        let path = config.model_path.clone().unwrap_or_default();
        let checkpoint = Checkpoint::open(&path).map_err(plugin_error)?;
        let mut cancelled = false;
        let model = Qwen3::load(&checkpoint, dtype, &device, &mut |done, total| {
            cancelled |= progress.report("weights", done as u64, total as u64) == Flow::Stop;
        })
        .map_err(plugin_error)?;
        if cancelled {
            return Err(PluginError::cancelled("loading was cancelled"));
        }
        let loaded = Loaded {
            codec: TextCodec::load(&checkpoint).map_err(plugin_error)?,
            template: ChatTemplate::load(&checkpoint).map_err(plugin_error)?,
            generation: GenerationConfig::load(&checkpoint).map_err(plugin_error)?,
            defaults: config.generation.clone(),
            dtype,
            model,
        };
        let info = ModelInfo {
            context_length: Some(
                pio_engine::generate::CausalLm::context_length(&loaded.model) as u32,
            ),
            dtype: Some(format!("{:?}", loaded.dtype).to_lowercase()),
            device: Some(config.device.clone().unwrap_or_else(|| "cpu".into())),
            weight_bytes: None,
        };
        self.loaded = Some(loaded);
        Ok(info)
    }

    fn infer(&self, request: InferRequest, sink: &mut Sink) -> Result<InferOutcome, PluginError> {
        let loaded = self
            .loaded
            .as_ref()
            .ok_or_else(|| PluginError::not_ready("qwen3: infer before load_model"))?;
        let prompt = loaded.prompt_ids(&request)?;
        let prompt_tokens = prompt.len() as u32;
        let context = pio_engine::generate::CausalLm::context_length(&loaded.model);
        let max_tokens = request
            .max_tokens
            .or(loaded.defaults.max_tokens)
            .or(loaded.generation.max_new_tokens)
            .map_or(context, |m| m as usize);
        let engine_request = Request {
            prompt,
            sampling: loaded.sampling(&request),
            max_tokens,
            stop: request.stop.clone(),
            eos: loaded.generation.eos_token_id.clone(),
            logprobs: request.logprobs.map(|k| k as usize),
        };
        let mut emit = |t: pio_engine::generate::Emitted| {
            let token = GeneratedToken {
                token_id: t.token_id,
                text: RString::from(t.text),
                logprob: t.logprob.into(),
                top_logprobs: t
                    .top
                    .into_iter()
                    .map(|(token_id, text, logprob)| TopLogprob {
                        token_id,
                        text: text.into(),
                        logprob,
                    })
                    .collect::<RVec<_>>(),
            };
            sink.emit(token) == Flow::Continue
        };
        let outcome = generate(&loaded.model, &loaded.codec, &engine_request, &mut emit)
            .map_err(plugin_error)?;
        let finish_reason = match outcome.finish {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
            Finish::Cancelled => return Err(PluginError::cancelled("qwen3: request cancelled")),
        };
        let mut result = InferOutcome {
            finish_reason,
            usage: Usage {
                prompt_tokens,
                completion_tokens: outcome.completion_tokens as u32,
            },
            ..Default::default()
        };
        result
            .timings
            .insert("prompt_ms".into(), outcome.prompt_ms.into());
        result
            .timings
            .insert("decode_ms".into(), outcome.decode_ms.into());
        Ok(result)
    }

    fn cleanup(&mut self) -> Result<(), PluginError> {
        self.loaded = None;
        Ok(())
    }
}

export_plugin!(Qwen3Plugin);
