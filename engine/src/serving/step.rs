//! The engine thread: its sequences and one step of the loop.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use super::{
    finish_early, Arrival, EngineConfig, Event, Shared, Stats, PAUSE_BACKLOG, RESUME_BACKLOG,
};
use crate::batch::{Batch, Output, Positions, SeqStep, Splice, Wanted};
use crate::generate::{CausalLm, Finish, Media, Outcome};
use crate::kv_pool::{BlockId, KvPool, PrefixHash};
use crate::scheduler::{self, Limits, Plan, Running, Waiting};
use crate::scoring::PromptScores;
use crate::sequence::{accept_all, Accepted, Decoding};
use crate::text::TextCodec;
use crate::EngineError;

/// A sequence's positions and spliced embeddings for one step.
type StepInput = (Positions, Vec<Splice>);

/// What a panic said.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// One request inside the engine.
struct Seq {
    id: u64,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// `tokens` as the prefix cache keys them, where they differ (a multimodal prompt's
    /// placeholders keyed by their image's content); see [`Seq::keys`].
    image_keys: Option<Vec<u32>>,
    /// Images and M-RoPE positions of a multimodal prompt.
    media: Option<Arc<Media>>,
    /// Tokens whose cache entries are in the pool.
    computed: usize,
    blocks: Vec<BlockId>,
    /// The chain hash of each full block of `tokens` (kept as tokens arrive: one hash per block
    /// in the sequence's life, not one per step it waits).
    block_hashes: Vec<PrefixHash>,
    /// Leading blocks already in the prefix cache (registered, or found there).
    registered: usize,
    decoding: Decoding,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    /// Tokens sent that its reader has not taken yet.
    backlog: Arc<AtomicUsize>,
    /// Paused (see [`Seq::paused`]), as of the start of this step.
    held: bool,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_tokens: Option<usize>,
    arrived: Instant,
    first_token: Option<Instant>,
    /// The prompt's scores, when the request asked for them.
    scores: Option<PromptScores>,
}

impl Seq {
    /// Appends a sampled token, hashing the block it completes.
    fn push_token(&mut self, token: u32, block_size: usize) {
        self.tokens.push(token);
        if let Some(keys) = &mut self.image_keys {
            keys.push(token);
        }
        if self.tokens.len().is_multiple_of(block_size) {
            let block = &self.keys()[self.tokens.len() - block_size..];
            let parent = self.block_hashes.last().copied();
            self.block_hashes.push(PrefixHash::chain(parent, block));
        }
    }

    /// Whether its prompt has rows still to score (then it cannot start from the prefix cache,
    /// whose rows produce no logits, and recomputes from the start).
    fn scoring(&self) -> bool {
        self.scores.as_ref().is_some_and(PromptScores::incomplete)
    }

    /// Its full blocks the prefix cache may serve: all but the one holding its last token, whose
    /// logits it needs.
    fn cacheable_blocks(&self, block_size: usize) -> usize {
        (self.tokens.len() - 1) / block_size
    }

