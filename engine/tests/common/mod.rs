//! What the engine's integration tests share: the fixture checkpoints, their transformers
//! goldens, an engine serving one of them, and the parity check against a golden case.

// Each test crate uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pio_engine::candle_core::{DType, Device};
use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{CausalLm, Emitted, Outcome, Request};
use pio_engine::generation_config::GenerationConfig;
use pio_engine::kv_pool::CacheType;
use pio_engine::linear::Quantization;
use pio_engine::runtime::LoadModel;
use pio_engine::sampling::SamplingParams;
use pio_engine::scoring::PromptScore;
use pio_engine::serving::{Engine, EngineConfig, Event, Stream};
use pio_engine::single::SingleSequence;
use pio_engine::text::TextCodec;
use serde_json::Value;

pub mod vl;

#[path = "../../src/testing.rs"]
pub mod testing;

/// What `template` renders for a golden chat-template case of `tests/fixtures/generate.py`
/// (its messages, tools, variables, and generation prompt or continued final message).
pub fn render_case(template: &ChatTemplate, case: &Value) -> String {
    let messages = case["messages"].as_array().unwrap();
    let tools = case.get("tools").map(|t| t.as_array().unwrap().clone());
    let kwargs = case
        .get("kwargs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let add = case["add_generation_prompt"].as_bool().unwrap();
    if case["continue_final_message"] == true {
        template.render_continuing(messages, tools.as_deref(), &kwargs)
    } else {
        template.render(messages, tools.as_deref(), add, &kwargs)
    }
    .unwrap_or_else(|e| panic!("{e}: {case}"))
}

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The golden cases transformers wrote for fixture `name`.
pub fn golden(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join(format!("golden/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Fixture `name` loaded in f32 and served by an engine with `config`.
pub fn engine_for<M: LoadModel + CausalLm>(name: &str, config: EngineConfig) -> Engine {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let codec = TextCodec::load(&checkpoint).unwrap();
    Engine::start(Arc::new(load::<M>(name)), Arc::new(codec), config).unwrap()
}

/// Fixture `name` loaded in f32 on the CPU.
pub fn load<M: LoadModel>(name: &str) -> M {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    M::load(
        &checkpoint,
        DType::F32,
        Quantization::None,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap()
}

/// The tokens are transformers' and the top-5 log-probabilities within 2e-3, for as many steps as
/// were generated; greedy picked the top token.
pub fn assert_matches(out: &[Emitted], case: &Value) {
    let tokens: Vec<u32> = out.iter().map(|e| e.token_id).collect();
    assert_eq!(
        tokens,
        ids(&case["tokens"])[..tokens.len()],
        "greedy tokens of {}",
        case["input_ids"]
    );
    for (step, (emitted, expected)) in out.iter().zip(case["top5"].as_array().unwrap()).enumerate()
    {
        let got_ids: Vec<u32> = emitted.top.iter().map(|t| t.0).collect();
        assert_eq!(got_ids, ids(&expected["ids"]), "top-5 ids at step {step}");
        for ((_, _, got), want) in emitted
            .top
            .iter()
            .zip(expected["logprobs"].as_array().unwrap())
        {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() < 2e-3,
                "step {step}: logprob {got} vs {want}"
            );
        }
        assert_eq!(
            emitted.logprob,
            Some(emitted.top[0].2),
            "greedy picks the top token"
        );
    }
}

/// A golden case: the request transformers answered and what it answered.
pub struct Case {
    /// The same prompt, greedy, with top-5 logprobs, as many tokens as transformers generated.
    pub request: Request,
    /// The golden entry.
    pub golden: Value,
}

/// Fixture `name`'s golden cases as requests; prompts are encoded (chats rendered with the
/// checkpoint's template) and checked against transformers' token ids.
pub fn cases(checkpoint: &Checkpoint, name: &str) -> Vec<Case> {
    let codec = TextCodec::load(checkpoint).unwrap();
    let template = ChatTemplate::load(checkpoint).unwrap().unwrap();
    let eos = GenerationConfig::load(checkpoint).unwrap().eos_token_id;
    golden(name)
        .into_iter()
        .map(|case| {
            let prompt = match case.get("prompt") {
                Some(p) => codec.encode(p.as_str().unwrap()).unwrap(),
                None => {
                    let messages = case["messages"].as_array().unwrap();
                    let text = template
                        .render(messages, None, true, &Default::default())
                        .unwrap();
                    codec.encode(&text).unwrap()
                }
            };
            assert_eq!(prompt, ids(&case["input_ids"]), "prompt tokens of {case}");
            let request = Request {
                prompt,
                sampling: SamplingParams::default(),
                max_tokens: case["tokens"].as_array().unwrap().len(),
                stop: Vec::new(),
                include_stop: false,
                eos: eos.clone(),
                stop_ids: Vec::new(),
                min_tokens: 0,
                logprobs: Some(5),
                prompt_logprobs: None,
                media: None,
                constraint: None,
            };
            Case {
                request,
                golden: case,
            }
        })
        .collect()
}

/// A request's tokens and outcome, read from its stream to the end; a failure fails the test.
pub fn collect(stream: Stream) -> (Vec<Emitted>, Outcome) {
    let mut out = Vec::new();
    loop {
        match stream.next().unwrap() {
            Event::Token(t) => out.push(t),
            Event::Done(o) => return (out, o),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

/// Transformers' prompt scores for checkpoint `name` (tests/fixtures/prompt_logprobs.py).
pub fn prompt_score_goldens(name: &str) -> Vec<Value> {
    let path = fixtures().join("golden/prompt-logprobs.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all[name].as_array().unwrap().clone()
}

/// Prompt scores against transformers': every token's logprob and top 5 within 2e-3 (the bound
/// of the generation goldens: f32 sums in another order than torch's), its rank exactly — or,
/// where the golden gives `ranks`, within them (the ranks it would take were every entry within
/// 1e-4 of its logprob on either side of it).
pub fn assert_prompt_scores(got: &[PromptScore], case: &Value) {
    const CLOSE: f32 = 2e-3;
    let want = case["scores"].as_array().unwrap();
    let prompt = &case["prompt"];
    assert_eq!(
        got.len(),
        want.len(),
        "one score per token after the first: {prompt}"
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let at = format!("{prompt} token {}", i + 1);
        assert_eq!(g.token_id as u64, w["id"].as_u64().unwrap(), "{at}");
        let logprob = w["logprob"].as_f64().unwrap() as f32;
        assert!(
            (g.logprob - logprob).abs() < CLOSE,
            "{at}: {} vs {logprob}",
            g.logprob
        );
        let rank = w["rank"].as_u64().unwrap();
        let (low, high) = match w["ranks"].as_array() {
            Some(r) => (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()),
            None => (rank, rank),
        };
        assert!(
            (low..=high).contains(&(g.rank as u64)),
            "{at}: rank {} where transformers' is {rank} (within {low}..={high})",
            g.rank
        );
        let top_ids: Vec<u32> = g.top.iter().map(|t| t.0).collect();
        assert_eq!(top_ids, ids(&w["top5"]["ids"]), "{at}");
        for (t, lp) in g.top.iter().zip(w["top5"]["logprobs"].as_array().unwrap()) {
            assert!((t.1 - lp.as_f64().unwrap() as f32).abs() < CLOSE, "{at}");
        }
    }
}

/// Submits every request at once and reads all the streams concurrently: each one's tokens and
/// outcome, in the order given.
pub fn run_concurrently(
    engine: &Engine,
    requests: impl IntoIterator<Item = Request>,
) -> Vec<(Vec<Emitted>, Outcome)> {
    let streams: Vec<Stream> = requests
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|s| scope.spawn(move || collect(s)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Runs one case by itself.
pub fn run_alone(engine: &Engine, case: &Case) -> (Vec<Emitted>, Outcome) {
    let mut out = Vec::new();
    let outcome = engine
        .generate(case.request.clone(), &mut |e| {
            out.push(e);
            true
        })
        .unwrap();
    (out, outcome)
}

/// Every golden case of fixture `name`, served by model `M` one at a time, matches transformers.
pub fn check_checkpoint<M: LoadModel + CausalLm>(name: &str) {
    check_against::<M>(name, name);
}

/// The model at fixture path `path`, served by model `M`, matches transformers' goldens of
/// fixture `golden_name` (the same weights in another file) case by case; its tokenizer and
/// chat template give transformers' prompt tokens.
pub fn check_against<M: LoadModel + CausalLm>(path: &str, golden_name: &str) {
    let checkpoint = Checkpoint::open(&fixtures().join(path)).unwrap();
    let engine = engine_for::<M>(path, EngineConfig::default());
    for case in cases(&checkpoint, golden_name) {
        let (out, outcome) = run_alone(&engine, &case);
        assert_eq!(out.len(), case.request.max_tokens);
        assert_eq!(outcome.completion_tokens, out.len());
        assert_matches(&out, &case.golden);
    }
}

/// The model at `path` (a fixture folder or file) loaded in `dtype` with `q`: every step's
/// log-probabilities, teacher-forced along each of fixture `cases`' golden prompts and greedy
/// tokens (any path through the vocabulary compares two models; transformers' is at hand).
pub fn distributions<M: LoadModel + CausalLm>(
    path: &Path,
    cases: &str,
    dtype: DType,
    q: Quantization,
) -> Vec<Vec<f32>> {
    distributions_cached::<M>(path, cases, dtype, q, None)
}

/// The same with the KV cache stored as `cache` (`None`: the model's dtype).
pub fn distributions_cached<M: LoadModel + CausalLm>(
    path: &Path,
    cases: &str,
    dtype: DType,
    q: Quantization,
    cache: Option<CacheType>,
) -> Vec<Vec<f32>> {
    distributions_on::<M>(path, cases, (dtype, q, cache), &Device::Cpu)
}

/// The same on `device`, the weights in `dtype` with `q` and the cache stored as `cache`.
pub fn distributions_on<M: LoadModel + CausalLm>(
    path: &Path,
    cases: &str,
    (dtype, q, cache): (DType, Quantization, Option<CacheType>),
    device: &Device,
) -> Vec<Vec<f32>> {
    let checkpoint = Checkpoint::open(path).unwrap();
    let model = M::load(&checkpoint, dtype, q, device, &mut |_, _| {}).unwrap();
    let mut out = Vec::new();
    for case in &golden(cases) {
        let cache = cache.unwrap_or(CacheType::Float(model.kv_dtype()));
        let mut seq = SingleSequence::with_cache(&model, model.context_length(), cache).unwrap();
        let mut logits = seq.forward(&model, &ids(&case["input_ids"])).unwrap();
        for token in ids(&case["tokens"]) {
            out.push(log_softmax(&logits));
            logits = seq.forward(&model, &[token]).unwrap();
        }
    }
    out
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits.iter().map(|l| l - max - sum.ln()).collect()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// (top-1 agreement, mean and max |Δ logprob| of the reference's top token) of `candidate`'s
/// distributions against `reference`'s, step by step.
pub fn agreement(reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> (f32, f32, f32) {
    assert_eq!(reference.len(), candidate.len());
    let (mut agree, mut sum, mut max) = (0, 0f32, 0f32);
    for (e, g) in reference.iter().zip(candidate) {
        let top = argmax(e);
        agree += usize::from(argmax(g) == top);
        let d = (e[top] - g[top]).abs();
        sum += d;
        max = max.max(d);
    }
    let n = reference.len() as f32;
    (agree as f32 / n, sum / n, max)
}
