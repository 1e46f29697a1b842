//! The structured values that cross the boundary as JSON text. Fields are added, never removed or
//! retyped, and every field has a default, so hosts and plugins of different minors understand
//! each other: unknown fields are ignored, missing ones take their default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the host tells a plugin once, at `initialize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostContext {
    /// The host's `pio` version.
    pub host_version: String,
    /// How many compute threads the plugin may use (its cgroup's CPU share); `None`: its choice.
    pub threads: Option<usize>,
    /// A private, writable directory for the plugin's scratch files.
    pub scratch_dir: Option<PathBuf>,
    /// The most GPU memory the plugin may allocate, in bytes; its allocator must enforce it.
    pub gpu_memory_limit_bytes: Option<u64>,
    /// The worker's memory limit in bytes (its cgroup's), for sizing caches; `None`: unlimited.
    pub memory_limit_bytes: Option<u64>,
}

/// Generation defaults a manifest or a model's `generation_config.json` may set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Default cap on generated tokens.
    pub max_tokens: Option<u32>,
    /// Default sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Default nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Default top-k cut-off.
    pub top_k: Option<u32>,
    /// Default min-p cut-off.
    pub min_p: Option<f32>,
    /// Default repetition penalty (1 = none).
    pub repetition_penalty: Option<f32>,
}

/// How to load a model: the manifest's `[model]` table plus anything the operator overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// The Hugging Face snapshot folder (`config.json`, safetensors, tokenizer files), or a
    /// `.gguf` file.
    pub model_path: Option<PathBuf>,
    /// Weight and activation dtype: `f32`, `bf16` or `f16`.
    pub dtype: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: Option<String>,
    /// `none`, `q8` or `q4`.
    pub quantization: Option<String>,
    /// Generation defaults that override the model's own `generation_config.json`.
    pub generation: GenerationDefaults,
    /// Plugin-specific keys, passed through untouched: the manifest's `[model.options]`, and the
    /// `[model]` keys the host passes on beside them (`quantization_cache`, as an absolute path;
    /// `profile`, set by `pio bench --profile`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ModelConfig {
    /// `dtype`, typed (`None` when unset); an unknown name is an error naming the choices.
    pub fn float_type(&self) -> Result<Option<FloatType>, String> {
        self.dtype.as_deref().map(FloatType::parse).transpose()
    }

    /// `quantization`, typed (`None` when unset).
    pub fn weight_quantization(&self) -> Result<Option<WeightQuantization>, String> {
        self.quantization
            .as_deref()
            .map(WeightQuantization::parse)
            .transpose()
    }
}

/// A float type for weights and activations (`ModelConfig::dtype` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl FloatType {
    /// Its name on the wire and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// The type `name` names.
    pub fn parse(name: &str) -> Result<Self, String> {
        [Self::F32, Self::Bf16, Self::F16]
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| format!("dtype \"{name}\" is not one of f32, bf16, f16"))
    }
}

/// Weight quantization applied while loading (`ModelConfig::quantization` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightQuantization {
    /// Weights as stored.
    None,
    /// 8-bit blocks (Q8_0).
    Q8,
    /// 4-bit blocks (Q4_K).
    Q4,
}

