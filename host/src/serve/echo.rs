//! The prompt in an answer: completions' `echo` (the prompt's text before the output's, and
//! with `logprobs` its tokens first in the legacy logprobs, the first token's `null` as
//! OpenAI's) and vLLM's `prompt_logprobs` (per prompt token, the token and its best
//! alternatives keyed by id, with their logprob, rank and text).

use pio_plugin_api::wire::{InferOutcome, Prompt, PromptLogprob, TokenTable};
use serde_json::{json, Map, Value};

use crate::protocol::TokenFrame;

/// Token `id`'s text, read lossily (a token holding part of a character reads U+FFFD).
pub(super) fn token_text(table: Option<&TokenTable>, id: u32) -> Option<String> {
    let bytes = table?.get(id)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// The prompt's text as completions' `echo` shows it: as the client sent it, or its token ids
/// read from `table`.
pub fn prompt_text(prompt: &Prompt, table: Option<&TokenTable>) -> String {
    match prompt {
        Prompt::Text(text) => text.clone(),
        // An id outside the table fails the request in the plugin before any answer.
        Prompt::Tokens(ids) => {
            (table.and_then(|t| super::tokenize::text_of(t, ids).ok())).unwrap_or_default()
        }
        Prompt::Messages(_) => String::new(),
    }
}

/// Whether `outcome` scores every prompt token after the first, as asked: a plugin that
/// answered otherwise would have a client read a partial sum as the prompt's likelihood.
pub fn scores_complete(outcome: &InferOutcome) -> Result<(), String> {
    let ids = outcome.prompt_token_ids.as_ref().map(Vec::len);
    let scores = outcome.prompt_logprobs.as_ref().map(Vec::len);
    match (ids, scores) {
        (Some(ids), Some(scores)) if scores + 1 == ids => Ok(()),
        (ids, scores) => Err(format!(
            "the plugin answered {} prompt scores for {} prompt tokens (one score per token after the first was asked for)",
            scores.map_or("no".into(), |n| n.to_string()),
            ids.map_or("unsaid".into(), |n| n.to_string()),
        )),
    }
}

/// The prompt's tokens as legacy logprobs' frames: each with the text it releases (a character
/// split across tokens comes whole with its last piece, as generated text does), its score and
/// its `top` best alternatives; the first has none. `None` when the outcome carries no scores.
pub fn prompt_frames(
    outcome: &InferOutcome,
    table: Option<&TokenTable>,
    top: usize,
) -> Option<Vec<TokenFrame>> {
    let ids = outcome.prompt_token_ids.as_ref()?;
    let scores = outcome.prompt_logprobs.as_ref()?;
    let mut held: Vec<u8> = Vec::new();
    let mut frames = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        held.extend_from_slice(table.and_then(|t| t.get(id)).unwrap_or_default());
        let text = released(&mut held, i + 1 == ids.len());
        let score = i.checked_sub(1).and_then(|s| scores.get(s));
        frames.push(TokenFrame {
            token_id: id,
            text,
            logprob: score.map(|s| s.logprob),
            top_logprobs: score.map_or_else(Vec::new, |s| {
                (s.top.iter().take(top))
                    .map(|&(id, lp)| (id, token_text(table, id).unwrap_or_default(), lp))
                    .collect()
            }),
        });
    }
    Some(frames)
}

