//! One sequence driven straight through the batch seam, with a pool of its own: for benches and
//! tests that measure or inspect the model itself. Serving goes through
//! [`Engine`](crate::serving::Engine); both run the same `forward`.

use crate::batch::{Batch, Output, Positions, SeqStep, Wanted};
use crate::generate::CausalLm;
use crate::kv_pool::{BlockId, CacheType, KvPool, PoolShape};
use crate::{EngineError, Result};

/// Positions per block of a single sequence's pool.
const BLOCK: usize = 16;

/// A sequence and its private KV pool.
#[derive(Debug)]
pub struct SingleSequence {
    pool: KvPool,
    blocks: Vec<BlockId>,
    len: usize,
}

impl SingleSequence {
    /// An empty sequence that can grow to `capacity` positions, caching in the model's dtype.
    pub fn new<M: CausalLm>(model: &M, capacity: usize) -> Result<Self> {
        Self::with_cache(model, capacity, CacheType::Float(model.kv_dtype()))
    }

    /// The same, caching as `storage`.
    pub fn with_cache<M: CausalLm>(model: &M, capacity: usize, storage: CacheType) -> Result<Self> {
        let shape = PoolShape {
            block_size: BLOCK,
            blocks: capacity.div_ceil(BLOCK).max(1),
            storage,
        };
        Ok(Self {
            pool: KvPool::new(model.kv_layout(), shape, &model.device())?,
            blocks: Vec::new(),
            len: 0,
        })
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `tokens` at the next positions; returns the last one's logits.
    pub fn forward<M: CausalLm>(&mut self, model: &M, tokens: &[u32]) -> Result<Vec<f32>> {
        let end = self.len + tokens.len();
        while self.blocks.len() * BLOCK < end {
            let block = self.pool.allocator.allocate().ok_or_else(|| {
                EngineError::ContextLength(format!(
                    "the sequence would reach {end} positions; it was made for {}",
                    self.pool.shape().blocks * BLOCK
                ))
            })?;
            self.blocks.push(block);
        }
        let linear = Positions::Linear;
        let batch = Batch::new(vec![SeqStep {
            tokens,
            splices: &[],
            start: self.len,
            positions: &linear,
            blocks: &self.blocks,
            logits: Wanted::Logits,
            score: None,
        }]);
        let mut outputs = crate::cpu::step(model, &batch, &mut self.pool)?;
        self.len = end;
        match outputs.pop() {
            Some(Output::Logits(logits)) => Ok(logits),
            _ => Err(EngineError::Internal("the model returned no logits".into())),
        }
    }

    /// Runs `tokens` in chunks of `chunk`; returns the logits after the last one.
    pub fn prefill<M: CausalLm>(
        &mut self,
        model: &M,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        for part in tokens.chunks(chunk.max(1)) {
            logits = self.forward(model, part)?;
        }
        Ok(logits)
    }
}
