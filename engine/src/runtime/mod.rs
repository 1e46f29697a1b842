//! The plugin side every text model shares: reading the model config, loading the checkpoint,
//! tokenizer, chat template and generation defaults, and running requests through the model's
//! [`Engine`], streaming tokens into the plugin-api sink. A model plugin is its static info plus a
//! [`ModelRuntime`] of its model type.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use pio_plugin_api::wire::{
    FinishReason, FloatType, GenerationDefaults, HostContext, InferOutcome, InferRequest,
    ModelConfig, ModelInfo, Prompt, PromptLogprob, TokenBytes, Usage, WeightQuantization,
};
use pio_plugin_api::{
    ErrorKind, Flow, GeneratedToken, PluginError, Progress, RString, RVec, Sink, TopLogprob,
};

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::generate::{CausalLm, Emitted, Finish, Request};
use crate::generation_config::GenerationConfig;
use crate::guide::Grammars;
use crate::linear::Quantization;
use crate::sampling::SamplingParams;
use crate::serving::{Engine, Stats};
use crate::text::TextCodec;
use crate::tokenizer_info::tokenizer_info;
use crate::EngineError;
use images::{message_images, MessageImages};

mod engine_config;
mod images;
mod memory;

/// A model that loads from a checkpoint.
pub trait LoadModel: CausalLm + Sized {
    /// Loads it in `dtype` (linear weights quantized as asked) on `device`, calling
    /// `progress(done, total)` as parts are read.
    fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> crate::Result<Self>;

    /// Bytes its weights take once loaded, when it keeps count.
    fn weight_bytes(&self) -> Option<u64> {
        None
    }

    /// The token ids it takes (its input embedding's rows), when it says: the tokenizer's and
    /// the end-of-sequence ids are checked against it at load.
    fn vocab_size(&self) -> Option<usize> {
        None
    }

    /// Bytes one decode step reads from its weights (the active experts' share, not the whole
    /// embedding table), when it keeps count: what sets the memory-bandwidth limit of decode.
    fn step_bytes(&self) -> Option<u64> {
        None
    }

    /// The engine's inputs for `prompt` and the images its messages carry (one placeholder
    /// token each, in order). A text model takes no images.
    fn prepare(
        &self,
        prompt: Vec<u32>,
        images: &[crate::images::RgbImage],
    ) -> crate::Result<(Vec<u32>, Option<Arc<crate::generate::Media>>)> {
        if images.is_empty() {
            Ok((prompt, None))
        } else {
            Err(EngineError::Unsupported(
                "this model takes text only; remove the image parts".into(),
            ))
        }
    }

    /// [`LoadModel::prepare`], stopping with [`EngineError::Cancelled`] once `cancelled` says so
    /// (checked between images, whose tower may take seconds each on a CPU).
    fn prepare_until(
        &self,
        prompt: Vec<u32>,
        images: &[crate::images::RgbImage],
        cancelled: &dyn Fn() -> bool,
    ) -> crate::Result<(Vec<u32>, Option<Arc<crate::generate::Media>>)> {
        let _ = cancelled;
        self.prepare(prompt, images)
    }

    /// The token ids [`LoadModel::prepare`] gives, without the work its media take (a vision
    /// tower): what `/tokenize` answers.
    fn token_ids(
        &self,
        prompt: Vec<u32>,
        images: &[crate::images::RgbImage],
    ) -> crate::Result<Vec<u32>> {
        self.prepare(prompt, images).map(|(ids, _)| ids)
    }
}

/// A loaded model and everything needed to talk to it.
struct Loaded<M> {
    /// The model the engine runs, for preparing multimodal inputs beside it.
    model: Arc<M>,
    engine: Engine,
    codec: Arc<TextCodec>,
    template: Option<ChatTemplate>,
    generation: GenerationConfig,
    defaults: GenerationDefaults,
    grammars: Grammars,
}