    /// What the prefix cache hashes and compares: the tokens, or their image-aware keys.
    fn keys(&self) -> &[u32] {
        self.image_keys.as_deref().unwrap_or(&self.tokens)
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Whether its reader has fallen behind: then it waits, generating nothing, from
    /// [`PAUSE_BACKLOG`] unread tokens until its reader is down to [`RESUME_BACKLOG`].
    fn paused(&self) -> bool {
        self.held
    }

    /// Sets [`Seq::paused`] for the step about to be planned.
    fn refresh_pause(&mut self) {
        let unread = self.backlog.load(Ordering::Acquire);
        self.held = match self.held {
            true => unread > RESUME_BACKLOG,
            false => unread >= PAUSE_BACKLOG,
        };
    }

    /// Whether it is paused and its reader has not since read enough to resume it (read now,
    /// under the lock a reader takes to wake the engine, so that no wake-up falls between).
    fn stays_paused(&self) -> bool {
        self.held && self.backlog.load(Ordering::Acquire) > RESUME_BACKLOG
    }

    fn outcome(&self, finish: Finish) -> Outcome {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        Outcome {
            finish,
            completion_tokens: self.decoding.generated().len(),
            cached_tokens: self.cached_tokens.unwrap_or(0),
            prompt_ms: (first - self.arrived).as_secs_f64() * 1e3,
            decode_ms: (now - first).as_secs_f64() * 1e3,
            prompt_logprobs: self.scores.as_ref().map(PromptScores::taken),
            stop_reason: self.decoding.stop_reason(),
        }
    }
}

/// The state the engine thread owns.
pub(super) struct Worker<M> {
    model: Arc<M>,
    codec: Arc<TextCodec>,
    pool: KvPool,
    config: EngineConfig,
    shared: Arc<Shared>,
    /// Oldest first.
    running: Vec<Seq>,
    /// Oldest first (a preempted sequence goes back to its place).
    waiting: VecDeque<Seq>,
    next_id: u64,
    stats: Stats,
    /// Requests' last events, sent once the step's figures are published (so a caller that
    /// has its answer sees the engine as it left it).
    outbox: Vec<(Sender<Event>, Event)>,
}

impl<M: CausalLm> Worker<M> {
    pub(super) fn new(
        model: Arc<M>,
        codec: Arc<TextCodec>,
        pool: KvPool,
        config: EngineConfig,
        shared: Arc<Shared>,
    ) -> Self {
        let stats = shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
        Self {
            model,
            codec,
            pool,
            config,
            shared,
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            stats,
            outbox: Vec::new(),
        }
    }

    /// Steps until the engine is dropped, then fails what is left. A panic outside the model's
    /// forward pass (which has its own guard) ends the thread the same way, with every request
    /// told why, never left waiting.
    pub(super) fn run(mut self) {
        let (why, panicked) = loop {
            let step = catch_unwind(AssertUnwindSafe(|| {
                if !self.take_arrivals() {
                    return false;
                }
                self.drop_cancelled();
                for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
                    s.refresh_pause();
                }
                let plan = self.plan();
                self.apply(&plan);
                self.publish();
                if plan.is_idle() {
                    self.doze();
                }
                true
            }));
            for (to, event) in self.outbox.drain(..) {
                let _ = to.send(event);
            }
            match step {
                Ok(true) => continue,
                Ok(false) => break ("the model was unloaded while the request ran".into(), false),
                Err(p) => {
                    let why = format!("the engine failed ({}); reload the model", panic_text(&*p));
                    break (why, true);
                }
            }
        };
        let queued: Vec<Arrival> = match self.shared.inbox.lock() {
            Ok(mut inbox) => {
                inbox.stop = true;
                inbox.arrivals.drain(..).collect()
            }
            Err(p) => p.into_inner().arrivals.drain(..).collect(),
        };
        let events = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .map(|s| s.events)
            .chain(queued.into_iter().map(|a| a.events));
        let failure = match panicked {
            true => EngineError::Stopped,
            false => EngineError::Internal,
        };
        for to in events {
            let _ = to.send(Event::Failed(failure(why.clone())));
        }
    }

    /// Waits, briefly, for something to change when every running sequence is paused: a reader
    /// taking a token or a new arrival wakes the thread (the timeout covers a cancellation).
    fn doze(&self) {
        const NAP: std::time::Duration = std::time::Duration::from_millis(50);
        if let Ok(inbox) = self.shared.inbox.lock() {
            if inbox.arrivals.is_empty()
                && !inbox.stop
                && self.running.iter().all(Seq::stays_paused)
            {
                let _ = self.shared.wake.wait_timeout(inbox, NAP);
            }
        }
    }

