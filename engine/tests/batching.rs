//! The batch-first engine against transformers' goldens: requests that run together, share a
//! cached prefix, get preempted for want of KV blocks or run beside a cancelled one each give
//! exactly the tokens (and top-5 log-probabilities within 2e-3) that transformers gives for the
//! request alone; every KV block is free again afterwards. Dense, MoE and MLA (GLM) checkpoints,
//! f32.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_matches, collect, engine_for, fixtures, golden, ids, run_concurrently};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{CausalLm, Emitted, Finish, Outcome, Request};
use pio_engine::generation_config::GenerationConfig;
use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_engine::models::qwen3::{Qwen3, Qwen3Moe};
use pio_engine::runtime::LoadModel;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig, Event, Stats, Stream};
use serde_json::Value;

/// The golden cases of `name`: (request, golden), the request cut to `lengths[i]` tokens.
fn cases(name: &str, lengths: &[usize]) -> Vec<(Request, Value)> {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let eos = GenerationConfig::load(&checkpoint).unwrap().eos_token_id;
    golden(name)
        .into_iter()
        .zip(lengths.iter().cycle())
        .map(|(case, &len)| {
            let request = Request {
                prompt: ids(&case["input_ids"]),
                sampling: SamplingParams::default(),
                max_tokens: len,
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
            (request, case)
        })
        .collect()
}

/// Small blocks, so that even the short golden prompts span several.
fn small_blocks(blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        kv_blocks: blocks,
        ..EngineConfig::default()
    }
}

/// `out` has `expected_len` tokens, transformers' for `case` (see [`common::assert_matches`]).
fn assert_answers(out: &[Emitted], case: &Value, expected_len: usize) {
    assert_eq!(out.len(), expected_len, "tokens of {}", case["input_ids"]);
    assert_matches(out, case);
}

/// The engine's counters, idle: a request's last event leaves only after the step's figures are
/// published, so once every answer is in, they are final.
fn when_idle(engine: &Engine) -> Stats {
    let s = engine.stats();
    assert!(
        s.running == 0 && s.waiting == 0,
        "the engine is not idle: {s:?}"
    );
    s
}