/// One plugin's model: unloaded until `load_model`.
pub struct ModelRuntime<M> {
    loaded: Option<Loaded<M>>,
    tool_call_format: Option<&'static str>,
    reasoning_format: Option<&'static str>,
    memory_limit: Option<u64>,
    gpu_memory_limit: Option<u64>,
    model: std::marker::PhantomData<fn() -> M>,
}

impl<M> ModelRuntime<M> {
    /// A runtime whose model writes tool calls in `tool_call_format` (see
    /// `pio_plugin_api::wire::ModelInfo::tool_call_format`), or has no tool calling.
    pub fn new(tool_call_format: Option<&'static str>) -> Self {
        Self {
            loaded: None,
            tool_call_format,
            reasoning_format: None,
            memory_limit: None,
            gpu_memory_limit: None,
            model: std::marker::PhantomData,
        }
    }

    /// The same runtime, its model marking reasoning as `reasoning_format` says (see
    /// `pio_plugin_api::wire::ModelInfo::reasoning_format`).
    pub fn with_reasoning(mut self, reasoning_format: Option<&'static str>) -> Self {
        self.reasoning_format = reasoning_format;
        self
    }

    /// Takes what the host says about the worker: its memory limit sizes a KV pool in host
    /// memory, its GPU memory cap holds the weights and a pool on a GPU.
    pub fn initialize(&mut self, host: &HostContext) {
        self.memory_limit = host.memory_limit_bytes;
        self.gpu_memory_limit = host.gpu_memory_limit_bytes;
    }

    /// The engine's counters, once a model is loaded.
    pub fn stats(&self) -> Option<Stats> {
        self.loaded.as_ref().map(|l| l.engine.stats())
    }
}

/// Maps engine errors onto the plugin-api's kinds.
pub fn plugin_error(e: EngineError) -> PluginError {
    let kind = match &e {
        EngineError::MissingFile { .. }
        | EngineError::BadFile { .. }
        | EngineError::BadField { .. }
        | EngineError::Weights { .. } => ErrorKind::MODEL_FILES,
        EngineError::InvalidInput(_) | EngineError::Image { .. } => ErrorKind::INVALID_INPUT,
        EngineError::ContextLength(_) => ErrorKind::CONTEXT_LENGTH,
        EngineError::Constraint(_) => ErrorKind::CONSTRAINT,
        EngineError::Unsupported(_) => ErrorKind::UNSUPPORTED,
        EngineError::Cancelled(_) => ErrorKind::CANCELLED,
        EngineError::Compute(_) | EngineError::Internal(_) => ErrorKind::INTERNAL,
        EngineError::Stopped(_) => ErrorKind::PANICKED,
    };
    PluginError::new(kind, e.to_string())
}

/// The dtype a model config asks for (default f32).
pub fn dtype_of(config: &ModelConfig) -> Result<DType, PluginError> {
    let dtype = config.float_type().map_err(PluginError::invalid_config)?;
    Ok(dtype.map_or(DType::F32, candle_dtype))
}

/// candle's type for a float type.
pub(crate) fn candle_dtype(t: FloatType) -> DType {
    match t {
        FloatType::F32 => DType::F32,
        FloatType::Bf16 => DType::BF16,
        FloatType::F16 => DType::F16,
    }
}

/// The quantization a model config asks for (default none).
pub fn quantization_of(config: &ModelConfig) -> Result<Quantization, PluginError> {
    let q = config
        .weight_quantization()
        .map_err(PluginError::invalid_config)?;
    Ok(match q {
        None | Some(WeightQuantization::None) => Quantization::None,
        Some(WeightQuantization::Q8) => Quantization::Q8,
        Some(WeightQuantization::Q4) => Quantization::Q4,
    })
}