impl WeightQuantization {
    /// Its name on the wire and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The quantization `name` names.
    pub fn parse(name: &str) -> Result<Self, String> {
        [Self::None, Self::Q8, Self::Q4]
            .into_iter()
            .find(|q| q.name() == name)
            .ok_or_else(|| format!("quantization \"{name}\" is not one of none, q8, q4"))
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text, tokenized as is (no chat template).
    Text(String),
    /// OpenAI-style chat messages, rendered with the model's chat template.
    Messages(Vec<serde_json::Value>),
    /// Token ids, run as given (no template, no special tokens added). Added in 1.10, and sent
    /// only to plugins that declare `Capabilities::TOKEN_PROMPTS`.
    Tokens(Vec<u32>),
}

impl Default for Prompt {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

/// One generation request. `None` means: the model's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InferRequest {
    /// The input.
    pub prompt: Prompt,
    /// Tool definitions (OpenAI `tools`), for chat requests to models with tool calling.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Extra variables for the chat template, such as `enable_thinking`.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// The most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens; 0: no cut-off, over any default the plugin has (the
    /// host sends 0 for the API's 0 and -1).
    pub top_k: Option<u32>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// Multiplicative penalty on tokens already seen (1 = none).
    pub repetition_penalty: Option<f32>,
    /// Additive penalty on tokens already generated.
    pub presence_penalty: Option<f32>,
    /// Additive penalty proportional to how often a token was generated.
    pub frequency_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Generation stops at any of these strings (the plugin applies them: the host does not);
    /// they are not part of the output unless `include_stop_str_in_output`.
    pub stop: Vec<String>,
    /// Report the chosen token's logprob and this many top alternatives (0: the chosen one only).
    pub logprobs: Option<u32>,
    /// The request's id as the client sees it (`x-request-id`), for logs. Added within 1.2 as an
    /// optional JSON field: older plugins ignore it.
    pub request_id: Option<String>,
    /// What the output must match (added in 1.4; sent only to plugins with
    /// `Capabilities::STRUCTURED_OUTPUT`).
    pub constraint: Option<Constraint>,
    /// Tokens to generate before the end of sequence may come (vLLM's `min_tokens`; added in
    /// 1.6, older plugins ignore it).
    pub min_tokens: Option<u32>,
    /// Generate past the end of sequence, to `max_tokens` (vLLM's `ignore_eos`, for benchmarks
    /// of a fixed output length; added in 1.6, older plugins ignore it).
    pub ignore_eos: bool,
    /// Chats: whether the template opens the assistant's turn (`None`: yes). Added in 1.6.
    pub add_generation_prompt: Option<bool>,
    /// Chats: the output continues the final message (an assistant turn the client began)
    /// instead of starting a new one, as transformers' `continue_final_message`. Added in 1.6.
    pub continue_final_message: bool,
    /// The stop string that ends the output is part of it (vLLM's
    /// `include_stop_str_in_output`). Added in 1.6.
    pub include_stop_str_in_output: bool,
    /// Generate nothing: answer at once with the engine's figures as they are now
    /// (`InferOutcome::engine`), which the host asks for every health interval to keep its
    /// gauges live. Added in 1.7, and sent only to plugins that declare
    /// `Capabilities::ENGINE_STATS`.
    pub stats_only: bool,
    /// Generate nothing: answer with the prompt's token ids as the model would run them (chat
    /// template applied, images expanded) in `InferOutcome::prompt_token_ids`, and their number
    /// in `usage.prompt_tokens`. Added in 1.9, and sent only to plugins that declare
    /// `Capabilities::TOKENIZE`.
    pub tokenize_only: bool,
    /// `(token id, bias)` pairs, each id once, added to those tokens' logits before sampling
    /// (OpenAI's `logit_bias`, each bias in [-100, 100]: -100 bans a token, 100 all but forces
    /// it). Pairs, not a JSON object, so the ids stay numbers through any serde format. Added in
    /// 1.9, and sent only to plugins that declare `Capabilities::LOGIT_BIAS`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// The output ends after any of these tokens, which stays part of it (vLLM's
    /// `stop_token_ids`; like the end of sequence, barred until `min_tokens`). Added in 1.9,
    /// and sent only to plugins that declare `Capabilities::STOP_TOKEN_IDS`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_token_ids: Vec<u32>,
    /// Score the prompt: every prompt token after the first gets its logprob, its rank and this
    /// many best alternatives, in `InferOutcome::prompt_logprobs` (vLLM's `prompt_logprobs`;
    /// what OpenAI's `echo` with `logprobs` reports). Added in 1.10, and sent only to plugins
    /// that declare `Capabilities::PROMPT_LOGPROBS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<u32>,
}

/// One prompt token's score under the tokens before it (`InferRequest::prompt_logprobs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptLogprob {
    /// The prompt token.
    pub token_id: u32,
    /// Its natural log-probability (the raw distribution: no temperature or penalty).
    #[serde(deserialize_with = "logprob_or_floor")]
    pub logprob: f32,
    /// 1 + the number of tokens more likely than it (vLLM's rank).
    pub rank: u32,
    /// The most likely tokens there, `(id, logprob)`, best first.
    #[serde(deserialize_with = "pairs_or_floor")]
    pub top: Vec<(u32, f32)>,
}

/// Where a log-probability was NaN or infinite: JSON has neither, and serde writes `null`,
/// which read as a number failed the whole outcome. vLLM's floor.
pub const LOGPROB_FLOOR: f32 = -9999.0;

fn logprob_or_floor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(LOGPROB_FLOOR))
}

fn pairs_or_floor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(u32, f32)>, D::Error> {
    let pairs = Vec::<(u32, Option<f32>)>::deserialize(d)?;
    Ok((pairs.into_iter())
        .map(|(id, lp)| (id, lp.unwrap_or(LOGPROB_FLOOR)))
        .collect())
}

