//! What one forward pass runs: new inputs of several sequences, each at its own positions and over
//! its own blocks of the shared KV pool.

use candle_core::Tensor;

use crate::kv_pool::BlockId;

/// Embeddings that replace the token embeddings of a run of a sequence's new inputs (an image's
/// patches, say): rows `at..at + values.dim(0)` of the step's inputs for that sequence.
#[derive(Debug, Clone)]
pub struct Splice {
    /// The first new input they replace.
    pub at: usize,
    /// `(rows, hidden)` in the model's dtype.
    pub values: Tensor,
    /// Features added to the same rows' hidden states after the first decoder layers, one
    /// `(rows, hidden)` per layer (Qwen3-VL's DeepStack); empty for most models.
    pub deep: Vec<Tensor>,
}

impl Splice {
    /// Rows `from..to` of it (counted from its first row), for a chunk of a prompt.
    pub fn rows(&self, from: usize, to: usize) -> candle_core::Result<Self> {
        let cut = |t: &Tensor| t.narrow(0, from, to - from);
        Ok(Self {
            at: self.at + from,
            values: cut(&self.values)?,
            deep: self
                .deep
                .iter()
                .map(cut)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// How many inputs it replaces.
    pub fn len(&self) -> usize {
        self.values.dims().first().copied().unwrap_or(0)
    }

    /// Whether it replaces nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The positions of a sequence's new inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// `start..start + len`: ordinary 1-D positions.
    Linear,
    /// One (temporal, height, width) triple per new input, for multimodal rotary embeddings
    /// (M-RoPE); `start` still counts cache slots.
    Sections(Vec<[u32; 3]>),
}

/// One sequence's part of a batch.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    /// New token ids (placeholders where `splices` replace them).
    pub tokens: &'a [u32],
    /// Embeddings spliced over some of `tokens`.
    pub splices: &'a [Splice],
    /// How many of the sequence's positions are cached already: the new inputs go at
    /// `start..start + tokens.len()`.
    pub start: usize,
    /// Their positions for the rotary embedding.
    pub positions: &'a Positions,
    /// The sequence's block table, covering at least `start + tokens.len()` positions.
    pub blocks: &'a [BlockId],
    /// What is wanted of the last new input's output (nothing for a middle chunk of a prompt).
    pub logits: Wanted,
    /// New rows whose next prompt token to score (a request for the prompt's logprobs).
    pub score: Option<crate::scoring::ScoreRows<'a>>,
}

/// What a sequence wants of a forward pass's output for its last new input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Nothing (a middle chunk of a prompt).
    Nothing,
    /// Only the most likely token (greedy, with no penalty, grammar or log-probabilities to
    /// read the row): on a GPU the arg-max is taken there and only its id comes back.
    Best,
    /// The row's `k` best entries (a sampler that draws among its top k and reads nothing else
    /// of the row): on a GPU they are found there and only `k` pairs come back.
    Top(u32),
    /// The whole row of logits.
    Logits,
}

/// A sequence's output of a forward pass, as its [`Wanted`] asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The most likely token (the lowest id among equals, as greedy sampling picks).
    Best(u32),
    /// The best entries of the row, `(id, logit)`, best first, ties to the lower id (at least
    /// the `k` that [`Wanted::Top`] asked for).
    Top(Vec<(u32, f32)>),
    /// The logits over the vocabulary.
    Logits(Vec<f32>),
}

/// A forward pass's work: the sequences in the order their logits come back.
#[derive(Debug, Clone, Default)]
pub struct Batch<'a> {
    /// The sequences.
    pub seqs: Vec<SeqStep<'a>>,
    /// The attention kernel's block tables and row lengths on the GPU, with how many sequences
    /// and rows they were built for, uploaded by the first layer that reads them: a copy from
    /// host memory waits for the device's queue, so once per step, not per layer.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) device_tables: std::sync::OnceLock<((usize, usize), Tensor)>,
    /// The pool slots of every new row, on the GPU: uploaded by the first layer that writes.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) device_slots: std::sync::OnceLock<Tensor>,
}

impl<'a> Batch<'a> {
    /// A forward pass over these sequences.
    pub fn new(seqs: Vec<SeqStep<'a>>) -> Self {
        Self {
            seqs,
            device_tables: std::sync::OnceLock::new(),
            device_slots: std::sync::OnceLock::new(),
        }
    }

    /// New inputs over all sequences.
    pub fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}
