//! A sequence's output side: sampling, logprobs, UTF-8-safe text and stop strings, one token at a
//! time — what the old single-request loop did, now state that lives as long as the sequence and
//! survives preemption (the tokens, the sampler's random state, the text held back).

use crate::batch::{Output, Wanted};
use crate::error::{EngineError, Result};
use crate::generate::{Emitted, Finish, Request};
use crate::guide::{Compiled, Guide};
use crate::sampling::{log_sum_exp, top_k, Sampler};
use crate::stop::{Step, StopMatcher};
use crate::text::{StreamDecoder, TextCodec};
use pio_plugin_api::wire::StopReason;

/// Turns a sequence's logits into tokens and text.
#[derive(Debug)]
pub struct Decoding {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_tokens: usize,
    eos: Vec<u32>,
    /// Ids that end the output with them.
    stop_ids: Vec<u32>,
    /// The text of what ended the output is part of it (a stop id's, as a stop string's).
    include_stop: bool,
    /// Until this many tokens are out, end-of-sequence and stop ids are barred.
    min_tokens: usize,
    logprobs: Option<usize>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// The output grammar, when the request has one.
    guide: Option<Guide>,
}

/// What masks cost: tokens sampled under one, time computing them, time waiting for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuideTime {
    /// Tokens sampled under a mask.
    pub tokens: u64,
    /// Time the grammar threads spent computing masks.
    pub compute: std::time::Duration,
    /// Time the sampler waited for a mask.
    pub wait: std::time::Duration,
}

impl std::ops::AddAssign for GuideTime {
    fn add_assign(&mut self, o: Self) {
        self.tokens += o.tokens;
        self.compute += o.compute;
        self.wait += o.wait;
    }
}

/// One sampled token and whether the sequence ends with it.
#[derive(Debug)]
pub struct Accepted {
    /// What the client gets.
    pub emitted: Emitted,
    /// Why the sequence ends here, if it does.
    pub finish: Option<Finish>,
    /// What this token's mask cost, if it had one.
    pub guided: GuideTime,
}

impl Decoding {
    /// The state for `request`, generating at most `max_tokens` (already capped by the caller to
    /// what the context and the pool allow).
    pub fn new(request: &Request, max_tokens: usize) -> Result<Self> {
        Self::with(request, request.constraint.clone(), max_tokens)
    }

    /// [`Self::new`], moving `request`'s constraint in: a clone copies the grammar matcher's
    /// lexer cache, on the engine thread that every sequence waits on.
    pub fn taking(request: &mut Request, max_tokens: usize) -> Result<Self> {
        let constraint = request.constraint.take();
        Self::with(request, constraint, max_tokens)
    }

    fn with(request: &Request, constraint: Option<Compiled>, max_tokens: usize) -> Result<Self> {
        let guide = constraint.map(Guide::start).transpose()?;
        Ok(Self {
            prompt: request.prompt.clone(),
            generated: Vec::new(),
            max_tokens,
            eos: request.eos.clone(),
            stop_ids: request.stop_ids.clone(),
            include_stop: request.include_stop,
            min_tokens: request.min_tokens,
            logprobs: request.logprobs,
            sampler: Sampler::new(request.sampling.clone()),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(request.stop.iter().cloned()).keeping(request.include_stop),
            guide,
        })
    }