/// The folder a model config keeps quantized weights in between starts (`quantization_cache`
/// in the manifest's `[model]` table), when it quantizes.
pub fn quantization_cache_of(
    config: &ModelConfig,
    quantization: Quantization,
) -> Result<Option<PathBuf>, PluginError> {
    let Some(value) = config.extra.get("quantization_cache") else {
        return Ok(None);
    };
    let Some(dir) = value.as_str().filter(|d| !d.is_empty()) else {
        return Err(PluginError::invalid_config(format!(
            "quantization_cache: expected the path of a folder, found {value}"
        )));
    };
    Ok((quantization != Quantization::None).then(|| PathBuf::from(dir)))
}

/// Whether `[model.options] profile` asks for the time per operation (see [`crate::profile`]).
pub fn profile_of(config: &ModelConfig) -> Result<bool, PluginError> {
    match config.extra.get("profile") {
        None => Ok(false),
        Some(serde_json::Value::Bool(on)) => Ok(*on),
        Some(other) => Err(PluginError::invalid_config(format!(
            "profile: expected true or false, found {other}"
        ))),
    }
}

/// The device a model config asks for (default the CPU).
pub fn device_of(config: &ModelConfig) -> Result<Device, PluginError> {
    match config.device.as_deref() {
        None | Some("cpu") => Ok(Device::Cpu),
        Some(cuda) if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                None => 0,
                // Not GPU 0 for a name that says another one badly ("cuda:one", "cuda: 1").
                Some(n) => n.parse().map_err(|_| {
                    PluginError::invalid_config(format!(
                        "device \"{cuda}\": expected \"cuda\" or \"cuda:N\" with N a GPU's number"
                    ))
                })?,
            };
            open_gpu(ordinal).map_err(|e| {
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

/// GPU `ordinal` as the engine drives it: one stream, so without cudarc's per-buffer events.
/// cudarc creates two CUDA events with every buffer and destroys them with it, to order uses
/// across streams; candle's device uses one, where they are never recorded, yet a decode step
/// allocates a buffer for nearly every one of its several hundred launches (about four driver
/// calls each, on the host's side of a step that the host's launches bound).
pub fn open_gpu(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = &device {
        // SAFETY: the events order a buffer's uses across streams; nothing the engine drives
        // makes a second stream, and this runs before anything is allocated on the device.
        unsafe { gpu.disable_event_tracking() };
    }
    Ok(device)
}

impl<M: LoadModel> Loaded<M> {
    fn prompt_ids(&self, request: &InferRequest) -> Result<Vec<u32>, PluginError> {
        let text = match &request.prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(text) => text.clone(),
            Prompt::Messages(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    PluginError::unsupported(
                        "this checkpoint has no chat template; send a raw text prompt",
                    )
                })?;
                let (tools, kwargs) = (request.tools.as_deref(), &request.chat_template_kwargs);
                let rendered = if request.continue_final_message {
                    template.render_continuing(messages, tools, kwargs)
                } else {
                    let open = request.add_generation_prompt.unwrap_or(true);
                    template.render(messages, tools, open, kwargs)
                };
                rendered.map_err(plugin_error)?
            }
        };
        self.codec.encode(&text).map_err(plugin_error)
    }

    /// The answer to a `tokenize_only` request: the prompt's ids as [`Self::engine_request`]
    /// would run them, images counted from their sizes.
    fn tokenized(
        &self,
        request: &InferRequest,
        images: &MessageImages,
    ) -> Result<InferOutcome, PluginError> {
        let ids = (self.model)
            .token_ids(self.prompt_ids(request)?, &images.images)
            .map_err(|e| images.error(e))?;
        Ok(InferOutcome {
            usage: Usage {
                prompt_tokens: ids.len() as u32,
                ..Usage::default()
            },
            prompt_token_ids: Some(ids),
            ..InferOutcome::default()
        })
    }

    /// The engine's request for `request` over `prompt` (its media and constraint left to the
    /// caller).
    fn engine_request(&self, request: &InferRequest, prompt: Vec<u32>) -> Request {
        let max_tokens = (request.max_tokens)
            .or(self.defaults.max_tokens)
            .or(self.generation.max_new_tokens)
            .map_or(self.engine.context_length(), |m| m as usize);
        Request {
            prompt,
            sampling: self.sampling(request),
            max_tokens,
            stop: request.stop.clone(),
            include_stop: request.include_stop_str_in_output,
            eos: self.generation.end_ids(request),
            stop_ids: request.stop_token_ids.clone(),
            min_tokens: request.min_tokens.unwrap_or(0) as usize,
            logprobs: request.logprobs.map(|k| k as usize),
            prompt_logprobs: request.prompt_logprobs.map(|k| k as usize),
            media: None,
            constraint: None,
        }
    }

    /// Request values first, then the manifest's defaults, then the checkpoint's.
    fn sampling(&self, r: &InferRequest) -> SamplingParams {
        self.generation.sampling(r, &self.defaults)
    }
}