    /// Moves new requests into the waiting queue, sleeping while there is nothing to do;
    /// false once the engine is stopping.
    fn take_arrivals(&mut self) -> bool {
        let Ok(mut inbox) = self.shared.inbox.lock() else {
            return false;
        };
        while inbox.arrivals.is_empty()
            && !inbox.stop
            && self.running.is_empty()
            && self.waiting.is_empty()
        {
            inbox = match self.shared.wake.wait(inbox) {
                Ok(i) => i,
                Err(_) => return false,
            };
        }
        if inbox.stop {
            return false;
        }
        let arrivals: Vec<Arrival> = inbox.arrivals.drain(..).collect();
        drop(inbox);
        for mut a in arrivals {
            if a.max_tokens == 0 {
                finish_early(&a.events, Finish::Length);
                continue;
            }
            let decoding = match Decoding::taking(&mut a.request, a.max_tokens) {
                Ok(d) => d,
                Err(e) => {
                    let _ = a.events.send(Event::Failed(e));
                    continue;
                }
            };
            self.next_id += 1;
            let media = a.request.media.clone();
            let image_keys = media.as_ref().map(|m| m.cache_keys.clone());
            let keys = image_keys.as_deref().unwrap_or(&a.request.prompt);
            self.waiting.push_back(Seq {
                id: self.next_id,
                tokens: a.request.prompt.clone(),
                block_hashes: PrefixHash::of_blocks(keys, self.pool.block_size()),
                image_keys,
                media,
                computed: 0,
                blocks: Vec::new(),
                registered: 0,
                decoding,
                events: a.events,
                cancel: a.cancel,
                backlog: a.backlog,
                held: false,
                cached_tokens: None,
                arrived: Instant::now(),
                first_token: None,
                scores: (a.request.prompt_logprobs)
                    .map(|top| PromptScores::new(a.request.prompt.len(), top)),
            });
        }
        true
    }

    fn release(&mut self, seq: &mut Seq) {
        // Last block first: a prefix's first block becomes idle last, so eviction takes a
        // chain's tail before its head (a head gone would orphan every block after it).
        for b in seq.blocks.drain(..).rev() {
            self.pool.allocator.release(b);
        }
        seq.registered = 0;
        seq.computed = 0;
    }

    fn drop_cancelled(&mut self) {
        let (gone, kept): (Vec<Seq>, Vec<Seq>) = self.running.drain(..).partition(Seq::cancelled);
        self.running = kept;
        let (gone_waiting, kept): (Vec<Seq>, Vec<Seq>) =
            self.waiting.drain(..).partition(Seq::cancelled);
        self.waiting = kept.into();
        for mut seq in gone.into_iter().chain(gone_waiting) {
            self.release(&mut seq);
            let event = Event::Done(seq.outcome(Finish::Cancelled));
            self.outbox.push((seq.events, event));
        }
    }

    /// The cached full blocks a waiting sequence can start from (always leaving its last token
    /// to compute, whose logits it needs).
    fn cached_prefix(&self, seq: &Seq) -> Vec<BlockId> {
        if !self.config.prefix_cache || seq.scoring() {
            return Vec::new();
        }
        let usable = seq.cacheable_blocks(self.pool.block_size());
        self.pool
            .allocator
            .lookup(seq.keys(), &seq.block_hashes[..usable])
    }

    /// Whether block `next` of the `i`th waiting sequence's prompt (the first past its cached
    /// prefix) is being computed by a running sequence, or will be by one ahead of it in the
    /// queue, to land in the prefix cache within a few steps.
    fn prefix_pending(&self, i: usize, next: usize) -> bool {
        let seq = &self.waiting[i];
        let usable = seq.cacheable_blocks(self.pool.block_size());
        if next >= usable || !self.config.prefix_cache || seq.scoring() {
            return false;
        }
        // Equal chain hashes mean equal prefixes up to that block. A running sequence computes
        // it next if it has registered every block before it (one behind, a scored prompt
        // recomputing from the start, say, is not waited for); one ahead in the queue starts
        // where this one would, unless it is a scored prompt, which starts from the beginning.
        let hash = Some(&seq.block_hashes[next]);
        let running =
            |s: &Seq| s.block_hashes.get(next) == hash && s.registered == next && !s.paused();
        let ahead = |s: &Seq| {
            s.block_hashes.get(next) == hash && (next == 0 || !s.scoring()) && !s.paused()
        };
        self.running.iter().any(running) || self.waiting.iter().take(i).any(ahead)
    }

