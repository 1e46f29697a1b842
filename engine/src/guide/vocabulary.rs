//! The model's vocabulary as llguidance sees it: every token's bytes in a trie, control tokens
//! kept apart from text so no grammar can spell an end-of-turn token inside a JSON string.

use std::sync::Arc;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::text::TextCodec;

/// The trie over the vocabulary, and the tokenizer for text a grammar forces.
pub(super) struct Vocabulary {
    trie: TokTrie,
    codec: Arc<TextCodec>,
    /// Sorted.
    control: Vec<u32>,
}

impl Vocabulary {
    /// The vocabulary of `codec`; generation may end with any of `eos` (at least one).
    pub(super) fn new(codec: Arc<TextCodec>, eos: &[u32]) -> Self {
        let bound = codec.id_bound();
        let control = codec.control_ids();
        let words: Vec<Vec<u8>> = (0..bound)
            .map(|id| {
                let bytes = codec.token_bytes(id);
                if control.binary_search(&id).is_ok() || bytes.is_empty() {
                    // llguidance's mark for a token named by its tag (`<|im_end|>`) or by its
                    // id (`<[123]>`), never matched as text.
                    let name = if bytes.is_empty() {
                        format!("<[{id}]>").into_bytes()
                    } else {
                        bytes
                    };
                    [vec![TokTrie::SPECIAL_TOKEN_MARKER], name].concat()
                } else {
                    bytes
                }
            })
            .collect();
        let info = TokRxInfo::new(bound, eos.first().copied().unwrap_or(0));
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        Self {
            trie,
            codec,
            control,
        }
    }
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let ids = self
            .trie
            .tokenize_with_greedy_fallback(s, |text| self.codec.encode(text).unwrap_or_default());
        // The tokenizer reads a control tag written in text (`<|im_end|>`) as the token; text a
        // grammar forces stays text, spelled from the trie, where tags are not text. And its
        // normalizer (NFC in Qwen's) may spell other bytes than those forced (`e` + U+0301 as
        // `é`): llguidance takes the first token as given, and the grammar then refused it.
        let spelled = ids.iter().flat_map(|&id| self.trie.token(id)).copied();
        if ids.iter().any(|id| self.control.binary_search(id).is_ok())
            || !spelled.eq(s.iter().copied())
        {
            self.trie.greedy_tokenize(s)
        } else {
            ids
        }
    }
}