/// Refuses a tokenizer or an end-of-sequence id past the model's `vocab` embedding rows: such
/// an id would reach the embedding (an index error naming no file on the CPU, a device assert
/// that breaks the context on a GPU) or could never be sampled (every answer would run to
/// `max_tokens`).
fn vocab_fault(
    checkpoint: &Checkpoint,
    codec: &TextCodec,
    generation: &GenerationConfig,
    vocab: usize,
) -> crate::Result<()> {
    if let Some(&id) = generation
        .eos_token_id
        .iter()
        .find(|&&id| id as usize >= vocab)
    {
        return Err(EngineError::BadField {
            path: checkpoint
                .companion("generation_config.json")
                .unwrap_or_else(|| checkpoint.config_path()),
            field: "eos_token_id".into(),
            reason: format!(
                "expected ids below the vocabulary's {vocab}, found {id}: it could never end an answer"
            ),
        });
    }
    let bound = codec.id_bound() as usize;
    if bound > vocab {
        let path = checkpoint
            .companion("tokenizer.json")
            .unwrap_or_else(|| checkpoint.config_path());
        return Err(EngineError::BadFile {
            path,
            reason: format!(
                "the tokenizer has token id {} but the model takes ids 0 to {} ({vocab} rows of `model.embed_tokens`, config.json's vocab_size): the tokenizer is not this model's",
                bound - 1,
                vocab - 1
            ),
        });
    }
    Ok(())
}

/// Every token id `request` names is in the vocabulary of `vocabulary` ids.
fn known_ids(request: &InferRequest, vocabulary: u32) -> Result<(), PluginError> {
    let biased = request.logit_bias.iter().map(|&(id, _)| ("logit_bias", id));
    let stops = request
        .stop_token_ids
        .iter()
        .map(|&id| ("stop_token_ids", id));
    let prompt = match &request.prompt {
        Prompt::Tokens(ids) => ids.as_slice(),
        _ => &[],
    };
    let prompt = prompt.iter().map(|&id| ("prompt", id));
    match biased
        .chain(stops)
        .chain(prompt)
        .find(|&(_, id)| id >= vocabulary)
    {
        Some((field, id)) => Err(PluginError::invalid_input(format!(
            "{field}: token {id} is not in the vocabulary (ids 0 to {})",
            vocabulary.saturating_sub(1)
        ))),
        None => Ok(()),
    }
}

fn token_of(t: Emitted) -> GeneratedToken {
    GeneratedToken {
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
    }
}

/// The checkpoint at the config's model path, with its quantization cache where one is set.
fn open_checkpoint(
    config: &ModelConfig,
    quantization: Quantization,
) -> Result<Checkpoint, PluginError> {
    let path = config.model_path.clone().unwrap_or_default();
    let mmap = engine_config::Options::parse(&config.extra)?.mmap();
    let mut checkpoint = Checkpoint::open(&path)
        .map_err(plugin_error)?
        .with_mapping(mmap);
    if let Some(dir) = quantization_cache_of(config, quantization)? {
        checkpoint = checkpoint
            .with_quantization_cache(&dir, quantization.name())
            .map_err(plugin_error)?;
        if let Some(cache) = checkpoint.quantization_cache().filter(|c| c.found()) {
            eprintln!("quantized weights from {}", cache.path().display());
        }
    }
    Ok(checkpoint)
}