    fn plan(&self) -> Plan {
        let running: Vec<Running> = self
            .running
            .iter()
            .map(|s| Running {
                id: s.id,
                tokens: s.tokens.len(),
                computed: s.computed,
                blocks: s.blocks.len(),
                own_blocks: s
                    .blocks
                    .iter()
                    .filter(|&&b| self.pool.allocator.holders(b) == 1)
                    .count(),
                paused: s.paused(),
            })
            .collect();
        let bs = self.pool.block_size();
        // The blocks paused sequences hold, once a plan (none, most steps).
        let paused_blocks: std::collections::HashSet<_> = (self.running.iter())
            .filter(|r| r.paused())
            .flat_map(|r| r.blocks.iter().copied())
            .collect();
        let waiting: Vec<Waiting> = (self.waiting.iter().enumerate())
            .map(|(i, s)| {
                let found = self.cached_prefix(s);
                Waiting {
                    id: s.id,
                    tokens: s.tokens.len(),
                    cached: found.len() * bs,
                    cached_held: found
                        .iter()
                        .filter(|&&b| self.pool.allocator.holders(b) > 0)
                        .count(),
                    cached_own_paused: (found.iter())
                        .filter(|&b| paused_blocks.contains(b))
                        .filter(|&&b| self.pool.allocator.holders(b) == 1)
                        .count(),
                    paused: s.paused(),
                    prefix_pending: self.prefix_pending(i, found.len()),
                }
            })
            .collect();
        scheduler::schedule(&scheduler::State {
            running: &running,
            waiting: &waiting,
            free_blocks: self.pool.allocator.available(),
            limits: Limits {
                block_size: bs,
                token_budget: self.config.token_budget,
                max_seqs: self.config.max_seqs,
            },
        })
    }

    /// Carries out `plan`: preemptions, admissions, block allocation, the forward pass and
    /// what its logits produce.
    fn apply(&mut self, plan: &Plan) {
        for id in &plan.preempt {
            if let Some(i) = self.running.iter().position(|s| s.id == *id) {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                self.stats.preemptions += 1;
                let at = self.waiting.partition_point(|w| w.id < seq.id);
                self.waiting.insert(at, seq);
            }
        }
        for id in &plan.admit {
            let Some(i) = self.waiting.iter().position(|s| s.id == *id) else {
                continue;
            };
            let Some(mut seq) = self.waiting.remove(i) else {
                continue;
            };
            let found = self.cached_prefix(&seq);
            for &b in &found {
                self.pool.allocator.share(b);
            }
            let bs = self.pool.block_size();
            seq.computed = found.len() * bs;
            seq.registered = found.len();
            seq.blocks = found;
            if seq.cached_tokens.is_none() {
                // A prompt to score does not look in the cache: not a lookup that missed.
                if !seq.scoring() {
                    self.stats.prefix_lookup_tokens += seq.tokens.len() as u64;
                    self.stats.prefix_hit_tokens += seq.computed as u64;
                }
                seq.cached_tokens = Some(seq.computed);
            }
            // Behind every running sequence, whatever its id: one that was preempted or held
            // back and comes back now is the newest to run (as vLLM's rescheduled requests).
            // Put at its arrival place, it took the step's budget first and preempted the
            // streams that kept reading when it ran short of blocks.
            self.running.push(seq);
        }
        if plan.is_idle() {
            return;
        }
        self.run_batch(plan);
    }

    fn run_batch(&mut self, plan: &Plan) {
        // Blocks first; then the batch in plan order.
        let order = self.grow(plan);
        self.stats.blocks_peak = self.stats.blocks_peak.max(self.pool.allocator.in_use());
        let inputs = match self.step_inputs(&order) {
            Ok(inputs) => inputs,
            Err((id, e)) => {
                if let Some(i) = self.running.iter().position(|s| s.id == id) {
                    let mut seq = self.running.remove(i);
                    self.release(&mut seq);
                    self.outbox.push((seq.events, Event::Failed(e)));
                }
                return;
            }
        };
        let result = self.forward(&order, &inputs);
        self.stats.steps += 1;
        self.stats.batched_seqs += order.len() as u64;
        self.stats.last_batch = order.len();
        match result {
            Ok(logits) => self.advance(&order, logits),
            Err(e) => self.fail(&order, &e),
        }
    }