/// A grammar the output must match, checked token by token as it is generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grammar {
    /// A JSON value valid against this JSON Schema (`{}`: any JSON value).
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Text in the language of this Lark grammar, in llguidance's dialect (which can embed JSON
    /// Schemas as `%json { ... }`).
    Lark(String),
}

/// How JSON a schema constrains is laid out unless the schema's `x-guidance` says otherwise
/// (llguidance's options): one space after `:` and `,`, as Python's `json.dumps` writes it, and
/// no other whitespace, so a model can neither pad nor loop in whitespace; and `oneOf` read as
/// `anyOf` (as vLLM's guidance backend does: Pydantic's tagged unions are `oneOf`). The host
/// applies it to schemas it embeds in grammars, the engine to schemas sent whole, each key the
/// schema's own `x-guidance` leaves unset.
pub fn json_layout() -> serde_json::Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": true})
}

/// String formats llguidance holds a value to; any other is an annotation.
const KNOWN_FORMATS: [&str; 11] = [
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
    "uri",
    "unknown",
];

/// `schema` as the grammar compiler is to read it: with [`json_layout`] in each key of its own
/// `x-guidance` it leaves unset (`true`, any JSON, becomes the object that says the same, to
/// carry the layout), and every `format` llguidance does not know left out as the annotation
/// JSON Schema makes it (OpenAPI's `password`, `int64`, `binary` were refused: tools carry
/// them everywhere). `false` stays as it is: no value at all.
pub fn guidance_schema(schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let mut schema = match schema {
        Value::Bool(true) | Value::Null => Value::Object(serde_json::Map::new()),
        other => other.clone(),
    };
    annotations_only(&mut schema);
    if let Value::Object(map) = &mut schema {
        let options = map
            .entry("x-guidance")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let (Value::Object(own), Value::Object(layout)) = (options, json_layout()) {
            for (key, value) in layout {
                own.entry(key).or_insert(value);
            }
        }
    }
    schema
}

/// Leaves out the formats llguidance does not know, in `schema` and the schemas within it
/// (values a schema holds as data — `const`, `enum`, `default`, `examples` — untouched).
fn annotations_only(schema: &mut serde_json::Value) {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            let unknown = |f: &Value| f.as_str().is_some_and(|f| !KNOWN_FORMATS.contains(&f));
            if map.get("format").is_some_and(unknown) {
                map.remove("format");
            }
            for (key, value) in map.iter_mut() {
                match key.as_str() {
                    // Keyed by names, not keywords: every value a schema (a property may be
                    // named `default` or `format`).
                    "properties" | "patternProperties" | "$defs" | "definitions"
                    | "dependentSchemas" => {
                        if let Value::Object(named) = value {
                            named.values_mut().for_each(annotations_only);
                        }
                    }
                    "const" | "enum" | "default" | "examples" | "x-guidance" => {}
                    _ => annotations_only(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(annotations_only),
        _ => {}
    }
}

/// Constrained output: the grammar, and where in the output it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    /// What the constrained text must match; generation ends once it is complete.
    pub grammar: Grammar,
    /// The output is free until it has produced this text (a reasoning model's end-of-thinking
    /// marker); the grammar applies to what follows it. `None`: from the first token.
    #[serde(default)]
    pub after: Option<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    #[default]
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The model called a tool.
    ToolCalls,
    /// The host cancelled the request.
    Cancelled,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Prompt tokens served from the model's prefix cache (OpenAI's
    /// `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u32,
}

/// How a request ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InferOutcome {
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Plugin-defined timing figures in milliseconds (e.g. `prompt_ms`, `decode_ms`).
    pub timings: serde_json::Map<String, serde_json::Value>,
    /// The model engine's figures as this request ended, for plugins that batch.
    pub engine: Option<EngineStats>,
    /// The prompt's token ids, answering `InferRequest::tokenize_only` (added in 1.9) and, with
    /// the scores, `InferRequest::prompt_logprobs` (1.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// The scores of the prompt's tokens after the first, in order, answering
    /// `InferRequest::prompt_logprobs` (added in 1.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// The stop string or stop token that ended the output (added in 1.12); `None` for the end
    /// of sequence, `max_tokens`, or a plugin that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// What ended an output before the end of sequence, as vLLM's `stop_reason` writes it: the
/// stop string matched, or the stop token's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopReason {
    /// One of the request's `stop_token_ids`.
    Token(u32),
    /// One of the request's `stop` strings.
    Text(String),
}