/// The plugin's outcome of a finished generation over `prompt_tokens`: its finish, usage and
/// timings (with the profile, when enabled); a cancelled one is an error.
fn outcome_of(
    outcome: &crate::generate::Outcome,
    prompt_tokens: u32,
) -> Result<InferOutcome, PluginError> {
    let finish_reason = match outcome.finish {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
        Finish::Cancelled => return Err(PluginError::cancelled("request cancelled")),
    };
    let mut result = InferOutcome {
        finish_reason,
        stop_reason: outcome.stop_reason.clone(),
        usage: Usage {
            prompt_tokens,
            completion_tokens: outcome.completion_tokens as u32,
            cached_tokens: outcome.cached_tokens as u32,
        },
        ..Default::default()
    };
    result
        .timings
        .insert("prompt_ms".into(), outcome.prompt_ms.into());
    result
        .timings
        .insert("decode_ms".into(), outcome.decode_ms.into());
    result.prompt_logprobs = (outcome.prompt_logprobs.as_ref()).map(|scores| {
        scores
            .iter()
            .map(|s| PromptLogprob {
                token_id: s.token_id,
                logprob: s.logprob,
                rank: s.rank,
                top: s.top.clone(),
            })
            .collect()
    });
    if let Some(profile) = crate::profile::PROFILE.snapshot() {
        result.timings.insert("profile".into(), profile.into());
    }
    Ok(result)
}

/// The longest sequence `engine` serves: the model's context, or its KV pool's size when that
/// is smaller (said on stderr, which the worker's log keeps, with what to do).
fn served_context(engine: &Engine) -> usize {
    let (context, pool) = (engine.context_length(), engine.capacity());
    if pool < context {
        eprintln!(
            "warning: the KV pool holds {pool} positions, fewer than the model's context of {context}: each request (prompt and output) is held to {pool} tokens; raise kv_cache_bytes or the worker's memory limit to serve the whole context"
        );
    }
    context.min(pool)
}

impl<M: LoadModel> ModelRuntime<M> {
    /// Checks what this runtime can honour: the dtype, the quantization, the engine's
    /// `[model.options]` (the model path is the load's to check: `pio run --model-path` brings
    /// one to a manifest without).
    pub fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError> {
        dtype_of(config)?;
        quantization_of(config)?;
        engine_config::Options::parse(&config.extra)?;
        Ok(())
    }