    /// Gives each planned sequence the blocks its tokens need; returns the batch in plan order,
    /// `(id, tokens)`. Fewer blocks than planned (the plan is an estimate of what the pool
    /// gives): a sequence runs what fits, or waits for blocks like a preempted one — never fails.
    fn grow(&mut self, plan: &Plan) -> Vec<(u64, usize)> {
        let mut order = Vec::with_capacity(plan.work.len());
        let bs = self.pool.block_size();
        for w in &plan.work {
            let Some(i) = self.running.iter().position(|s| s.id == w.id) else {
                continue;
            };
            let end = self.running[i].computed + w.tokens;
            while self.running[i].blocks.len() * bs < end {
                match self.pool.allocator.allocate() {
                    Some(b) => self.running[i].blocks.push(b),
                    None => break,
                }
            }
            let room = (self.running[i].blocks.len() * bs).saturating_sub(self.running[i].computed);
            let tokens = w.tokens.min(room);
            if tokens == 0 {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                self.stats.preemptions += 1;
                let at = self.waiting.partition_point(|x| x.id < seq.id);
                self.waiting.insert(at, seq);
                continue;
            }
            order.push((w.id, tokens));
        }
        order
    }

    /// One forward pass over the batch `order` with its `inputs`; a panic in the model becomes
    /// an error of the step (its sequences fail, the engine goes on).
    fn forward(
        &mut self,
        order: &[(u64, usize)],
        inputs: &[StepInput],
    ) -> crate::Result<Vec<Output>> {
        let steps: Vec<SeqStep<'_>> = order
            .iter()
            .zip(inputs)
            .filter_map(|((id, n), (positions, splices))| {
                let s = self.running.iter().find(|s| s.id == *id)?;
                Some(SeqStep {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    splices,
                    start: s.computed,
                    positions,
                    blocks: &s.blocks,
                    logits: if s.computed + n == s.tokens.len() {
                        s.decoding.wants()
                    } else {
                        Wanted::Nothing
                    },
                    score: (s.scores.as_ref()).and_then(|sc| sc.rows(&s.tokens, s.computed, *n)),
                })
            })
            .collect();
        let batch = Batch::new(steps);
        let (model, pool) = (&self.model, &mut self.pool);
        let profile = &crate::profile::PROFILE;
        profile.tokens(batch.seqs.iter().map(|s| s.tokens.len()).sum());
        let _timed = profile.scope(crate::profile::Op::Forward);
        catch_unwind(AssertUnwindSafe(|| {
            crate::cpu::step(model.as_ref(), &batch, pool)
        }))
        .unwrap_or_else(|p| {
            Err(EngineError::Internal(format!(
                "the model panicked in a forward pass: {}",
                panic_text(&*p)
            )))
        })
    }

    /// Ends the sequences of `order` that are still running with `error`, freeing their blocks.
    fn fail(&mut self, order: &[(u64, usize)], error: &EngineError) {
        for (id, _) in order {
            if let Some(i) = self.running.iter().position(|s| s.id == *id) {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                self.outbox
                    .push((seq.events, Event::Failed(error.duplicate())));
            }
        }
    }

    /// Each sequence's positions and spliced embeddings for the inputs it runs this step, in
    /// `order`; a sequence whose media cannot be cut is returned with the reason.
    fn step_inputs(&self, order: &[(u64, usize)]) -> Result<Vec<StepInput>, (u64, EngineError)> {
        order
            .iter()
            .map(|&(id, n)| {
                let seq = self.running.iter().find(|s| s.id == id);
                match seq.and_then(|s| s.media.as_ref().map(|m| (s.computed, m))) {
                    None => Ok((Positions::Linear, Vec::new())),
                    Some((from, m)) => {
                        let splices = m.splices(from, from + n).map_err(|e| (id, e.into()))?;
                        Ok((Positions::Sections(m.positions(from, from + n)), splices))
                    }
                }
            })
            .collect()
    }

