//! Prompt scoring (vLLM's `prompt_logprobs`, OpenAI's `echo` with `logprobs`): how likely each
//! prompt token was under the tokens before it. The head turns the rows of a scored sequence's
//! chunk into [`PromptScore`]s; the engine collects them across chunks in [`PromptScores`].

use std::sync::Mutex;

use crate::sampling::{log_sum_exp, top_k};

/// One prompt token's score under the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptScore {
    /// The prompt token.
    pub token_id: u32,
    /// Its log-probability under the raw distribution (as a generated token's logprob is).
    pub logprob: f32,
    /// 1 + the number of tokens whose logit is higher (vLLM's rank).
    pub rank: u32,
    /// The best tokens there, `(id, logprob)`, best first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// What a log-probability that is not a number reads as (vLLM's clamp): JSON has no -inf, and
/// a client summing scores gets a very unlikely prompt rather than an error.
pub const FLOOR: f32 = -9999.0;

/// Scores `next` (the token that followed) with `row`, the logits that predicted it. Its rank
/// counts the tokens at least as likely, itself included (vLLM's: tied tokens share the lower
/// place).
pub fn score(row: &[f32], next: u32, top: usize) -> PromptScore {
    let total = log_sum_exp(row);
    let logprob = |l: f32| match (f64::from(l) - total) as f32 {
        v if v.is_finite() => v,
        _ => FLOOR,
    };
    let logit = row.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let at_least = row.iter().filter(|&&l| l >= logit).count();
    PromptScore {
        token_id: next,
        logprob: logprob(logit),
        rank: at_least.max(1) as u32,
        top: top_k(row, top)
            .into_iter()
            .map(|(id, l)| (id, logprob(l)))
            .collect(),
    }
}

/// A forward pass's ask of one scored sequence: score its new rows `first..first +
/// next.len()` (counted from the chunk's first row), row `first + i` predicting `next[i]`.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRows<'a> {
    /// The chunk's first row to score.
    pub first: usize,
    /// The token each scored row predicts.
    pub next: &'a [u32],
    /// Alternatives per row.
    pub top: usize,
    /// Where the scores go, appended in order.
    pub into: &'a Mutex<Vec<PromptScore>>,
}

/// A sequence's prompt scores as its chunks come, and how many alternatives each takes.
#[derive(Debug)]
pub struct PromptScores {
    top: usize,
    prompt: usize,
    got: Mutex<Vec<PromptScore>>,
}

impl PromptScores {
    /// Scores for a prompt of `prompt` tokens, `top` alternatives each.
    pub fn new(prompt: usize, top: usize) -> Self {
        Self {
            top,
            prompt,
            got: Mutex::new(Vec::new()),
        }
    }

    fn scored(&self) -> usize {
        self.got.lock().map_or(0, |g| g.len())
    }

    /// Whether some prompt token is still unscored (then the prefix cache cannot stand in for
    /// its rows: cached rows produce no logits).
    pub fn incomplete(&self) -> bool {
        self.scored() + 1 < self.prompt
    }

    /// What a chunk of `tokens` (the sequence's), its new rows at `start..start + n`, must
    /// score: the rows not scored yet whose next token is the prompt's (a sequence recomputed
    /// after preemption scores nothing twice). `None` when there are none.
    pub fn rows<'a>(&'a self, tokens: &'a [u32], start: usize, n: usize) -> Option<ScoreRows<'a>> {
        let from = start.max(self.scored());
        let to = (start + n).min(self.prompt.saturating_sub(1));
        (from < to).then(|| ScoreRows {
            first: from - start,
            next: &tokens[from + 1..to + 1],
            top: self.top,
            into: &self.got,
        })
    }

    /// The scores so far, in prompt order (the prompt's second token first).
    pub fn taken(&self) -> Vec<PromptScore> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_score_is_the_tokens_log_softmax_its_rank_and_the_best() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let s = score(&row, 2, 2);
        let total: f64 = row.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(s.logprob) - (2.0 - total)).abs() < 1e-6);
        assert_eq!(s.rank, 3, "two tokens are likelier");
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3]);
        assert!((f64::from(s.top[0].1) - (3.0 - total)).abs() < 1e-6);
        assert_eq!(
            score(&row, 1, 0).rank,
            2,
            "tied for the best: both at place 2"
        );
        assert_eq!(score(&row, 0, 0).rank, 4);
        assert!(score(&row, 1, 0).top.is_empty());
    }

    #[test]
    fn scores_that_are_not_numbers_read_as_the_floor() {
        let row = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        let s = score(&row, 0, 3);
        assert_eq!((s.logprob, s.rank), (FLOOR, 3));
        assert_eq!(s.top[0], (1, 0.0));
        assert_eq!(s.top[2].1, FLOOR);
        assert_eq!(score(&[f32::NAN, 1.0], 0, 0).logprob, FLOOR);
    }

    #[test]
    fn chunks_score_each_prompt_row_once_and_never_the_last() {
        let tokens = [10, 11, 12, 13, 14, 99];
        let scores = PromptScores::new(5, 1);
        let push = |rows: ScoreRows<'_>| {
            let mut g = rows.into.lock().unwrap();
            for &next in rows.next {
                g.push(score(&[0.0; 100], next, rows.top));
            }
        };
        let first = scores.rows(&tokens, 0, 3).unwrap();
        assert_eq!((first.first, first.next), (0, &[11, 12, 13][..]));
        push(first);
        // The chunk's last row predicts the first generated token: not a prompt score.
        let second = scores.rows(&tokens, 3, 2).unwrap();
        assert_eq!((second.first, second.next), (0, &[14][..]));
        push(second);
        assert!(!scores.incomplete());
        assert!(
            scores.rows(&tokens, 5, 1).is_none(),
            "decode steps score nothing"
        );
        // Recomputed from the start after a preemption: nothing again.
        assert!(scores.rows(&tokens, 0, 5).is_none());
        let ids: Vec<u32> = scores.taken().iter().map(|s| s.token_id).collect();
        assert_eq!(ids, [11, 12, 13, 14]);
    }

    #[test]
    fn a_recomputed_chunk_scores_only_its_new_rows() {
        let tokens = [1, 2, 3, 4, 5, 6, 7];
        let scores = PromptScores::new(7, 0);
        scores
            .got
            .lock()
            .unwrap()
            .extend((2..4).map(|t| score(&[0.0; 8], t, 0)));
        let rows = scores.rows(&tokens, 0, 4).unwrap();
        assert_eq!((rows.first, rows.next), (2, &[4, 5][..]));
        assert!(PromptScores::new(1, 0).rows(&[5], 0, 1).is_none());
        assert!(
            !PromptScores::new(1, 0).incomplete(),
            "one token has nothing to score"
        );
    }
}
