//! Text in and out: the checkpoint's `tokenizer.json`, and a streaming decoder that only ever
//! releases whole UTF-8 characters (a character split across tokens is held until complete).

use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};

/// The model's tokenizer.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    /// Whether vocabulary strings spell bytes in GPT-2's byte-level alphabet.
    byte_level: bool,
    /// Added tokens by id, with whether each is a control token (see [`Self::control_ids`]);
    /// the tokenizer hands out a fresh copy of its map per call.
    added: std::collections::HashMap<u32, (String, bool)>,
    /// The added tokens marked `special`, sorted.
    special: Vec<u32>,
    /// One past the highest id, counted once: the tokenizer copies its whole vocabulary to
    /// tell (each request's id check asked).
    bound: u32,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec").finish_non_exhaustive()
    }
}

impl TextCodec {
    /// Loads `tokenizer.json` from the snapshot (or the tokenizer a GGUF file carries).
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let tokenizer = match checkpoint.gguf_tokenizer()? {
            Some(tokenizer) => tokenizer,
            None => Self::read(&checkpoint.path("tokenizer.json"))?,
        };
        let byte_level = matches!(
            tokenizer.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let decoder = tokenizer.get_added_tokens_decoder();
        let mut special: Vec<u32> = (decoder.iter())
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        special.sort_unstable();
        let added = decoder
            .into_iter()
            .map(|(id, t)| {
                let control = t.special || (t.content.starts_with('<') && t.content.ends_with('>'));
                (id, (t.content, control))
            })
            .collect();
        let bound = (tokenizer.get_vocab(true).values().max()).map_or(0, |&m| m + 1);
        Ok(Self {
            tokenizer,
            byte_level,
            added,
            special,
            bound,
        })
    }

