//! Structured output: a grammar (JSON Schema, regex or Lark) turned into the set of tokens the
//! model may sample at each step, with llguidance over the model's own vocabulary. The mask for
//! the next step is computed on a thread of its own while the engine runs the forward pass, so a
//! constrained step costs little more than a free one.

mod vocabulary;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};
use pio_plugin_api::wire::{guidance_schema, Constraint, Grammar};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::text::TextCodec;
use vocabulary::Vocabulary;

/// Compiles grammars for one model (the vocabulary's trie is built on first use).
pub struct Grammars {
    codec: Arc<TextCodec>,
    eos: Vec<u32>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("eos", &self.eos).finish()
    }
}

impl Grammars {
    /// Grammars over `codec`'s vocabulary, ending generation with any of `eos`.
    pub fn new(codec: Arc<TextCodec>, eos: Vec<u32>) -> Self {
        Self {
            codec,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        let made = self.factory.get_or_init(|| {
            let bound = self.codec.id_bound();
            if self.eos.is_empty() || self.eos.iter().any(|&e| e >= bound) {
                return Err(format!(
                    "constrained output needs the model's end-of-sequence tokens: \
                     generation_config.json's eos_token_id ({:?}) must name tokens of the \
                     vocabulary (0..{bound})",
                    self.eos
                ));
            }
            let env: TokEnv = Arc::new(Vocabulary::new(self.codec.clone(), &self.eos));
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        made.as_ref()
            .map_err(|e| EngineError::Unsupported(e.clone()))
    }

    /// Compiles `constraint`; a grammar or schema llguidance refuses is invalid input, named.
    pub fn compile(&self, constraint: &Constraint) -> Result<Compiled> {
        let (what, grammar) = match &constraint.grammar {
            Grammar::JsonSchema(schema) => (
                "the JSON schema",
                TopLevelGrammar::from_json_schema(guidance_schema(schema)),
            ),
            Grammar::Regex(rx) => ("the regex", TopLevelGrammar::from_regex(rx)),
            Grammar::Lark(lark) => ("the grammar", TopLevelGrammar::from_lark(lark.clone())),
        };
        let refused = |e: &dyn std::fmt::Display| {
            let at = match &constraint.grammar {
                Grammar::JsonSchema(schema) => locate(schema, &e.to_string())
                    .map(|p| format!(" (at {})", if p.is_empty() { "/" } else { &p }))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let lark = matches!(constraint.grammar, Grammar::Lark(_));
            EngineError::Constraint(format!(
                "{what} cannot be used: {}{at}",
                reason(&e.to_string(), lark)
            ))
        };
        let parser = self
            .factory()?
            .create_parser(grammar)
            .map_err(|e| refused(&e))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(refused(&e));
        }
        // A grammar that parses can still be one no output can follow (`start: start`, a lexer
        // too large): its first mask says so, here, before the request is taken.
        if let Err(e) = matcher.compute_mask_or_eos() {
            return Err(refused(&e));
        }
        Ok(Compiled {
            matcher,
            eos: self.eos.clone(),
            after: constraint
                .after
                .as_ref()
                .map(|a| a.as_bytes().to_vec())
                .filter(|a| !a.is_empty()),
        })
    }
}

/// Why llguidance refused a constraint, in a line: its first, without the position in the grammar
/// it made from a schema or a regex (`at 1(8): `, which the client never wrote), and when that
/// line only introduces the reason (a regex's `regex parse error:`), the reason's own line.
fn reason(e: &str, lark: bool) -> String {
    let mut line = first_line(e);
    if !lark {
        if let Some(rest) = strip_position(&line) {
            line = rest.to_string();
        }
    }
    if line.ends_with(':') {
        if let Some(why) = e.lines().map(str::trim).find(|l| l.starts_with("error:")) {
            line = format!(
                "{line} {}",
                first_line(why.trim_start_matches("error:").trim())
            );
        }
    }
    line
}

/// `rest` of `at LINE(COLUMN): rest`.
fn strip_position(line: &str) -> Option<&str> {
    let (at, rest) = line.split_once("): ")?;
    let digits = at.strip_prefix("at ")?.replace('(', "");
    digits.chars().all(|c| c.is_ascii_digit()).then_some(rest)
}

/// An error's first line, at most 300 characters: llguidance follows some with its whole state.
fn first_line(e: &str) -> String {
    let line = e.lines().next().unwrap_or_default();
    match line.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_string(),
    }
}

/// Where in `schema` the problem llguidance reports lies, as a JSON pointer: the first place
/// holding a key it names (`Unimplemented keys: ["uniqueItems"]`) or the value it quotes
/// (`Unknown format: bogus`, `Invalid type: strin`).
fn locate(schema: &Value, error: &str) -> Option<String> {
    let keys: Vec<&str> = error
        .split_once("Unimplemented keys: [")
        .map(|(_, rest)| rest.split(']').next().unwrap_or_default())
        .map(|list| {
            list.split(',')
                .map(|k| k.trim().trim_matches('"'))
                .collect()
        })
        .unwrap_or_default();
    let value = ["Unknown format: ", "Invalid type: "]
        .iter()
        .find_map(|p| error.split_once(p).map(|(_, v)| v.trim()));
    let hit = |map: &serde_json::Map<String, Value>| {
        keys.iter().any(|k| map.contains_key(*k))
            || value.is_some_and(|v| {
                ["format", "type"]
                    .iter()
                    .any(|f| map.get(*f).and_then(Value::as_str) == Some(v))
            })
    };
    find(schema, "", &hit)
}

/// Depth-first search for the first object `hit` accepts; its pointer.
fn find(
    v: &Value,
    at: &str,
    hit: &dyn Fn(&serde_json::Map<String, Value>) -> bool,
) -> Option<String> {
    match v {
        Value::Object(map) => {
            if hit(map) {
                return Some(at.to_string());
            }
            map.iter().find_map(|(k, child)| {
                let k = k.replace('~', "~0").replace('/', "~1");
                find(child, &format!("{at}/{k}"), hit)
            })
        }
        Value::Array(items) => {
            (items.iter().enumerate()).find_map(|(i, child)| find(child, &format!("{at}/{i}"), hit))
        }
        _ => None,
    }
}

/// A compiled constraint, ready for a sequence.
pub struct Compiled {
    matcher: Matcher,
    eos: Vec<u32>,
    after: Option<Vec<u8>>,
}

impl Clone for Compiled {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
            after: self.after.clone(),
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field(
                "after",
                &self.after.as_ref().map(|a| String::from_utf8_lossy(a)),
            )
            .finish_non_exhaustive()
    }
}

/// The allowed tokens of one step and the time computing them took, or why there are none.
type MaskResult = std::result::Result<(SimpleVob, std::time::Duration), String>;

/// A sequence's constraint while it generates: the matcher lives on its own thread, which
/// computes the next mask as soon as it learns the last token.
#[derive(Debug)]
pub struct Guide {
    /// The marker the grammar waits for, and the output's last bytes while it waits.
    waiting_for: Option<(Vec<u8>, Vec<u8>)>,
    /// End-of-sequence tokens, barred while the grammar waits (the output must reach it).
    eos: Vec<u32>,
    /// The mask while it waits (everything but `eos`), made once.
    free: Option<SimpleVob>,
    tokens: Sender<u32>,
    masks: Receiver<MaskResult>,
    /// What computing the last mask took.
    last_compute: std::time::Duration,
}

impl Guide {
    /// Starts `compiled`'s matcher thread (its first mask is computed at once).
    pub fn start(compiled: Compiled) -> Result<Self> {
        let Compiled {
            mut matcher,
            eos,
            after,
        } = compiled;
        let (tokens, inbox) = mpsc::channel::<u32>();
        let (outbox, masks) = mpsc::channel::<MaskResult>();
        std::thread::Builder::new()
            .name("pio-guide".into())
            .spawn(move || {
                let mut started = std::time::Instant::now();
                loop {
                    let mask = (matcher.compute_mask_or_eos())
                        .map(|m| (m, started.elapsed()))
                        .map_err(|e| e.to_string());
                    let failed = mask.is_err();
                    if outbox.send(mask).is_err() || failed {
                        return;
                    }
                    let Ok(token) = inbox.recv() else { return };
                    started = std::time::Instant::now();
                    if let Err(e) = matcher.consume_token(token) {
                        let _ = outbox.send(Err(e.to_string()));
                        return;
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start a grammar thread: {e}")))?;
        Ok(Self {
            waiting_for: after.map(|a| (a, Vec::new())),
            eos,
            free: None,
            tokens,
            masks,
            last_compute: std::time::Duration::ZERO,
        })
    }

    /// Whether the grammar applies (it is not waiting for its marker).
    pub fn is_active(&self) -> bool {
        self.waiting_for.is_none()
    }

    /// What computing the last mask [`Guide::allowed`] returned took.
    pub fn last_compute(&self) -> std::time::Duration {
        self.last_compute
    }

    /// The tokens allowed next (of `vocab` ids), or `None` for all. While the grammar waits for
    /// its marker, anything but the end of the sequence is.
    pub fn allowed(&mut self, vocab: usize) -> Option<Result<SimpleVob>> {
        if self.waiting_for.is_some() {
            if self.eos.is_empty() {
                return None;
            }
            let eos = &self.eos;
            let free = self.free.get_or_insert_with(|| {
                let mut free = SimpleVob::alloc_ones(vocab);
                for &e in eos.iter().filter(|&&e| (e as usize) < vocab) {
                    free.disallow_token(e);
                }
                free
            });
            return Some(Ok(free.clone()));
        }
        Some(match self.masks.recv() {
            Ok(Ok((mask, took))) => {
                self.last_compute = took;
                Ok(mask)
            }
            // What the client's grammar asked proved too much for it midway.
            Ok(Err(e)) => Err(EngineError::Constraint(format!(
                "the output grammar cannot be followed further: {}; simplify it",
                first_line(&e)
            ))),
            Err(_) => Err(EngineError::Internal(
                "the output grammar's thread ended".into(),
            )),
        })
    }

    /// Records the sampled `token`: the matcher consumes it, or the marker the grammar waits for
    /// comes closer.
    pub fn advance(&mut self, token: u32, codec: &TextCodec) {
        match &mut self.waiting_for {
            None => {
                // A closed channel means the thread failed; its error waits in `masks`.
                let _ = self.tokens.send(token);
            }
            Some((marker, seen)) => {
                seen.extend_from_slice(&codec.token_bytes(token));
                if seen.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    self.waiting_for = None;
                } else {
                    let keep = seen.len().saturating_sub(marker.len());
                    seen.drain(..keep);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
