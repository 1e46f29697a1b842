//! The engine: one thread per loaded model that drives forward passes over every request in
//! flight. `submit` enqueues a request and returns its [`Stream`] of events; between steps the
//! thread takes new requests and cancellations, asks the [`scheduler`](crate::scheduler) for the
//! next batch, runs it against the paged [`KvPool`], and turns each sequence's logits into tokens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::generate::{CausalLm, Emitted, Finish, Outcome, Request};
use crate::kv_pool::{CacheType, KvPool, PoolShape};
use crate::text::TextCodec;
use crate::{EngineError, Result};

mod step;

/// How the engine batches and how big its KV pool is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Token positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool.
    pub kv_blocks: usize,
    /// What the pool stores (`None`: the model's own dtype).
    pub kv_dtype: Option<CacheType>,
    /// New tokens per forward pass over all sequences (a long prompt is prefilled in chunks).
    pub token_budget: usize,
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Whether full blocks are shared by content between requests.
    pub prefix_cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_blocks: 1024,
            kv_dtype: None,
            token_budget: 256,
            max_seqs: 64,
            prefix_cache: true,
        }
    }
}

impl EngineConfig {
    /// The default configuration running `max_seqs` sequences (default 64) with a pool of at
    /// most `bytes` for `model`, its vectors in `kv_dtype` (default: the model's) — at least one
    /// block, never more blocks than `max_seqs` full contexts need.
    pub fn with_pool_bytes<M: CausalLm>(
        model: &M,
        bytes: u64,
        kv_dtype: Option<CacheType>,
        max_seqs: Option<usize>,
    ) -> Self {
        let base = Self {
            max_seqs: max_seqs.unwrap_or(Self::default().max_seqs),
            ..Self::default()
        };
        let dtype = kv_dtype.unwrap_or(CacheType::Float(model.kv_dtype()));
        let per_block = (model.kv_layout().bytes_per_token(dtype) * base.block_size).max(1) as u64;
        let ceiling = (model.context_length() * base.max_seqs).div_ceil(base.block_size);
        Self {
            kv_blocks: ((bytes / per_block) as usize).clamp(1, ceiling.max(1)),
            kv_dtype,
            ..base
        }
    }

    /// Bytes of the pool this configuration gives `model`.
    pub fn pool_bytes<M: CausalLm>(&self, model: &M) -> u64 {
        let dtype = self.kv_dtype.unwrap_or(CacheType::Float(model.kv_dtype()));
        (model.kv_layout().bytes_per_token(dtype) * self.block_size * self.kv_blocks) as u64
    }
}

/// What a request's stream carries.
#[derive(Debug)]
pub enum Event {
    /// A generated token.
    Token(Emitted),
    /// The request ended.
    Done(Outcome),
    /// The request failed.
    Failed(EngineError),
}

/// Tokens a stream may hold unread before its sequence is paused: enough to ride out a
/// reader's hiccup, small enough that a reader that stopped holds almost nothing.
pub const PAUSE_BACKLOG: usize = 16;

/// Unread tokens a paused sequence resumes at: half the pause's, so that a reader slower than
/// generation has it run in bursts, not a token a step, pausing again after each (when blocks
/// run short paused sequences are preempted first, and each resumption recomputed its context
/// for one token).
pub const RESUME_BACKLOG: usize = PAUSE_BACKLOG / 2;

/// A submitted request's events; dropping it cancels the request.
pub struct Stream {
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    /// Tokens sent and not yet taken.
    backlog: Arc<AtomicUsize>,
    engine: Arc<Shared>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("unread", &self.unread())
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// The next event; `None` once the engine is gone.
    pub fn next(&self) -> Option<Event> {
        self.events.recv().ok().map(|e| self.taken(e))
    }

    /// The next event if one waits within `timeout`.
    pub fn next_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> std::result::Result<Event, mpsc::RecvTimeoutError> {
        self.events.recv_timeout(timeout).map(|e| self.taken(e))
    }

    /// Tokens generated and not yet read.
    pub fn unread(&self) -> usize {
        self.backlog.load(Ordering::Acquire)
    }

    /// Accounts for a token read; wakes the engine when that resumes the sequence.
    fn taken(&self, event: Event) -> Event {
        if matches!(event, Event::Token(_))
            && self.backlog.fetch_sub(1, Ordering::AcqRel) == RESUME_BACKLOG + 1
        {
            // Take the queue's lock so the wake cannot fall between the engine's check and
            // its wait.
            let _inbox = self.engine.inbox.lock();
            self.engine.wake.notify_one();
        }
        event
    }