    /// Records what the step computed, caches newly full blocks, and samples where logits came.
    fn advance(&mut self, order: &[(u64, usize)], logits: Vec<Output>) {
        let bs = self.pool.block_size();
        let mut finished = Vec::new();
        let outputs = self.record(order, logits, &mut finished);
        let mut results = self.accept(outputs);
        for &(id, _) in order {
            let (Some(accepted), Some(seq)) = (
                results.remove(&id),
                self.running.iter_mut().find(|s| s.id == id),
            ) else {
                continue;
            };
            let accepted = match accepted {
                Ok(a) => a,
                Err(e) => {
                    finished.push((id, Err(e)));
                    continue;
                }
            };
            seq.first_token.get_or_insert_with(Instant::now);
            self.stats.guided += accepted.guided;
            let token = accepted.emitted.token_id;
            seq.backlog.fetch_add(1, Ordering::AcqRel);
            let delivered = seq.events.send(Event::Token(accepted.emitted)).is_ok();
            match (accepted.finish, delivered) {
                (Some(f), _) => finished.push((id, Ok(f))),
                (None, false) => finished.push((id, Ok(Finish::Cancelled))),
                (None, true) => seq.push_token(token, bs),
            }
        }
        for (id, end) in finished {
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                let event = match end {
                    Ok(f) => Event::Done(seq.outcome(f)),
                    Err(e) => Event::Failed(e),
                };
                self.outbox.push((seq.events, event));
            }
        }
    }

    /// Counts each sequence's computed tokens and caches its newly full blocks; the output of
    /// each sequence whose inputs are all in, by id (one missing is an error in `finished`).
    fn record(
        &mut self,
        order: &[(u64, usize)],
        logits: Vec<Output>,
        finished: &mut Vec<(u64, Result<Finish, EngineError>)>,
    ) -> HashMap<u64, Output> {
        let mut logits = logits.into_iter();
        let bs = self.pool.block_size();
        let mut outputs = HashMap::with_capacity(order.len());
        for &(id, n) in order {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            seq.computed += n;
            if self.config.prefix_cache {
                while seq.registered < seq.computed / bs {
                    let b = seq.registered;
                    let parent = b.checked_sub(1).map(|p| seq.block_hashes[p]);
                    let keys = &seq.keys()[b * bs..(b + 1) * bs];
                    self.pool
                        .allocator
                        .cache(seq.blocks[b], parent, keys, seq.block_hashes[b]);
                    seq.registered += 1;
                }
            }
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let Some(row) = logits.next() else {
                let why = "the model returned fewer logits than asked";
                finished.push((id, Err(EngineError::Internal(why.into()))));
                continue;
            };
            outputs.insert(id, row);
        }
        outputs
    }

    /// Every output's token at once (in parallel where they scan the vocabulary), by id.
    fn accept(
        &mut self,
        mut outputs: HashMap<u64, Output>,
    ) -> HashMap<u64, crate::Result<Accepted>> {
        let mut rows = Vec::with_capacity(outputs.len());
        let mut ids = Vec::with_capacity(outputs.len());
        for seq in self.running.iter_mut() {
            if let Some(output) = outputs.remove(&seq.id) {
                ids.push(seq.id);
                rows.push((&mut seq.decoding, output));
            }
        }
        let results = accept_all(&mut rows, &self.codec);
        ids.into_iter().zip(results).collect()
    }

    fn publish(&mut self) {
        let a = &self.pool.allocator;
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.blocks_used = a.in_use();
        self.stats.blocks_peak = self.stats.blocks_peak.max(a.in_use());
        self.stats.blocks_free = a.available();
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = self.stats.clone();
        }
    }
}