/// Requests of different lengths, each submitted once the previous one has its first token, all
/// consumed concurrently.
fn staggered<M: LoadModel + CausalLm>(name: &str) {
    let engine = engine_for::<M>(name, small_blocks(256));
    let cases = cases(name, &[16, 7, 12, 16, 9]);
    let results = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (request, _) in &cases {
            let stream = engine.submit(request.clone()).unwrap();
            // Wait for the first token here, hand the rest to a thread.
            let first = match stream.next().unwrap() {
                Event::Token(t) => t,
                other => panic!("expected a token, got {other:?}"),
            };
            handles.push(scope.spawn(move || {
                let (mut rest, outcome) = collect(stream);
                rest.insert(0, first);
                (rest, outcome)
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for ((request, golden), (out, outcome)) in cases.iter().zip(&results) {
        assert_answers(out, golden, request.max_tokens);
        assert_eq!(outcome.finish, Finish::Length);
    }
    let stats = when_idle(&engine);
    assert!(
        stats.batched_seqs > stats.steps,
        "sequences shared forward passes: {stats:?}"
    );
    assert_eq!(stats.blocks_used, 0, "every block is free again: {stats:?}");
}

#[test]
fn staggered_concurrent_requests_match_transformers_dense() {
    staggered::<Qwen3>("qwen3-tiny");
}

#[test]
fn staggered_concurrent_requests_match_transformers_moe() {
    staggered::<Qwen3Moe>("qwen3-moe-tiny");
}

fn run_all(engine: &Engine, cases: &[(Request, Value)]) -> Vec<(Vec<Emitted>, Outcome)> {
    run_concurrently(engine, cases.iter().map(|(r, _)| r.clone()))
}

fn shared_prefix<M: LoadModel + CausalLm>(name: &str) {
    let engine = engine_for::<M>(name, small_blocks(256));
    let cases = cases(name, &[16]);
    let (long, golden) = &cases[4];
    let first = run_all(&engine, &cases[4..5]);
    assert_eq!(first[0].1.cached_tokens, 0, "a cold cache has nothing");
    // The same prompt again, three times at once, and the other prompts beside them.
    let mut again = vec![cases[4].clone(), cases[4].clone(), cases[4].clone()];
    again.extend(cases[..4].iter().cloned());
    let results = run_all(&engine, &again);
    let full_blocks = (long.prompt.len() - 1) / 4 * 4;
    for ((request, case), (out, outcome)) in again.iter().zip(&results) {
        assert_answers(out, case, request.max_tokens);
        if request.prompt == long.prompt {
            assert_answers(out, golden, 16);
            assert_eq!(
                outcome.cached_tokens, full_blocks,
                "the prefix came from the cache"
            );
        }
    }
    let stats = when_idle(&engine);
    assert!(
        stats.prefix_hit_tokens >= 3 * full_blocks as u64,
        "{stats:?}"
    );
    assert_eq!(stats.blocks_used, 0, "{stats:?}");
}

#[test]
fn staggered_concurrent_requests_match_transformers_glm() {
    // Latent (MLA) cache entries in the paged pool, grouped routing.
    staggered::<Glm4MoeLite>("glm4-moe-lite-grouped");
}

#[test]
fn a_shared_prefix_served_from_the_cache_gives_the_same_tokens_glm() {
    shared_prefix::<Glm4MoeLite>("glm4-moe-lite-tiny");
}

#[test]
fn a_pool_too_small_preempts_and_still_gives_the_right_tokens_glm() {
    preemption::<Glm4MoeLite>("glm4-moe-lite-tiny");
}

#[test]
fn a_shared_prefix_served_from_the_cache_gives_the_same_tokens_dense() {
    shared_prefix::<Qwen3>("qwen3-tiny");
}

#[test]
fn a_shared_prefix_served_from_the_cache_gives_the_same_tokens_moe() {
    shared_prefix::<Qwen3Moe>("qwen3-moe-tiny");
}

fn preemption<M: LoadModel + CausalLm>(name: &str) {
    // 24 blocks of 4 hold 96 positions; the five requests need 198 together, the longest 74.
    let engine = engine_for::<M>(
        name,
        EngineConfig {
            prefix_cache: false,
            ..small_blocks(24)
        },
    );
    let cases = cases(name, &[16]);
    let results = run_all(&engine, &cases);
    for ((request, golden), (out, _)) in cases.iter().zip(&results) {
        assert_answers(out, golden, request.max_tokens);
    }
    let stats = when_idle(&engine);
    assert!(
        stats.preemptions > 0,
        "the pool was too small to run all: {stats:?}"
    );
    assert_eq!((stats.blocks_used, stats.blocks_free), (0, 24), "{stats:?}");
}

#[test]
fn a_pool_too_small_preempts_and_still_gives_the_right_tokens_dense() {
    preemption::<Qwen3>("qwen3-tiny");
}

#[test]
fn a_pool_too_small_preempts_and_still_gives_the_right_tokens_moe() {
    preemption::<Qwen3Moe>("qwen3-moe-tiny");
}

#[test]
fn preemption_with_shared_cached_prefixes_still_gives_the_right_tokens() {
    // The longest prompt three times over beside the others, the prefix cache on: preempted
    // sequences share blocks with those that keep running.
    let name = "qwen3-tiny";
    let engine = engine_for::<Qwen3>(name, small_blocks(30));
    let cases = cases(name, &[16]);
    let mut load = vec![cases[4].clone(), cases[4].clone(), cases[4].clone()];
    load.extend(cases[..4].iter().cloned());
    let results = run_all(&engine, &load);
    for ((request, golden), (out, _)) in load.iter().zip(&results) {
        assert_answers(out, golden, request.max_tokens);
    }
    let stats = when_idle(&engine);
    assert!(
        stats.preemptions > 0,
        "the pool was too small to run all: {stats:?}"
    );
    assert!(stats.prefix_hit_tokens > 0, "{stats:?}");
    assert_eq!(stats.blocks_used, 0, "{stats:?}");
}

#[test]
fn the_same_prompt_arriving_together_is_computed_once() {
    // Four copies of the longest prompt at once (as `n` choices arrive): one computes it, the
    // others wait for its blocks to land in the prefix cache and take them from there.
    let name = "qwen3-tiny";
    let engine = engine_for::<Qwen3>(name, small_blocks(200));
    let cases = cases(name, &[16]);
    let longest = cases
        .iter()
        .max_by_key(|(r, _)| r.prompt.len())
        .unwrap()
        .clone();
    let load = vec![longest.clone(); 4];
    let results = run_all(&engine, &load);
    for ((request, golden), (out, _)) in load.iter().zip(&results) {
        assert_answers(out, golden, request.max_tokens);
    }
    let shared = (longest.0.prompt.len() - 1) / 4 * 4;
    let stats = when_idle(&engine);
    assert_eq!(
        stats.prefix_hit_tokens,
        3 * shared as u64,
        "three took the first's blocks: {stats:?}"
    );
}

#[test]
fn cancelling_one_stream_leaves_the_others_unchanged() {
    let name = "qwen3-tiny";
    let engine = engine_for::<Qwen3>(name, small_blocks(256));
    let cases = cases(name, &[16]);
    let streams: Vec<Stream> = cases
        .iter()
        .map(|(r, _)| engine.submit(r.clone()).unwrap())
        .collect();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                scope.spawn(move || {
                    if i != 2 {
                        return Some(collect(s));
                    }
                    // Two tokens, then the client goes away.
                    for _ in 0..2 {
                        assert!(matches!(s.next(), Some(Event::Token(_))));
                    }
                    s.cancel();
                    let mut rest = 0;
                    loop {
                        match s.next().unwrap() {
                            Event::Token(_) => rest += 1,
                            Event::Done(o) => {
                                assert_eq!(o.finish, Finish::Cancelled);
                                assert!(rest < 14, "cancelled, it stopped early");
                                return None;
                            }
                            Event::Failed(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for ((request, golden), result) in cases.iter().zip(&results) {
        if let Some((out, _)) = result {
            assert_answers(out, golden, request.max_tokens);
        }
    }
    let stats = when_idle(&engine);
    assert_eq!(stats.blocks_used, 0, "{stats:?}");
}

#[test]
fn requests_the_pool_can_never_hold_are_refused_with_what_to_do() {
    let engine = engine_for::<Qwen3>("qwen3-tiny", small_blocks(4));
    let request = Request {
        prompt: vec![20; 40],
        max_tokens: 4,
        ..Request::default()
    };
    let e = engine.submit(request).unwrap_err().to_string();
    assert!(
        e.contains("KV cache holds 16 tokens") && e.contains("kv_cache_bytes"),
        "{e}"
    );
}

#[test]
fn a_request_cancelled_before_its_first_token_stops_at_once() {
    // Four prompt tokens per step: a 200-token prompt takes fifty steps to prefill.
    let engine = engine_for::<Qwen3>(
        "qwen3-tiny",
        EngineConfig {
            token_budget: 4,
            ..small_blocks(256)
        },
    );
    let request = Request {
        prompt: (0..200).map(|i| 20 + i % 300).collect(),
        max_tokens: 8,
        ..Request::default()
    };
    let mut tokens = 0;
    let outcome = engine
        .generate_until(
            request,
            &mut |_| {
                tokens += 1;
                true
            },
            &|| true,
        )
        .unwrap();
    assert_eq!((outcome.finish, tokens), (Finish::Cancelled, 0));
    let stats = when_idle(&engine);
    assert!(stats.steps < 10, "it stopped during the prefill: {stats:?}");
    assert_eq!(stats.blocks_used, 0, "{stats:?}");
}

#[test]
fn a_stream_nobody_reads_pauses_its_sequence_and_resumes_unchanged() {
    use pio_engine::serving::PAUSE_BACKLOG;
    let engine = engine_for::<Qwen3>("qwen3-tiny", small_blocks(256));
    let request = Request {
        prompt: (0..12).map(|i| 20 + i * 7).collect(),
        max_tokens: 3 * PAUSE_BACKLOG,
        ..Request::default()
    };
    let (alone, _) = collect(engine.submit(request.clone()).unwrap());
    assert_eq!(alone.len(), 3 * PAUSE_BACKLOG);

    let unread = engine.submit(request.clone()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while unread.unread() < PAUSE_BACKLOG && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Others keep running beside the paused sequence.
    let (other, outcome) = collect(engine.submit(request.clone()).unwrap());
    assert_eq!((other.len(), outcome.finish), (alone.len(), Finish::Length));
    let steps = engine.stats().steps;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stats = engine.stats();
    assert_eq!(
        unread.unread(),
        PAUSE_BACKLOG,
        "generation stopped at the backlog limit"
    );
    assert_eq!(
        (stats.running, stats.steps),
        (1, steps),
        "no steps while paused: {stats:?}"
    );

    let (resumed, outcome) = collect(unread);
    assert_eq!(outcome.finish, Finish::Length);
    let ids = |v: &[Emitted]| v.iter().map(|e| e.token_id).collect::<Vec<_>>();
    assert_eq!(ids(&resumed), ids(&alone), "pausing changed nothing");
    assert_eq!(when_idle(&engine).blocks_used, 0);
}

/// A paused stream resumes once its reader is down to `RESUME_BACKLOG` unread tokens, not at
/// the first token read (a reader slower than generation had it run a token a step, pausing
/// after each; under memory pressure each resumption was a preemption and a recompute).
#[test]
fn a_paused_stream_resumes_once_half_its_backlog_is_read() {
    use pio_engine::serving::{PAUSE_BACKLOG, RESUME_BACKLOG};
    let engine = engine_for::<Qwen3>("qwen3-tiny", small_blocks(256));
    let request = Request {
        prompt: (0..12).map(|i| 20 + i * 7).collect(),
        max_tokens: 3 * PAUSE_BACKLOG,
        ..Request::default()
    };
    let stream = engine.submit(request).unwrap();
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    until("the pause", &|| stream.unread() == PAUSE_BACKLOG);
    let mut read = 0;
    let mut take = |stream: &pio_engine::serving::Stream| {
        assert!(matches!(stream.next(), Some(Event::Token(_))));
        read += 1;
    };
    take(&stream);
    // Resumed, it would be back at the pause's backlog well within this.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        stream.unread(),
        PAUSE_BACKLOG - 1,
        "one token read does not resume it"
    );
    while stream.unread() > RESUME_BACKLOG {
        take(&stream);
    }
    until("the next pause", &|| stream.unread() == PAUSE_BACKLOG);
    let (rest, outcome) = collect(stream);
    assert_eq!(
        (read + rest.len(), outcome.finish),
        (3 * PAUSE_BACKLOG, Finish::Length)
    );
}

/// Stalled readers never keep out one that reads: with every sequence slot held by a paused
/// stream, a new request is served (the paused one is preempted and recomputed later), and the
/// paused stream, read at last, gives what it gives alone.
#[test]
fn a_paused_stream_holding_the_only_slot_yields_it_to_a_new_request() {
    use pio_engine::serving::PAUSE_BACKLOG;
    let config = EngineConfig {
        max_seqs: 1,
        ..small_blocks(256)
    };
    let engine = engine_for::<Qwen3>("qwen3-tiny", config);
    let request = Request {
        prompt: (0..12).map(|i| 20 + i * 7).collect(),
        max_tokens: 3 * PAUSE_BACKLOG,
        ..Request::default()
    };
    let (alone, _) = collect(engine.submit(request.clone()).unwrap());
    let unread = engine.submit(request.clone()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while unread.unread() < PAUSE_BACKLOG && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let short = Request {
        max_tokens: 4,
        ..request.clone()
    };
    let other = engine.submit(short).unwrap();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(collect(other)));
    let (out, outcome) = result
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the new request is served beside a paused stream holding the only slot");
    assert_eq!((out.len(), outcome.finish), (4, Finish::Length));
    let (resumed, _) = collect(unread);
    let ids = |v: &[Emitted]| v.iter().map(|e| e.token_id).collect::<Vec<_>>();
    assert_eq!(
        ids(&resumed),
        ids(&alone),
        "preempting the paused stream changed nothing"
    );
    assert_eq!(when_idle(&engine).blocks_used, 0);
}

/// A stream preempted while paused, read again, joins behind the streams that kept reading:
/// when blocks run short it is the one that waits (before, it went back to its arrival place,
/// ahead of them, took the step first and preempted the stream that had kept reading). Both
/// still give what they give alone.
#[test]
fn a_resumed_stream_joins_behind_those_that_kept_reading() {
    use pio_engine::serving::PAUSE_BACKLOG;
    // 20 blocks of 4: each request fits alone, the two long ones do not fit together.
    let config = EngineConfig {
        max_seqs: 2,
        prefix_cache: false,
        ..small_blocks(20)
    };
    let engine = engine_for::<Qwen3>("qwen3-tiny", config);
    let prompt = |k: u32| (0..12).map(|i| 20 + k + i * 7).collect::<Vec<u32>>();
    let resumed = Request {
        prompt: prompt(0),
        max_tokens: 3 * PAUSE_BACKLOG,
        ..Request::default()
    };
    let short = Request {
        prompt: prompt(1),
        max_tokens: 4,
        ..Request::default()
    };
    let reader = Request {
        prompt: prompt(2),
        max_tokens: 60,
        ..Request::default()
    };
    let ids = |v: &[Emitted]| v.iter().map(|e| e.token_id).collect::<Vec<_>>();
    let (resumed_alone, _) = collect(engine.submit(resumed.clone()).unwrap());
    let (reader_alone, _) = collect(engine.submit(reader.clone()).unwrap());

    let unread = engine.submit(resumed).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while unread.unread() < PAUSE_BACKLOG && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The short request takes the second slot; the reader finds both held and the paused
    // stream is preempted for it.
    let short = engine.submit(short).unwrap();
    let reader = engine.submit(reader).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let reading = {
        let done = done.clone();
        std::thread::spawn(move || {
            // Whether the reader fell behind enough to be paused itself (a loaded machine
            // descheduling this thread): then paused streams are preempted first, and which
            // finishes first proves nothing.
            let mut behind = 0;
            let mut out = Vec::new();
            let outcome = loop {
                behind = behind.max(reader.unread());
                match reader.next().unwrap() {
                    Event::Token(t) => out.push(t),
                    Event::Done(o) => break o,
                    Event::Failed(e) => panic!("{e}"),
                }
            };
            done.send("reader").unwrap();
            ((out, outcome), behind >= PAUSE_BACKLOG)
        })
    };
    let (short_out, _) = collect(short);
    assert_eq!(short_out.len(), 4);
    let resuming = std::thread::spawn(move || {
        let out = collect(unread);
        done.send("resumed").unwrap();
        out
    });
    let first = finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap();
    let ((reader_out, _), paused) = reading.join().unwrap();
    let (resumed_out, _) = resuming.join().unwrap();
    assert_eq!(ids(&reader_out), ids(&reader_alone));
    assert_eq!(ids(&resumed_out), ids(&resumed_alone));
    if !paused {
        assert_eq!(
            first, "reader",
            "the stream that kept reading finishes first"
        );
    }
    assert_eq!(when_idle(&engine).blocks_used, 0);
}

/// Seeded sampling in a batch gives each request the tokens it gets alone: eight sequences
/// sampling in the same steps are sampled in parallel on the engine's threads, each with its own
/// generator and its own row.
#[test]
fn seeded_sampled_requests_in_a_batch_give_what_each_gives_alone() {
    let engine = engine_for::<Qwen3>("qwen3-tiny", EngineConfig::default());
    let requests: Vec<Request> = (0..8u32)
        .map(|i| Request {
            prompt: (0..5 + i).map(|t| 3 + (t * 37 + i * 11) % 390).collect(),
            sampling: SamplingParams {
                temperature: Some(1.0),
                top_p: Some(0.95),
                seed: Some(u64::from(i)),
                ..SamplingParams::default()
            },
            max_tokens: 24,
            stop: Vec::new(),
            include_stop: false,
            eos: Vec::new(),
            stop_ids: Vec::new(),
            min_tokens: 0,
            logprobs: (i % 2 == 0).then_some(2),
            prompt_logprobs: None,
            media: None,
            constraint: None,
        })
        .collect();
    let tokens = |out: &[Emitted]| out.iter().map(|e| e.token_id).collect::<Vec<_>>();
    let alone: Vec<_> = requests
        .iter()
        .map(|r| tokens(&collect(engine.submit(r.clone()).unwrap()).0))
        .collect();
    let steps = when_idle(&engine).steps;
    let together: Vec<_> = run_concurrently(&engine, requests.iter().cloned())
        .iter()
        .map(|(out, _)| tokens(out))
        .collect();
    assert_eq!(together, alone);
    // The eight shared their steps (24 tokens each: far fewer than 8 × 24 steps).
    assert!(
        when_idle(&engine).steps - steps < 2 * 24,
        "the requests ran together"
    );
    assert!(alone.iter().all(|t| t.len() == 24));
}