    fn read(path: &std::path::Path) -> Result<tokenizers::Tokenizer> {
        if !path.is_file() {
            return Err(EngineError::MissingFile {
                path: path.to_owned(),
                hint: "the snapshot's tokenizer.json is needed to turn text into tokens",
            });
        }
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| EngineError::BadFile {
                path: path.to_owned(),
                reason: format!("not a tokenizers JSON file: {e}"),
            })?;
        // A file saved after a call with `truncation=True` or `padding` keeps them, and
        // `encode` would apply them to every prompt: cut it (the generation prompt lost) or
        // pad it. transformers (and vLLM) encode without them unless asked.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EngineError::BadFile {
                path: path.to_owned(),
                reason: format!("its truncation cannot be turned off: {e}"),
            })?;
        Ok(tokenizer)
    }

    /// The token's own bytes, which may be part of a UTF-8 character (what OpenAI's logprobs
    /// `bytes` carry): a byte-level vocabulary entry mapped back to its bytes, a `<0xHH>`
    /// byte-fallback piece as that byte, a special token as its text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some((content, _)) = self.added.get(&id) {
            return content.clone().into_bytes();
        }
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if self.byte_level {
            if let Some(bytes) = byte_level_bytes(&piece) {
                return bytes;
            }
        }
        if let Some(byte) = byte_fallback(&piece) {
            return vec![byte];
        }
        self.decode(&[id]).into_bytes()
    }

    /// The control tokens, rather than text: added tokens marked special, or written as a tag
    /// (`<tool_call>`, which some checkpoints leave unmarked). A grammar names these by their
    /// tag, never spells them out character by character.
    pub fn control_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (self.added.iter())
            .filter(|(_, (_, control))| *control)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The added tokens the tokenizer marks `special` (what transformers' `skip_special_tokens`
    /// leaves out), sorted.
    pub fn special_ids(&self) -> &[u32] {
        &self.special
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

    /// One past the highest token id (added tokens included): the ids a table must cover.
    pub fn id_bound(&self) -> u32 {
        self.bound
    }

    /// Number of tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// GPT-2's byte-level alphabet read back: printable Latin-1 characters stand for themselves, and
/// the other 68 bytes for U+0100 onwards, in byte order. `None` if a character is outside it.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    piece
        .chars()
        .map(|c| {
            let c = u32::from(c);
            if c < 0x100 {
                return printable(c).then_some(c as u8);
            }
            // The n-th non-printable byte is written as U+0100 + n.
            let n = c - 0x100;
            (0..=255u32)
                .filter(|b| !printable(*b))
                .nth(n as usize)
                .map(|b| b as u8)
        })
        .collect()
}

/// A SentencePiece byte-fallback piece, `<0xE4>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The most tokens held for a character to complete before they are released as they decode
/// (a margin over UTF-8's 4 bytes, for tokens of no bytes between).
const HELD_TOKENS: usize = 8;

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

    /// The released context's text and the window's, decoded. When the window no longer reads
    /// as the context plus more (the context ended in bytes of a character released lossily,
    /// which later tokens complete), the context is dropped: those bytes were shown already,
    /// and comparing against it again held everything after for good.
    fn window(&mut self, codec: &TextCodec) -> (String, String) {
        let before = codec.decode(&self.ids[self.prefix..self.read]);
        let now = codec.decode(&self.ids[self.prefix..]);
        if now.starts_with(&before) {
            return (before, now);
        }
        self.prefix = self.read;
        (String::new(), codec.decode(&self.ids[self.prefix..]))
    }

    /// Adds `id`; returns the text it completes (empty while a character is still partial).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> String {
        self.ids.push(id);
        let (before, now) = self.window(codec);
        // A character is at most 4 bytes, each token at least one: more tokens held than that
        // can never complete one (bytes that are no UTF-8, a replacement character the model
        // wrote), and holding them on re-decoded a growing window at every step.
        let hopeless = self.ids.len() - self.read > HELD_TOKENS;
        if now.len() > before.len()
            && (hopeless || !now.ends_with('\u{FFFD}'))
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            piece
        } else {
            if hopeless && now.len() == before.len() {
                // Tokens of no text (ids past the tokenizer's, which a model's padded
                // vocabulary may sample): passed over, or the window grew at every step.
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            String::new()
        }
    }

    /// Whatever is still held at the end of generation (an incomplete character, rendered lossily).
    pub fn finish(&mut self, codec: &TextCodec) -> String {
        let (before, now) = self.window(codec);
        self.read = self.ids.len();
        self.prefix = self.read;
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

/// The tiny Qwen3 fixture's codec, for unit tests.
#[cfg(test)]
pub(crate) fn fixture_codec() -> TextCodec {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
    TextCodec::load(&Checkpoint::open(&dir).unwrap()).unwrap()
}

/// [`fixture_codec`] with its `tokenizer.json` edited by `edit` first (a setting a checkpoint's
/// tokenizer may be saved with), for unit tests.
#[cfg(test)]
pub(crate) fn fixture_codec_with(edit: impl FnOnce(&mut serde_json::Value)) -> TextCodec {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut json);
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    TextCodec::load(&Checkpoint::open(dir.path()).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Truncation and padding a `tokenizer.json` was saved with are not applied to prompts.
    #[test]
    fn a_saved_truncation_or_padding_is_not_applied() {
        let codec = fixture_codec_with(|json| {
            json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
            json["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
        });
        let plain = fixture_codec();
        let text = "one two three four five six seven";
        assert_eq!(codec.encode(text).unwrap(), plain.encode(text).unwrap());
        assert!(codec.encode(text).unwrap().len() > 4);
    }

    #[test]
    fn gpt2_byte_level_letters_read_back_as_their_bytes() {
        assert_eq!(byte_level_bytes("Ġhello"), Some(b" hello".to_vec()));
        assert_eq!(byte_level_bytes("Ċ"), Some(vec![b'\n']));
        assert_eq!(byte_level_bytes("Ā"), Some(vec![0]));
        assert_eq!(byte_level_bytes("ä¸Ń"), Some("中".as_bytes().to_vec()));
        assert_eq!(byte_level_bytes("中"), None);
        assert_eq!(byte_fallback("<0xE4>"), Some(0xE4));
        assert_eq!(byte_fallback("<0xE4"), None);
    }

    /// Tokens that never make UTF-8 (a lone continuation byte, over and over) are released
    /// lossily once more are held than any character needs, not held to the end.
    #[test]
    fn bytes_that_never_complete_a_character_are_released() {
        let codec = fixture_codec();
        let lone = (0..codec.id_bound())
            .find(|&id| codec.token_bytes(id) == [0x80])
            .expect("a token of the byte 0x80");
        let mut decoder = StreamDecoder::new();
        let out: String = (0..100).map(|_| decoder.push(&codec, lone)).collect();
        assert!(out.chars().count() > 80, "{out:?}");
        assert!(out.chars().all(|c| c == '\u{FFFD}'), "{out:?}");
        // A character split across tokens is still held until it completes.
        let ids = codec.encode("中文🙂").unwrap();
        let mut decoder = StreamDecoder::new();
        let pieces: Vec<String> = ids.iter().map(|&id| decoder.push(&codec, id)).collect();
        assert_eq!(pieces.concat(), "中文🙂");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        // The bytes of a character released lossily, then completed by later tokens: what
        // follows is still released (it was held for good, then dropped at the end).
        let byte = |b: u8| {
            (0..codec.id_bound())
                .find(|&id| codec.token_bytes(id) == [b])
                .unwrap()
        };
        let mut decoder = StreamDecoder::new();
        let mut ids = vec![lone; 7];
        ids.extend([byte(0xF0), byte(0x9F), byte(0x98), byte(0x80)]);
        ids.extend(codec.encode("hello").unwrap());
        let mut out: String = ids.iter().map(|&id| decoder.push(&codec, id)).collect();
        out.push_str(&decoder.finish(&codec));
        assert!(out.ends_with("hello"), "{out:?}");
        // Tokens of no text are passed over, the window kept short.
        let none = codec.id_bound() + 3;
        assert_eq!(codec.decode(&[none]), "");
        let mut decoder = StreamDecoder::new();
        let out: String = (0..1000).map(|_| decoder.push(&codec, none)).collect();
        assert!(out.is_empty() && decoder.ids.len() - decoder.prefix <= 2 * HELD_TOKENS);
        let out: String = (codec.encode("hi").unwrap().iter())
            .map(|&id| decoder.push(&codec, id))
            .collect();
        assert_eq!(out, "hi");
    }

    #[test]
    fn token_bytes_rebuild_text_whose_characters_span_tokens() {
        let codec = fixture_codec();
        for text in [
            "中文的测试 🙂🎉",
            "naïve café — ok",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            let ids = codec.encode(text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| codec.token_bytes(id)).collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), text, "{ids:?}");
        }
        let ids = codec.encode("中文的测试 🙂🎉").unwrap();
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(&codec.token_bytes(id)).is_err()),
            "some token holds part of a character: {ids:?}"
        );
    }

    /// The special tokens are the tokenizer's `special` added tokens, as transformers'
    /// `skip_special_tokens` reads them: not ordinary vocabulary.
    #[test]
    fn special_tokens_are_the_tokenizers_marked_ones() {
        let codec = fixture_codec();
        let special = codec.special_ids();
        let end = codec.token_id("<|im_end|>").unwrap();
        assert!(special.contains(&end), "{special:?}");
        let hello = codec.encode("hello").unwrap();
        assert!(hello.iter().all(|id| !special.contains(id)), "{hello:?}");
        assert!(special.windows(2).all(|w| w[0] < w[1]), "sorted");
    }
}