/// A batching engine's gauges and counters (counters since the model loaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineStats {
    /// Sequences in the running batch.
    pub running: u64,
    /// Requests waiting to join (new or preempted).
    pub waiting: u64,
    /// KV cache blocks held by sequences.
    pub kv_blocks_used: u64,
    /// KV cache blocks that can be allocated (free, or cached and held by nobody).
    pub kv_blocks_free: u64,
    /// The most KV cache blocks ever held at once.
    pub kv_blocks_peak: u64,
    /// Token positions per block.
    pub kv_block_size: u64,
    /// Bytes one token takes in the KV cache.
    pub kv_bytes_per_token: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_lookup_tokens: u64,
    /// Of those, tokens found.
    pub prefix_hit_tokens: u64,
    /// Sequences preempted for want of KV blocks (and recomputed later).
    pub preemptions: u64,
    /// Forward passes run.
    pub steps: u64,
    /// Sequences over all forward passes (divided by `steps`: the mean batch size).
    pub batched_seqs: u64,
    /// Tokens sampled under a grammar's mask (added in 1.4).
    pub guided_tokens: u64,
    /// Microseconds spent computing those masks, beside the forward passes (added in 1.4).
    pub guide_compute_us: u64,
    /// Microseconds the sampler waited for a mask not yet ready: what the overlap with the
    /// forward pass did not hide (added in 1.4).
    pub guide_wait_us: u64,
}

/// What a loaded model reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelInfo {
    /// The longest prompt plus completion, in tokens.
    pub context_length: Option<u32>,
    /// The dtype actually used.
    pub dtype: Option<String>,
    /// The device actually used.
    pub device: Option<String>,
    /// Bytes of weights resident after loading.
    pub weight_bytes: Option<u64>,
    /// Bytes one decode step reads from the weights (every layer's projections, the routed experts'
    /// share, the output head; not the embedding table): the memory-bandwidth limit of decode is
    /// the bandwidth over this. Added within 1.4 as an optional JSON field.
    pub step_bytes: Option<u64>,
    /// On a GPU, bytes of device memory the model holds (weights and KV pool); `None` on the CPU.
    /// Added within 1.4 as an optional JSON field, as `reasoning_format` was within 1.2.
    pub device_memory_bytes: Option<u64>,
    /// The GPU memory cap the model was sized inside (`limits.gpu_memory`), when one was set.
    pub device_memory_limit_bytes: Option<u64>,
    /// On the CPU, the widest instruction set its kernels may use, chosen at run time (`amx`,
    /// `avx512`, `avxvnni`, `avx2`, `portable`; `amx` means AVX-512 everywhere plus AMX tiles
    /// for bf16 weights meeting bf16 activations). Added within 1.4 as an optional JSON field.
    pub kernels: Option<String>,
    /// How the model writes tool calls in its output, for the host to parse them into the API's
    /// `tool_calls`: `hermes` (`<tool_call>{"name", "arguments"}</tool_call>`, Qwen3 instruct)
    /// or `qwen3_coder` (`<tool_call><function=NAME><parameter=P>...`). Since 1.2; also `glm47`
    /// (`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...`, GLM-4.5 to 4.7).
    pub tool_call_format: Option<String>,
    /// How the model marks its reasoning in its output, for the host to return it as
    /// `reasoning_content`: `glm45` (`<think>...</think>` before the answer, the chat template
    /// opening the block unless `enable_thinking` is false). `None`: no reasoning. Added within 1.2 as
    /// an optional JSON field: a host that predates it ignores it and returns the markup as text.
    pub reasoning_format: Option<String>,
    /// Every token's own bytes, in id order (added in 1.3), so the host reports logprobs' `bytes`
    /// exactly, even for a token that holds part of a UTF-8 character (byte-level BPE splits CJK
    /// text and emoji): the streamed text is whole characters and cannot carry that. Sent once,
    /// at load. `None`: the host falls back to each token's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_bytes: Option<TokenBytes>,
    /// The tokenizer's special tokens (its added tokens marked `special`: `<|im_end|>`,
    /// `<|endoftext|>` ...), which the host leaves out of the text unless a request sets
    /// `skip_special_tokens: false`, as vLLM does; markup the host parses (`<think>`,
    /// `<tool_call>`) is kept while it parses it. Added in 1.8 as an optional JSON field;
    /// `None`: nothing is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub special_token_ids: Option<Vec<u32>>,
    /// The tokenizer's settings, for vLLM's `GET /tokenizer_info` (which lm-eval's remote
    /// tokenizer reads): `tokenizer_config.json`'s fields with file paths left out and special
    /// tokens as their text, `chat_template` the template the plugin renders, and
    /// `tokenizer_class`. Added in 1.11 as an optional JSON field; `None`: the host answers that
    /// the plugin reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_info: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The vocabulary's raw bytes, compactly: standard base64 of every token's bytes concatenated in
