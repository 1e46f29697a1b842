//! Text in and out: the checkpoint's `tokenizer.json`, and a streaming decoder that only ever
//! releases whole UTF-8 characters (a character split across tokens is held until complete).

use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};

/// The model's tokenizer.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec").finish_non_exhaustive()
    }
}

impl TextCodec {
    /// Loads `tokenizer.json` from the snapshot.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let path = checkpoint.path("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::MissingFile {
                path,
                hint: "the snapshot's tokenizer.json is needed to turn text into tokens",
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::BadFile {
                path: path.clone(),
                reason: format!("not a tokenizers JSON file: {e}"),
            })?;
        Ok(Self { tokenizer })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognized.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the prompt: {e}")))
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }

    /// The id of a token written out, e.g. `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Number of tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into a stream of text pieces that are always valid UTF-8.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (byte-level BPE needs the previous token).
    prefix: usize,
    /// End of what has been released.
    read: usize,
}

impl StreamDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes (empty while a character is still partial).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> String {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read]);
        let now = codec.decode(&self.ids[self.prefix..]);
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            piece
        } else {
            String::new()
        }
    }

    /// Whatever is still held at the end of generation (an incomplete character, rendered lossily).
    pub fn finish(&mut self, codec: &TextCodec) -> String {
        let before = codec.decode(&self.ids[self.prefix..self.read]);
        let now = codec.decode(&self.ids[self.prefix..]);
        self.read = self.ids.len();
        self.prefix = self.read;
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}