    /// Loads the checkpoint at the config's model path.
    pub fn load_model(
        &mut self,
        config: &ModelConfig,
        progress: &mut Progress,
    ) -> Result<ModelInfo, PluginError> {
        self.supports_config(config)?;
        if config.model_path.is_none() {
            return Err(PluginError::invalid_config(
                "no model path: set [model] path in the manifest to a Hugging Face snapshot folder or a .gguf file",
            ));
        }
        if profile_of(config)? {
            crate::profile::PROFILE.enable();
        }
        let (dtype, device) = (dtype_of(config)?, device_of(config)?);
        let quantization = quantization_of(config)?;
        let checkpoint = open_checkpoint(config, quantization)?;
        // The text side first: a broken tokenizer, template or generation config is named in
        // seconds, not after minutes of loading a large model's weights.
        let codec = Arc::new(TextCodec::load(&checkpoint).map_err(plugin_error)?);
        let generation = GenerationConfig::load(&checkpoint)
            .and_then(|g| g.or_tokenizer_eos(&checkpoint, &codec))
            .map_err(plugin_error)?;
        let template = ChatTemplate::load(&checkpoint).map_err(plugin_error)?;
        let tokenizer_info =
            tokenizer_info(&checkpoint, template.as_ref()).map_err(plugin_error)?;
        let model = self.load_weights(&checkpoint, (dtype, quantization), &device, progress)?;
        let weight_bytes = model.weight_bytes();
        let memory = memory::Memory::measure(&device, self.memory_limit, self.gpu_memory_limit);
        let engine_config =
            engine_config::engine_config(&model, &config.extra, memory, weight_bytes)?;
        let info = ModelInfo {
            // On a GPU, what the engine placed there (weights and pool) beside the cap it honours.
            device_memory_bytes: (!device.is_cpu())
                .then(|| weight_bytes.unwrap_or(0) + engine_config.pool_bytes(&model)),
            device_memory_limit_bytes: memory.device_limit(),
            ..self.model_info(&model, config, dtype, &codec)
        };
        let model = Arc::new(model);
        let engine =
            Engine::start(model.clone(), codec.clone(), engine_config).map_err(plugin_error)?;
        // A pool shorter than the context holds each request to the pool: the host is told the
        // length it can serve (vLLM's `max_model_len` cut to its KV cache), and the log why.
        let info = ModelInfo {
            context_length: Some(served_context(&engine) as u32),
            ..info
        };
        if let Some(vocab) = model.vocab_size() {
            vocab_fault(&checkpoint, &codec, &generation, vocab).map_err(plugin_error)?;
        }
        let info = ModelInfo {
            tokenizer_info: Some(tokenizer_info),
            ..info
        };
        self.loaded = Some(Loaded {
            model,
            grammars: Grammars::new(codec.clone(), generation.eos_token_id.clone()),
            codec,
            template,
            generation,
            defaults: config.generation.clone(),
            engine,
        });
        Ok(info)
    }

    /// The model's weights from `checkpoint`, refused up front on a GPU when even a lower
    /// bound of their size cannot fit; progress goes to `progress`, which may cancel.
    fn load_weights(
        &self,
        checkpoint: &Checkpoint,
        (dtype, quantization): (DType, Quantization),
        device: &Device,
        progress: &mut Progress,
    ) -> Result<M, PluginError> {
        if !device.is_cpu() {
            // Refused before a byte reaches the device when even a lower bound cannot fit.
            let at_least = checkpoint
                .weight_bytes_at_least(dtype, quantization)
                .map_err(plugin_error)?;
            memory::weights_fit(
                memory::Memory::measure(device, self.memory_limit, self.gpu_memory_limit),
                at_least,
            )?;
        }
        let mut cancelled = false;
        let model = M::load(
            checkpoint,
            dtype,
            quantization,
            device,
            &mut |done, total| {
                cancelled |= progress.report("weights", done as u64, total as u64) == Flow::Stop;
            },
        )
        .map_err(plugin_error)?;
        if cancelled {
            return Err(PluginError::cancelled("loading was cancelled"));
        }
        if let Some(cache) = checkpoint.quantization_cache() {
            // The model is loaded either way: a cache that cannot be written is a warning.
            match cache.finish() {
                Ok(Some(path)) => eprintln!("wrote the quantization cache {}", path.display()),
                Ok(None) => {}
                Err(e) => eprintln!("warning: {e}"),
            }
        }
        Ok(model)
    }