    /// Asks the engine to stop this request; it ends with [`Finish::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Counters and gauges of the engine, as of its last step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Requests waiting to join (new or preempted).
    pub waiting: usize,
    /// KV blocks held by sequences.
    pub blocks_used: usize,
    /// KV blocks that can be allocated (free or idle in the prefix cache).
    pub blocks_free: usize,
    /// The most KV blocks ever held at once.
    pub blocks_peak: usize,
    /// KV blocks in the pool.
    pub blocks_total: usize,
    /// Token positions per block.
    pub block_size: usize,
    /// Bytes one token takes in the pool.
    pub kv_bytes_per_token: usize,
    /// Prompt tokens looked up in the prefix cache at admission.
    pub prefix_lookup_tokens: u64,
    /// Of those, tokens found.
    pub prefix_hit_tokens: u64,
    /// Sequences preempted (and recomputed later).
    pub preemptions: u64,
    /// Forward passes run.
    pub steps: u64,
    /// Sequences over all forward passes (divide by `steps` for the mean batch size).
    pub batched_seqs: u64,
    /// Sequences in the last forward pass.
    pub last_batch: usize,
    /// Tokens sampled under a grammar's mask, the time spent computing those masks (beside the
    /// forward passes), and the time the sampler waited for them.
    pub guided: crate::sequence::GuideTime,
}

impl Stats {
    /// The figures as the plugin API carries them.
    pub fn to_wire(&self) -> pio_plugin_api::wire::EngineStats {
        let n = |v: usize| v as u64;
        pio_plugin_api::wire::EngineStats {
            running: n(self.running),
            waiting: n(self.waiting),
            kv_blocks_used: n(self.blocks_used),
            kv_blocks_free: n(self.blocks_free),
            kv_blocks_peak: n(self.blocks_peak),
            kv_block_size: n(self.block_size),
            kv_bytes_per_token: n(self.kv_bytes_per_token),
            prefix_lookup_tokens: self.prefix_lookup_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            preemptions: self.preemptions,
            steps: self.steps,
            batched_seqs: self.batched_seqs,
            guided_tokens: self.guided.tokens,
            guide_compute_us: self.guided.compute.as_micros() as u64,
            guide_wait_us: self.guided.wait.as_micros() as u64,
        }
    }
}

/// A new request on its way to the engine thread.
struct Arrival {
    request: Request,
    max_tokens: usize,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    backlog: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Inbox {
    arrivals: Vec<Arrival>,
    stop: bool,
}

/// What the engine thread and its callers share.
#[derive(Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    stats: Mutex<Stats>,
}

/// A model being served: its engine thread and the queue into it.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    context: usize,
    /// Positions the whole pool holds.
    capacity: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("context", &self.context)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The engine's own thread pool, as wide as rayon's global one (`RAYON_NUM_THREADS`, else the
/// CPUs the process may use). The engine loop runs on one of its threads, so the serial parts of
/// a step (candle's element-wise ops, sampling) and the parallel kernels share those threads:
/// with the loop on a thread of its own, three threads would be runnable on a two-CPU quota
/// while the pool's idle workers spin, and the cgroup's CPU throttling halved decode.
fn engine_threads() -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("pio-engine-{i}"))
        .build()
        .map_err(|e| EngineError::Internal(format!("cannot start the engine's threads: {e}")))
}

