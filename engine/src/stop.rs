//! Stop strings over streamed text. Generation must end *before* a stop string, and no part of it
//! may reach the client, even when it spans several tokens; so text that could still turn out to
//! be the start of a stop string is held back until the next token decides.

/// What one piece of text released.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Text that is now certain to be output.
    pub emit: String,
    /// A stop string was completed: generation ends, and `emit` is the last output.
    pub stopped: bool,
}

/// Finds stop strings in a stream of text pieces.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// Bytes at the start of `held` that came while stops could not end the output
    /// ([`StopMatcher::pass`]): a stop string lying wholly within them does not count later.
    passed: usize,
    /// Whether the stop string that ends the output is part of it (vLLM's
    /// `include_stop_str_in_output`).
    keep: bool,
    /// The stop string that ended the output.
    found: Option<String>,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            held: String::new(),
            passed: 0,
            keep: false,
            found: None,
        }
    }

    /// The same matcher, ending the output with the stop string it found when `keep`.
    pub fn keeping(self, keep: bool) -> Self {
        Self { keep, ..self }
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, text: &str) -> Step {
        self.held.push_str(text);
        let passed = std::mem::take(&mut self.passed);
        // The earliest stop string that ends in new text; of those starting there, the longest.
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| {
                // From the first place a match could end in new text: matches are looked for
                // there, not filtered from non-overlapping ones (an earlier one wholly in passed
                // text hid one overlapping it that ends in new text).
                let mut from = passed.saturating_sub(s.len() - 1);
                // A match starts where a character does.
                while !self.held.is_char_boundary(from) {
                    from += 1;
                }
                let at = from + self.held[from..].find(s.as_str())?;
                Some((at, std::cmp::Reverse(s.len())))
            })
            .min();
        if let Some((at, std::cmp::Reverse(len))) = first_stop {
            let end = if self.keep { at + len } else { at };
            let emit = self.held[..end].to_string();
            self.found = Some(self.held[at..at + len].to_string());
            self.held.clear();
            return Step {
                emit,
                stopped: true,
            };
        }
        let keep = self.longest_stop_prefix_suffix();
        let dropped = self.held.len() - keep;
        let emit = self.held[..dropped].to_string();
        self.held.drain(..dropped);
        // What is still held of the passed text stays passed.
        self.passed = passed.saturating_sub(dropped);
        Step {
            emit,
            stopped: false,
        }
    }

    /// The stop string that ended the output, once one has.
    pub fn found(&self) -> Option<&str> {
        self.found.as_deref()
    }

    /// Feeds a piece that may not end the output (vLLM's `min_tokens` not reached): a stop
    /// string in it is output as text; only its end that may begin one is held back, so a stop
    /// string completed by a later piece still ends the output.
    pub fn pass(&mut self, text: &str) -> String {
        self.held.push_str(text);
        let keep = self.longest_stop_prefix_suffix();
        let out = self.held.drain(..self.held.len() - keep).collect();
        self.passed = self.held.len();
        out
    }

    /// Feeds a special token's text (after any bytes of a character it finished), which the
    /// host may leave out of the text by the token's id: none of it is held back, so it reaches
    /// the host in its own token's frame, never in a later one. A stop string completed within
    /// it still ends the output; one that would run on past it is not looked for (the README
    /// says how this differs from vLLM, which matches on text without special tokens).
    pub fn push_whole(&mut self, text: &str) -> Step {
        let mut step = self.push(text);
        if !step.stopped {
            step.emit.push_str(&self.release());
        }
        step
    }

    /// [`StopMatcher::pass`] for a special token's text, none of it held back (as
    /// [`StopMatcher::push_whole`]).
    pub fn pass_whole(&mut self, text: &str) -> String {
        let mut out = self.pass(text);
        out.push_str(&self.release());
        out
    }

    /// Everything held, released; nothing of it stays passed.
    fn release(&mut self) -> String {
        self.passed = 0;
        std::mem::take(&mut self.held)
    }

    /// Generation ended for another reason: releases whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of the held text that begin some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let held = &self.held;
        (1..=held.len())
            .rev()
            .filter(|&n| held.is_char_boundary(held.len() - n))
            .find(|&n| {
                let tail = &held[held.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.emit);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    /// A special token's text is released whole in its own step, with what was held before
    /// it; a stop string within it still stops, one running past it is not looked for.
    #[test]
    fn a_special_tokens_text_is_never_held_back() {
        let mut m = StopMatcher::new([">>>", "<|x|>"]);
        assert_eq!(m.push("a >").emit, "a ");
        let whole = m.push_whole("<|y|>");
        assert_eq!((whole.emit.as_str(), whole.stopped), ("><|y|>", false));
        // Its `>` began no stop: the next `>>` is text.
        assert_eq!(m.push(">>").emit, "");
        assert_eq!(m.finish(), ">>");
        let mut m = StopMatcher::new([">>>", "<|x|>"]);
        let stop = m.push_whole("<|x|>");
        assert_eq!((stop.emit.as_str(), stop.stopped), ("", true));
        // Before min_tokens, the same: nothing held, nothing left passed.
        let mut m = StopMatcher::new([">>>"]);
        assert_eq!(m.pass_whole("<|y|>"), "<|y|>");
        assert!(m.push(">>>").stopped);
    }

    #[test]
    fn a_stop_string_passed_is_text_and_one_completed_later_still_stops() {
        let mut m = StopMatcher::new(["STOP"]);
        assert_eq!(m.pass("a STOP b ST"), "a STOP b ");
        let last = m.push("OP c");
        assert_eq!((last.emit.as_str(), last.stopped), ("", true));
    }

    /// A stop string wholly within passed text does not hide one overlapping it that ends in
    /// the next piece.
    #[test]
    fn an_overlapping_stop_ending_after_a_passed_one_stops() {
        let mut m = StopMatcher::new(["\n\n", "\n\n\n#"]);
        assert_eq!(m.pass("x\n\n"), "x");
        let step = m.push("\n");
        assert!(step.stopped, "{step:?}");
        assert_eq!((step.emit.as_str(), m.found()), ("\n", Some("\n\n")));
        let mut m = StopMatcher::new(["éé"]);
        assert_eq!(m.pass("aéé"), "aé");
        let step = m.push("é");
        assert_eq!((step.emit.as_str(), step.stopped), ("", true));
    }

    /// A stop string passed whole (held only because it begins a longer one) does not end the
    /// output later; the longer one completed later does.
    #[test]
    fn a_passed_stop_string_held_as_the_start_of_another_does_not_count() {
        let mut m = StopMatcher::new(["ST", "STOP"]);
        assert_eq!(m.pass("a ST"), "a ");
        let step = m.push("x");
        assert_eq!((step.emit.as_str(), step.stopped), ("STx", false));
        let mut m = StopMatcher::new(["ST", "STOP"]);
        assert_eq!(m.pass("a ST"), "a ");
        let step = m.push("OP");
        assert_eq!((step.emit.as_str(), step.stopped), ("", true));
        // Held over several pieces, the passed one still does not count.
        let mut m = StopMatcher::new(["ST", "STOP"]);
        assert_eq!(m.pass("a ST"), "a ");
        assert_eq!(m.push("O"), Step::default());
        let step = m.push("x");
        assert_eq!((step.emit.as_str(), step.stopped), ("STOx", false));
    }

    #[test]
    fn a_stop_string_kept_in_the_output_ends_it() {
        let mut m = StopMatcher::new(["STOP", "ST"]).keeping(true);
        assert_eq!(m.push("say S").emit, "say ");
        let last = m.push("TOP and more");
        assert_eq!((last.emit.as_str(), last.stopped), ("STOP", true));
    }

    #[test]
    fn a_stop_string_spanning_tokens_is_never_emitted() {
        let mut m = StopMatcher::new(["STOP"]);
        assert_eq!(m.push("say S").emit, "say ");
        assert_eq!(m.push("TO").emit, "");
        let last = m.push("P now");
        assert_eq!((last.emit.as_str(), last.stopped), ("", true));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        assert_eq!(run(&["STOP"], &["a S", "T", "x"]), ("a STx".into(), false));
        assert_eq!(run(&["STOP"], &["a ST"]), ("a ST".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo w"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn a_stop_inside_one_piece_cuts_it() {
        assert_eq!(
            run(&["\n\n"], &["line one\n\nline two"]),
            ("line one".into(), true)
        );
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        assert_eq!(run(&["éé"], &["caféé"]), ("caf".into(), true));
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
    }

    #[test]
    fn no_stops_pass_everything_through() {
        let mut m = StopMatcher::new(Vec::<String>::new());
        assert_eq!(m.push("abc").emit, "abc");
    }
}