    /// What the host is told about the loaded `model` (device memory apart).
    fn model_info(
        &self,
        model: &M,
        config: &ModelConfig,
        dtype: DType,
        codec: &TextCodec,
    ) -> ModelInfo {
        ModelInfo {
            context_length: Some(model.context_length() as u32),
            dtype: Some(format!("{dtype:?}").to_lowercase()),
            device: Some(config.device.clone().unwrap_or_else(|| "cpu".into())),
            weight_bytes: model.weight_bytes(),
            step_bytes: model.step_bytes(),
            device_memory_bytes: None,
            device_memory_limit_bytes: None,
            kernels: model
                .device()
                .is_cpu()
                .then(|| pio_kernels::Level::current().name().to_string()),
            tool_call_format: self.tool_call_format.map(str::to_string),
            reasoning_format: self.reasoning_format.map(str::to_string),
            token_bytes: Some(TokenBytes::encode(
                (0..codec.id_bound()).map(|id| codec.token_bytes(id)),
            )),
            special_token_ids: Some(codec.special_ids().to_vec()),
            tokenizer_info: None,
        }
    }

    /// Runs one request, streaming its tokens into `sink`.
    pub fn infer(
        &self,
        request: &InferRequest,
        sink: &mut Sink,
    ) -> Result<InferOutcome, PluginError> {
        let loaded = self
            .loaded
            .as_ref()
            .ok_or_else(|| PluginError::not_ready("infer called before load_model"))?;
        if request.stats_only {
            return Ok(InferOutcome {
                engine: Some(loaded.engine.stats().to_wire()),
                ..InferOutcome::default()
            });
        }
        known_ids(request, loaded.codec.id_bound())?;
        // A grammar that cannot be used is refused before any model work.
        let constraint = request
            .constraint
            .as_ref()
            .map(|c| loaded.grammars.compile(c))
            .transpose()
            .map_err(plugin_error)?;
        let images = message_images(&request.prompt)?;
        if request.tokenize_only {
            return loaded.tokenized(request, &images);
        }
        let prompt = loaded.prompt_ids(request)?;
        if !images.images.is_empty() {
            // The images' token counts come from their sizes alone: a prompt too long for the
            // context is refused before the vision tower spends minutes on it.
            let ids = (loaded.model)
                .token_ids(prompt.clone(), &images.images)
                .map_err(|e| images.error(e))?;
            loaded.engine.admits(ids.len()).map_err(plugin_error)?;
        }
        // The sink is polled between images and between tokens too: a request cancelled
        // while its images are encoded, while it waits or while it prefills stops at once.
        let sink = std::cell::RefCell::new(sink);
        let cancelled = || sink.try_borrow().is_ok_and(|s| s.is_cancelled());
        let (prompt, media) = loaded
            .model
            .prepare_until(prompt, &images.images, &cancelled)
            .map_err(|e| images.error(e))?;
        // Encoded: the pixels (up to ~400 MB) are not held through the generation.
        drop(images);
        let prompt_tokens = prompt.len() as u32;
        // Scores come with the ids they score (a client that sent text has no ids).
        let scored_ids = request.prompt_logprobs.map(|_| prompt.clone());
        let mut engine_request = loaded.engine_request(request, prompt);
        engine_request.media = media;
        engine_request.constraint = constraint;
        let mut emit = |t: Emitted| sink.borrow_mut().emit(token_of(t)) == Flow::Continue;
        let outcome = loaded
            .engine
            .generate_until(engine_request, &mut emit, &cancelled)
            .map_err(plugin_error)?;
        let mut result = outcome_of(&outcome, prompt_tokens)?;
        result.prompt_token_ids = scored_ids;
        result.engine = Some(loaded.engine.stats().to_wire());
        Ok(result)
    }

    /// Drops the model.
    pub fn cleanup(&mut self) {
        self.loaded = None;
    }
}