/// id order, and where each token's bytes end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBytes {
    /// Base64 (standard alphabet, padded) of the concatenated bytes.
    pub data: String,
    /// Token `i`'s bytes end at `ends[i]` in the decoded data (and start at `ends[i - 1]`).
    pub ends: Vec<u32>,
}

impl TokenBytes {
    /// The table of `tokens`, indexed by token id.
    pub fn encode<T: AsRef<[u8]>>(tokens: impl IntoIterator<Item = T>) -> Self {
        use base64::Engine as _;
        let mut data = Vec::new();
        let mut ends = Vec::new();
        for token in tokens {
            data.extend_from_slice(token.as_ref());
            ends.push(u32::try_from(data.len()).unwrap_or(u32::MAX));
        }
        Self {
            data: base64::engine::general_purpose::STANDARD.encode(data),
            ends,
        }
    }

    /// Decoded and checked, ready for lookups.
    pub fn table(&self) -> Result<TokenTable, String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("token_bytes.data is not base64: {e}"))?;
        let ordered = self.ends.windows(2).all(|w| w[0] <= w[1]);
        if !ordered || self.ends.last().is_some_and(|&e| e as usize != bytes.len()) {
            return Err(format!(
                "token_bytes.ends must rise to the data's length ({} bytes)",
                bytes.len()
            ));
        }
        Ok(TokenTable {
            bytes,
            ends: self.ends.clone(),
        })
    }
}

/// Token id to raw bytes (from [`TokenBytes::table`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl TokenTable {
    /// Token `id`'s bytes, if the table has it.
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.bytes.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats llguidance does not know are left out wherever a schema sits (under property
    /// names that are keywords elsewhere too); data and known formats are kept; PIO's layout
    /// fills each option the schema's own leaves unset.
    #[test]
    fn a_guidance_schema_keeps_data_and_known_formats_and_the_layout() {
        let schema = serde_json::json!({"type": "object", "properties": {
            "default": {"type": "string", "format": "password"},
            "when": {"type": "string", "format": "date-time"},
            "c": {"const": {"format": "int64"}}},
            "x-guidance": {"whitespace_flexible": true}});
        let g = guidance_schema(&schema);
        assert!(g["properties"]["default"].get("format").is_none(), "{g}");
        assert_eq!(g["properties"]["when"]["format"], "date-time");
        assert_eq!(g["properties"]["c"]["const"]["format"], "int64");
        assert_eq!(g["x-guidance"]["whitespace_flexible"], true);
        assert_eq!(g["x-guidance"]["key_separator"], ": ");
        assert_eq!(guidance_schema(&serde_json::json!(false)), false);
    }

    #[test]
    fn token_bytes_round_trip_through_json_including_partial_characters() {
        let tokens: Vec<Vec<u8>> = vec![b"hi".to_vec(), vec![0xE4, 0xB8], vec![], vec![0xAD]];
        let wire = serde_json::to_string(&TokenBytes::encode(&tokens)).unwrap();
        let table = serde_json::from_str::<TokenBytes>(&wire)
            .unwrap()
            .table()
            .unwrap();
        for (id, token) in tokens.iter().enumerate() {
            assert_eq!(table.get(id as u32), Some(token.as_slice()));
        }
        assert_eq!(table.get(4), None);
    }

    #[test]
    fn a_malformed_table_is_refused() {
        let mut t = TokenBytes::encode([b"abc"]);
        t.ends = vec![5];
        assert!(t.table().unwrap_err().contains("ends"));
        t.data = "!!".into();
        assert!(t.table().unwrap_err().contains("base64"));
    }

    #[test]
    fn dtype_and_quantization_names_round_trip_and_unknown_ones_name_the_choices() {
        for t in [FloatType::F32, FloatType::Bf16, FloatType::F16] {
            assert_eq!(FloatType::parse(t.name()), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        for q in [
            WeightQuantization::None,
            WeightQuantization::Q8,
            WeightQuantization::Q4,
        ] {
            assert_eq!(WeightQuantization::parse(q.name()), Ok(q));
        }
        let config = ModelConfig {
            dtype: Some("f64".into()),
            quantization: Some("q3".into()),
            ..ModelConfig::default()
        };
        assert!(config.float_type().unwrap_err().contains("f32, bf16, f16"));
        assert!(config
            .weight_quantization()
            .unwrap_err()
            .contains("none, q8, q4"));
    }
}