/// The longest whole-character prefix of `held`, taken out of it (everything, read lossily, at
/// the `last` token: nothing is left to complete a character).
fn released(held: &mut Vec<u8>, last: bool) -> String {
    let valid = match std::str::from_utf8(held) {
        Ok(_) => held.len(),
        Err(e) if e.error_len().is_some() || last => held.len(),
        Err(e) => e.valid_up_to(),
    };
    let out: Vec<u8> = held.drain(..valid).collect();
    String::from_utf8_lossy(&out).into_owned()
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then for each token an object
/// keyed by token id holding the token itself and its `top` best alternatives. `Null` when the
/// outcome carries no scores.
pub fn vllm_prompt_logprobs(
    outcome: &InferOutcome,
    table: Option<&TokenTable>,
    top: usize,
) -> Value {
    let Some(scores) = &outcome.prompt_logprobs else {
        return Value::Null;
    };
    let entry = |id: u32, logprob: f32, rank: u32| {
        let decoded = token_text(table, id).unwrap_or_default();
        json!({"logprob": logprob, "rank": rank, "decoded_token": decoded})
    };
    let rows = scores.iter().map(|s: &PromptLogprob| {
        let mut row = Map::new();
        row.insert(s.token_id.to_string(), entry(s.token_id, s.logprob, s.rank));
        for (i, &(id, lp)) in s.top.iter().take(top).enumerate() {
            row.entry(id.to_string())
                .or_insert_with(|| entry(id, lp, i as u32 + 1));
        }
        Value::Object(row)
    });
    Value::Array(std::iter::once(Value::Null).chain(rows).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pio_plugin_api::wire::TokenBytes;

    fn table() -> TokenTable {
        // 0 "a", 1 first half of "é", 2 its second half, 3 " b"
        let tokens: Vec<Vec<u8>> = vec![b"a".to_vec(), vec![0xC3], vec![0xA9], b" b".to_vec()];
        TokenBytes::encode(&tokens).table().unwrap()
    }

    fn outcome() -> InferOutcome {
        let score = |token_id, logprob, rank, top: &[(u32, f32)]| PromptLogprob {
            token_id,
            logprob,
            rank,
            top: top.to_vec(),
        };
        InferOutcome {
            prompt_token_ids: Some(vec![0, 1, 2, 3]),
            prompt_logprobs: Some(vec![
                score(1, -2.0, 3, &[(0, -0.5), (3, -1.0)]),
                score(2, -0.1, 1, &[(2, -0.1), (0, -3.0)]),
                score(3, -4.0, 4, &[(1, -0.2), (0, -1.5)]),
            ]),
            ..InferOutcome::default()
        }
    }

    #[test]
    fn frames_release_whole_characters_and_the_first_token_has_no_score() {
        let table = table();
        let frames = prompt_frames(&outcome(), Some(&table), 2).unwrap();
        let texts: Vec<&str> = frames.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(texts, ["a", "", "é", " b"]);
        let logprobs: Vec<Option<f32>> = frames.iter().map(|f| f.logprob).collect();
        assert_eq!(logprobs, [None, Some(-2.0), Some(-0.1), Some(-4.0)]);
        assert!(frames[0].top_logprobs.is_empty());
        assert_eq!(frames[1].top_logprobs[1], (3, " b".to_string(), -1.0));
        let unscored = InferOutcome {
            prompt_logprobs: None,
            ..outcome()
        };
        assert!(prompt_frames(&unscored, Some(&table), 2).is_none());
        assert!(scores_complete(&unscored).is_err());
        assert!(scores_complete(&outcome()).is_ok());
        let mut short = outcome();
        short.prompt_logprobs.as_mut().unwrap().pop();
        assert!(scores_complete(&short)
            .unwrap_err()
            .contains("2 prompt scores for 4"));
        let fewer = prompt_frames(&outcome(), Some(&table), 1).unwrap();
        assert_eq!(
            fewer[1].top_logprobs.len(),
            1,
            "each answer shows its own number"
        );
    }

    #[test]
    fn vllm_rows_hold_the_token_and_its_alternatives_by_id() {
        let table = table();
        let v = vllm_prompt_logprobs(&outcome(), Some(&table), 2);
        assert_eq!(v[0], Value::Null, "the first token has no score");
        assert_eq!(v.as_array().unwrap().len(), 4);
        assert_eq!(
            v[1]["1"],
            json!({"logprob": -2.0, "rank": 3, "decoded_token": "\u{FFFD}"})
        );
        assert_eq!(v[1]["3"]["rank"], 2, "alternatives ranked by their place");
        assert_eq!(v[1].as_object().unwrap().len(), 3);
        // The token among its own alternatives appears once, with its rank.
        assert_eq!(v[2].as_object().unwrap().len(), 2);
        assert_eq!(v[2]["2"]["rank"], 1);
        assert_eq!(
            vllm_prompt_logprobs(&InferOutcome::default(), None, 2),
            Value::Null
        );
        let none = vllm_prompt_logprobs(&outcome(), Some(&table), 0);
        assert_eq!(none[1].as_object().unwrap().len(), 1, "the token alone");
    }
}