/// Declares a text-model plugin served by a [`ModelRuntime`]: the plugin type, its
/// `PluginImpl` (static info plus delegation to the runtime) and its export. Use it once, in
/// the plugin crate's `lib.rs`:
///
/// ```ignore
/// pio_engine::text_model_plugin! {
///     /// The plugin.
///     pub struct Qwen3CoderPlugin(Qwen3Moe);
///     name: "qwen3-coder-30b",
///     family: "Qwen3MoeForCausalLM",
///     capabilities: Capabilities::TEXT.union(Capabilities::CHAT),
///     tool_call_format: Some("qwen3_coder"),
/// }
/// ```
#[macro_export]
macro_rules! text_model_plugin {
    (
        $(#[$meta:meta])*
        pub struct $plugin:ident($model:ty);
        name: $name:expr,
        family: $family:expr,
        capabilities: $caps:expr,
        tool_call_format: $format:expr
        $(, reasoning_format: $reasoning:expr)? $(,)?
    ) => {
        $(#[$meta])*
        pub struct $plugin($crate::runtime::ModelRuntime<$model>);

        impl $crate::plugin_api::PluginImpl for $plugin {
            const NAME: &'static str = $name;
            const VERSION: &'static str = env!("CARGO_PKG_VERSION");
            const FAMILY: &'static str = $family;
            // Every model on the engine answers `stats_only` (live gauges) and `tokenize_only`,
            // samples with a `logit_bias`, stops at `stop_token_ids`, scores prompts and takes
            // token-id prompts.
            const CAPABILITIES: $crate::plugin_api::Capabilities = $caps
                .union($crate::plugin_api::Capabilities::ENGINE_STATS)
                .union($crate::plugin_api::Capabilities::TOKENIZE)
                .union($crate::plugin_api::Capabilities::LOGIT_BIAS)
                .union($crate::plugin_api::Capabilities::STOP_TOKEN_IDS)
                .union($crate::plugin_api::Capabilities::PROMPT_LOGPROBS)
                .union($crate::plugin_api::Capabilities::TOKEN_PROMPTS);

            fn new() -> Result<Self, $crate::plugin_api::PluginError> {
                Ok(Self(
                    $crate::runtime::ModelRuntime::new($format)
                        $(.with_reasoning($reasoning))?,
                ))
            }

            fn initialize(
                &mut self,
                host: $crate::plugin_api::wire::HostContext,
            ) -> Result<(), $crate::plugin_api::PluginError> {
                self.0.initialize(&host);
                Ok(())
            }

            fn supports_config(
                &self,
                config: &$crate::plugin_api::wire::ModelConfig,
            ) -> Result<(), $crate::plugin_api::PluginError> {
                self.0.supports_config(config)
            }

            fn load_model(
                &mut self,
                config: $crate::plugin_api::wire::ModelConfig,
                progress: &mut $crate::plugin_api::Progress,
            ) -> Result<$crate::plugin_api::wire::ModelInfo, $crate::plugin_api::PluginError> {
                self.0.load_model(&config, progress)
            }

            fn infer(
                &self,
                request: $crate::plugin_api::wire::InferRequest,
                sink: &mut $crate::plugin_api::Sink,
            ) -> Result<$crate::plugin_api::wire::InferOutcome, $crate::plugin_api::PluginError> {
                self.0.infer(&request, sink)
            }

            fn cleanup(&mut self) -> Result<(), $crate::plugin_api::PluginError> {
                self.0.cleanup();
                Ok(())
            }
        }

        $crate::plugin_api::export_plugin!($plugin);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device name that says a GPU badly is refused, not read as GPU 0.
    #[test]
    fn a_malformed_gpu_name_is_refused() {
        let config = |device: &str| ModelConfig {
            device: Some(device.into()),
            ..ModelConfig::default()
        };
        for bad in ["cuda:one", "cuda: 1", "cuda:"] {
            let e = device_of(&config(bad)).unwrap_err();
            assert_eq!(
                e.kind,
                pio_plugin_api::ErrorKind::INVALID_CONFIG,
                "{bad}: {e}"
            );
            assert!(e.message.contains("cuda:N"), "{bad}: {e}");
        }
        let e = device_of(&config("cudax")).unwrap_err();
        assert!(e.message.contains("unknown device"), "{e}");
        assert!(matches!(device_of(&config("cpu")), Ok(Device::Cpu)));
    }
}