impl Engine {
    /// Starts serving `model`: allocates its KV pool and starts its thread.
    pub fn start<M: CausalLm>(
        model: Arc<M>,
        codec: Arc<TextCodec>,
        config: EngineConfig,
    ) -> Result<Self> {
        let layout = model.kv_layout();
        let shape = PoolShape {
            block_size: config.block_size,
            blocks: config.kv_blocks,
            storage: config
                .kv_dtype
                .unwrap_or(CacheType::Float(model.kv_dtype())),
        };
        let pool = KvPool::new(layout.clone(), shape, &model.device())?;
        let shared = Arc::new(Shared::default());
        if let Ok(mut s) = shared.stats.lock() {
            *s = Stats {
                blocks_free: shape.blocks,
                blocks_total: shape.blocks,
                block_size: shape.block_size,
                kv_bytes_per_token: layout.bytes_per_token(shape.storage),
                ..Stats::default()
            };
        }
        let context = model.context_length();
        let worker = step::Worker::new(model, codec, pool, config, shared.clone());
        let threads = engine_threads()?;
        let thread = std::thread::Builder::new()
            .name("pio-engine".into())
            .spawn(move || threads.install(|| worker.run()))
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            context,
            capacity: shape.blocks * shape.block_size,
        })
    }

    /// Whether a prompt of `prompt` tokens leaves room to generate: in the context and in the KV
    /// cache. `submit` asks it; so does a caller about to do costly work for a prompt whose
    /// length it already knows (a vision tower), so that a prompt refused anyway costs nothing.
    pub fn admits(&self, prompt: usize) -> Result<()> {
        if prompt == 0 {
            return Err(EngineError::InvalidInput(
                "prompt: empty, but a prompt needs at least one token".into(),
            ));
        }
        if prompt >= self.context {
            return Err(EngineError::ContextLength(format!(
                "the prompt is {prompt} tokens; this model's context is {} tokens, leaving no room to generate: shorten the prompt",
                self.context
            )));
        }
        if prompt >= self.capacity {
            return Err(EngineError::ContextLength(format!(
                "the prompt is {prompt} tokens; the KV cache holds {} tokens in all: shorten the prompt or give the model more KV cache memory (kv_cache_bytes)",
                self.capacity
            )));
        }
        Ok(())
    }

    /// Enqueues `request`; its tokens come on the returned stream.
    pub fn submit(&self, request: Request) -> Result<Stream> {
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(EngineError::Stopped(
                "the model's engine thread has stopped (a bug: see the worker's log); reload the model".into(),
            ));
        }
        let prompt = request.prompt.len();
        self.admits(prompt)?;
        let max_tokens = request
            .max_tokens
            .min(self.context - prompt)
            .min(self.capacity - prompt);
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let backlog = Arc::new(AtomicUsize::new(0));
        let mut inbox = self
            .shared
            .inbox
            .lock()
            .map_err(|_| EngineError::Internal("the engine's queue is poisoned".into()))?;
        if inbox.stop {
            return Err(EngineError::Internal("the engine is shutting down".into()));
        }
        inbox.arrivals.push(Arrival {
            request,
            max_tokens,
            events,
            cancel: cancel.clone(),
            backlog: backlog.clone(),
        });
        self.shared.wake.notify_one();
        Ok(Stream {
            events: rx,
            cancel,
            backlog,
            engine: self.shared.clone(),
        })
    }

    /// Runs `request` to its end; `emit` gets each token and returns false to cancel.
    pub fn generate(
        &self,
        request: Request,
        emit: &mut dyn FnMut(Emitted) -> bool,
    ) -> Result<Outcome> {
        self.generate_until(request, emit, &|| false)
    }

    /// As [`generate`](Self::generate), also cancelling as soon as `cancelled()` says so, even
    /// before the first token (a request still waiting, or in a long prefill).
    pub fn generate_until(
        &self,
        request: Request,
        emit: &mut dyn FnMut(Emitted) -> bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Outcome> {
        const POLL: std::time::Duration = std::time::Duration::from_millis(50);
        let stream = self.submit(request)?;
        loop {
            if cancelled() {
                stream.cancel();
            }
            match stream.next_timeout(POLL) {
                Ok(Event::Token(t)) => {
                    if !emit(t) {
                        stream.cancel();
                    }
                }
                Ok(Event::Done(outcome)) => return Ok(outcome),
                Ok(Event::Failed(e)) => return Err(e),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // The thread fails every request it knows of as it ends; one that raced
                    // its end would otherwise wait forever.
                    if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                        return Err(EngineError::Stopped(
                            "the model's engine thread has stopped; reload the model".into(),
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(EngineError::Internal("the engine stopped".into()))
                }
            }
        }
    }

    /// The engine's counters as of its last step.
    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The longest sequence the model supports.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// How many positions the KV pool holds in all: the longest sequence it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(mut inbox) = self.shared.inbox.lock() {
            inbox.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `finish` for a request that ends before it runs.
fn finish_early(events: &Sender<Event>, finish: Finish) {
    let _ = events.send(Event::Done(Outcome {
        finish,
        completion_tokens: 0,
        cached_tokens: 0,
        prompt_ms: 0.0,
        decode_ms: 0.0,
        prompt_logprobs: None,
        stop_reason: None,
    }));
}