    /// Samples from `logits` among the tokens the grammar allows (all without one); what the
    /// mask cost.
    fn sample(&mut self, logits: &[f32]) -> Result<(u32, GuideTime)> {
        let barred;
        let logits = if self.bars_eos() {
            let mut copy = logits.to_vec();
            for &e in self.eos.iter().chain(&self.stop_ids) {
                if let Some(l) = copy.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            barred = copy;
            &barred[..]
        } else {
            logits
        };
        let asked = std::time::Instant::now();
        let allowed = (self.guide.as_mut())
            .and_then(|g| g.allowed(logits.len()))
            .transpose()?;
        let guided = match (&allowed, self.guide.as_ref()) {
            (Some(_), Some(g)) if g.is_active() => GuideTime {
                tokens: 1,
                compute: g.last_compute(),
                wait: asked.elapsed(),
            },
            _ => GuideTime::default(),
        };
        let token = self
            .sampler
            .sample_from(logits, &self.prompt, &self.generated, allowed.as_ref())
            .ok_or_else(|| match allowed {
                Some(_) => EngineError::Internal(
                    "the output grammar allows no token this model can produce".into(),
                ),
                // Every logit NaN or infinite: the weights (or a quantized cache) are broken,
                // or the computation overflowed its dtype.
                None => EngineError::Internal(
                    "the model computed no finite logit (NaN or infinite scores): its weights or its quantization cache may be corrupt (delete the cache to rebuild it), or the dtype overflowed (try bf16 or f32)".into(),
                ),
            })?;
        Ok((token, guided))
    }

    /// Feeds `text` to the stop strings, which end the output only once `min_tokens` are out
    /// (counting this token), as vLLM's stop checker does; a `special` token's text is not held
    /// back (the host finds it by the token's id, in that token's frame).
    fn stop_check(&mut self, text: &str, special: bool) -> Step {
        let passing = self.generated.len() < self.min_tokens;
        match (passing, special) {
            (true, false) => Step {
                emit: self.stops.pass(text),
                stopped: false,
            },
            (true, true) => Step {
                emit: self.stops.pass_whole(text),
                stopped: false,
            },
            (false, false) => self.stops.push(text),
            (false, true) => self.stops.push_whole(text),
        }
    }

    /// Whether end-of-sequence and stop ids are barred from the next token (`min_tokens` not
    /// reached).
    fn bars_eos(&self) -> bool {
        self.generated.len() < self.min_tokens && !(self.eos.is_empty() && self.stop_ids.is_empty())
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The stop string or stop id that ended the output, once one has (vLLM's `stop_reason`);
    /// `None` for the end of sequence and for a length.
    pub fn stop_reason(&self) -> Option<StopReason> {
        // The token first, as vLLM checks: an end of sequence or a stop id whose text (included
        // in the output) also completes a stop string is named as the token.
        let last = *self.generated.last()?;
        if self.eos.contains(&last) {
            return None;
        }
        // A stop id always ends the output (it is barred until it may).
        if self.stop_ids.contains(&last) {
            return Some(StopReason::Token(last));
        }
        (self.stops.found()).map(|found| StopReason::Text(found.to_string()))
    }

    /// What this sequence needs of a forward pass's output, when nothing but its sampler reads
    /// the row (no grammar or logprobs): the most likely token alone when it decodes greedily
    /// with no penalty, the row's best few when it draws among its top k (at most
    /// [`MAX_TOP_K`]); otherwise the whole row.
    pub fn wants(&self) -> Wanted {
        if self.guide.is_some() || self.logprobs.is_some() || self.bars_eos() {
            return Wanted::Logits;
        }
        if self.sampler.picks_best() {
            return Wanted::Best;
        }
        match self.sampler.keeps_at_most() {
            Some(k) if k <= MAX_TOP_K => Wanted::Top(k as u32),
            _ => Wanted::Logits,
        }
    }

    /// Takes the next token from `output` (sampled from its logits, among those the grammar
    /// allows, if any) and works out the text it releases.
    pub fn accept(&mut self, output: &Output, codec: &TextCodec) -> Result<Accepted> {
        let (token, guided) = match output {
            Output::Best(token) => (*token, GuideTime::default()),
            Output::Top(best) => {
                let token = self.sampler.sample_top(best).ok_or_else(|| {
                    EngineError::Internal("no finite logit among the row's best entries".into())
                })?;
                (token, GuideTime::default())
            }
            Output::Logits(logits) => self.sample(logits)?,
        };
        self.generated.push(token);
        let is_eos = self.eos.contains(&token);
        let stop_id = !is_eos && self.stop_ids.contains(&token);
        let last = is_eos || stop_id || self.generated.len() >= self.max_tokens;
        if let Some(guide) = self.guide.as_mut().filter(|_| !last) {
            guide.advance(token, codec);
        }
        let (logprob, top) = match (self.logprobs, output) {
            (Some(k), Output::Logits(logits)) => {
                // Log-probabilities rank as the logits do: only the k + 1 reported are computed.
                let lse = log_sum_exp(logits);
                let lp = |l: f32| (f64::from(l) - lse) as f32;
                let top = top_k(logits, k)
                    .into_iter()
                    .map(|(id, l)| (id, codec.decode(&[id]), lp(l)))
                    .collect();
                (Some(lp(logits[token as usize])), top)
            }
            _ => (None, Vec::new()),
        };
        let mut text = String::new();
        let mut stopped = false;
        // The text of the token that ended the output (the end of sequence, a stop id) is left
        // out unless the stop is to be included, as vLLM's detokenizer does; a special one is
        // then still left out by the host unless `skip_special_tokens` is off.
        if !(is_eos || stop_id) || self.include_stop {
            let piece = self.decoder.push(codec, token);
            let special = codec.special_ids().binary_search(&token).is_ok();
            let step = self.stop_check(&piece, special);
            text = step.emit;
            stopped = step.stopped;
        }
        if last && !stopped {
            // Nothing follows: release what was held for a possible stop string or character.
            let piece = self.decoder.finish(codec);
            let tail = self.stop_check(&piece, false);
            text.push_str(&tail.emit);
            stopped = tail.stopped;
            if !stopped {
                text.push_str(&self.stops.finish());
            }
        }
        let finish = if is_eos || stop_id || stopped {
            Some(Finish::Stop)
        } else if last {
            Some(Finish::Length)
        } else {
            None
        };
        Ok(Accepted {
            emitted: Emitted {
                token_id: token,
                text,
                logprob,
                top,
            },
            finish,
            guided,
        })
    }
}

/// The largest top-k a sequence asks a forward pass for as the row's best entries
/// ([`Wanted::Top`]) rather than the whole row: what the GPU's selection keeps per thread.
pub const MAX_TOP_K: usize = 64;

/// Rows at or above which [`accept_all`] spreads the work over the pool: below it, handing rows
/// to other threads costs more than it saves.
const PARALLEL_SCANS: usize = 4;

/// [`Decoding::accept`] for each of `rows` (a sequence's decoding and its output), the results in
/// `rows`' order. Where several rows are whole logits — each sampled, masked by a grammar or
/// ranked for log-probabilities over the whole vocabulary, ~0.2–1.5 ms a row of 151,936 — they
/// run in parallel on the current rayon pool (the engine's), since on a GPU the step waits for
/// them: 32 sampled streams would spend several milliseconds a step here in turn.
pub fn accept_all(
    rows: &mut [(&mut Decoding, Output)],
    codec: &TextCodec,
) -> Vec<Result<Accepted>> {
    let scans = rows
        .iter()
        .filter(|(_, o)| matches!(o, Output::Logits(_)))
        .count();
    if scans >= PARALLEL_SCANS {
        use rayon::prelude::*;
        rows.par_iter_mut()
            .map(|(decoding, output)| decoding.accept(output, codec))
            .collect()
    } else {
        rows.iter_mut()
            .map(|(decoding, output)| decoding.accept(output, codec))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::text::fixture_codec as codec;

    fn request(sampling: SamplingParams, logprobs: Option<usize>) -> Request {
        Request {
            prompt: vec![1, 2, 3],
            sampling,
            max_tokens: 50,
            logprobs,
            ..Request::default()
        }
    }

    /// A top-k sampler asks for the row's best entries, and accepting them gives the tokens the
    /// whole row gives; whatever else reads the row (log-probabilities, penalties, a k past
    /// [`MAX_TOP_K`], no k) asks for the row.
    #[test]
    fn a_top_k_sampler_wants_the_best_entries_and_draws_from_them_what_the_row_gives() {
        let codec = codec();
        let sampling = |k: u32| SamplingParams {
            temperature: Some(0.7),
            top_k: Some(k),
            top_p: Some(0.8),
            seed: Some(11),
            ..SamplingParams::default()
        };
        let mut by_top = Decoding::new(&request(sampling(20), None), 50).unwrap();
        let mut by_row = Decoding::new(&request(sampling(20), None), 50).unwrap();
        assert_eq!(by_top.wants(), Wanted::Top(20));
        let vocab = 1000;
        for step in 0..40u32 {
            let row: Vec<f32> = (0..vocab)
                .map(|i| ((i * 37 + step * 101) % 97) as f32 / 9.0)
                .collect();
            let best = Output::Top(crate::sampling::top_k(&row, 20));
            let a = by_top.accept(&best, &codec).unwrap();
            let b = by_row.accept(&Output::Logits(row), &codec).unwrap();
            assert_eq!(a.emitted.token_id, b.emitted.token_id, "step {step}");
        }
        let penalized = SamplingParams {
            repetition_penalty: Some(1.1),
            ..sampling(20)
        };
        for (req, why) in [
            (request(sampling(20), Some(2)), "logprobs"),
            (request(penalized, None), "a penalty"),
            (
                request(sampling(MAX_TOP_K as u32 + 1), None),
                "k over the most",
            ),
            (
                request(
                    SamplingParams {
                        top_k: None,
                        ..sampling(1)
                    },
                    None,
                ),
                "no k",
            ),
        ] {
            let d = Decoding::new(&req, 50).unwrap();
            assert_eq!(d.wants(), Wanted::Logits, "{why}");
        }
        let greedy = Decoding::new(&request(SamplingParams::default(), None), 50).unwrap();
        assert_eq!(greedy.wants(), Wanted::Best);
    }

    /// Until `min_tokens` are out, the end-of-sequence id is never drawn, however likely, and
    /// the sequence asks for whole rows to bar it; then it ends the sequence as always.
    #[test]
    fn min_tokens_bars_the_end_of_sequence_until_reached() {
        let codec = codec();
        let eos = 5u32;
        let r = Request {
            eos: vec![eos],
            min_tokens: 2,
            ..request(SamplingParams::default(), None)
        };
        let mut d = Decoding::new(&r, 50).unwrap();
        let mut logits = vec![0.0f32; 64];
        logits[eos as usize] = 10.0;
        logits[9] = 5.0;
        for _ in 0..2 {
            assert_eq!(d.wants(), Wanted::Logits);
            let a = d.accept(&Output::Logits(logits.clone()), &codec).unwrap();
            assert_eq!((a.emitted.token_id, a.finish), (9, None));
        }
        assert_eq!(d.wants(), Wanted::Best, "nothing to bar any more");
        let a = d.accept(&Output::Logits(logits), &codec).unwrap();
        assert_eq!((a.emitted.token_id, a.finish), (eos, Some(Finish::Stop)));
    }

    /// A special token's text comes whole in its own token's output, where the host finds it by
    /// the id, even when a stop string begins with its end (`>`): held back, it would reach the
    /// host with the next, ordinary token and be shown.
    #[test]
    fn a_special_tokens_text_comes_with_it_whole() {
        let codec = codec();
        let start = codec.token_id("<|im_start|>").unwrap();
        let word = codec.encode(" x").unwrap()[0];
        let r = Request {
            stop: vec![">>".into()],
            ..request(SamplingParams::default(), None)
        };
        let mut d = Decoding::new(&r, 50).unwrap();
        let a = d.accept(&Output::Best(start), &codec).unwrap();
        assert_eq!((a.emitted.text.as_str(), a.finish), ("<|im_start|>", None));
        let a = d.accept(&Output::Best(word), &codec).unwrap();
        assert_eq!(a.emitted.text, codec.decode(&[word]));
    }

    /// A stop string before `min_tokens` is output as text; the one completed by the
    /// `min_tokens`-th token ends the sequence (vLLM's order).
    #[test]
    fn min_tokens_lets_stop_strings_end_the_output_only_once_reached() {
        let codec = codec();
        let word = codec.decode(&[9]);
        let r = Request {
            stop: vec![word.clone()],
            min_tokens: 3,
            ..request(SamplingParams::default(), None)
        };
        let mut d = Decoding::new(&r, 50).unwrap();
        for _ in 0..2 {
            let a = d.accept(&Output::Best(9), &codec).unwrap();
            assert_eq!((a.emitted.text.as_str(), a.finish), (word.as_str(), None));
        }
        assert_eq!(d.stop_reason(), None, "not stopped yet");
        let a = d.accept(&Output::Best(9), &codec).unwrap();
        assert_eq!(
            (a.emitted.text.as_str(), a.finish),
            ("", Some(Finish::Stop))
        );
        assert_eq!(d.stop_reason(), Some(StopReason::Text(word.clone())));
        // Without min_tokens the first one stops.
        let r = Request { min_tokens: 0, ..r };
        let mut d = Decoding::new(&r, 50).unwrap();
        let a = d.accept(&Output::Best(9), &codec).unwrap();
        assert_eq!(a.finish, Some(Finish::Stop));
    }

    /// A stop id ends the output, its text left out unless the stop is included (vLLM's
    /// `stop_token_ids` and `include_stop_str_in_output`), and is barred like the end of
    /// sequence until `min_tokens` are out.
    #[test]
    fn a_stop_id_ends_the_output_its_text_shown_only_if_included() {
        let codec = codec();
        let stop = 9u32;
        let r = Request {
            stop_ids: vec![stop],
            min_tokens: 1,
            ..request(SamplingParams::default(), None)
        };
        let mut d = Decoding::new(&r, 50).unwrap();
        let mut logits = vec![0.0f32; 64];
        logits[stop as usize] = 10.0;
        logits[7] = 5.0;
        assert_eq!(d.wants(), Wanted::Logits);
        let a = d.accept(&Output::Logits(logits.clone()), &codec).unwrap();
        assert_eq!((a.emitted.token_id, a.finish), (7, None), "barred first");
        let a = d.accept(&Output::Logits(logits.clone()), &codec).unwrap();
        assert_eq!((a.emitted.token_id, a.finish), (stop, Some(Finish::Stop)));
        assert_eq!(a.emitted.text, "");
        assert_eq!(d.stop_reason(), Some(StopReason::Token(stop)));
        let included = Request {
            include_stop: true,
            min_tokens: 0,
            eos: vec![7],
            ..r
        };
        let mut d = Decoding::new(&included, 50).unwrap();
        let a = d.accept(&Output::Logits(logits.clone()), &codec).unwrap();
        assert_eq!((a.emitted.token_id, a.finish), (stop, Some(Finish::Stop)));
        assert_eq!(a.emitted.text, codec.decode(&[stop]));
        // Its text, included, also a stop string: named as the token, as vLLM checks it first.
        let also_text = Request {
            stop: vec![codec.decode(&[stop])],
            ..included.clone()
        };
        let mut d = Decoding::new(&also_text, 50).unwrap();
        d.accept(&Output::Logits(logits), &codec).unwrap();
        assert_eq!(d.stop_reason(), Some(StopReason::Token(stop)));
        // The end of sequence's text too, when the stop is included.
        let mut d = Decoding::new(&included, 50).unwrap();
        let a = d.accept(&Output::Best(7), &codec).unwrap();
        assert_eq!(
            (a.emitted.text.as_str(), a.finish),
            (codec.decode(&[7]).as_str(), Some(Finish::Stop))
        );
        assert_eq!(
            d.stop_reason(),
            None,
            "the end of sequence has none, as in vLLM"
        );
        let mut d = Decoding::new(
            &Request {
                include_stop: false,
                ..included
            },
            50,
        )
        .unwrap();
        assert_eq!(d.accept(&Output::Best(7), &codec).unwrap().emitted.text, "");
    }

    /// Scores that are all NaN are named as the model's fault, not a grammar's.
    #[test]
    fn no_finite_logit_is_named_as_such() {
        let codec = codec();
        let mut d = Decoding::new(&request(SamplingParams::default(), None), 50).unwrap();
        let e = d
            .accept(&Output::Logits(vec![f32::NAN; 64]), &codec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no finite logit") && !e.contains("grammar"),
            "{e}"
        );
    }
}
