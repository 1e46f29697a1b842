//! The values a sampling setting may take: one table for API requests and for the defaults a
//! manifest's `[model.generation]` sets, so a default can never be what a request may not ask.

use pio_plugin_api::wire::GenerationDefaults;

/// A setting's allowed values: `lo..=hi`, or `lo` excluded where `above_lo`.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The setting's name, as a request and a manifest spell it.
    pub name: &'static str,
    /// The least value.
    pub lo: f32,
    /// The greatest value.
    pub hi: f32,
    /// Whether `lo` itself is refused.
    pub above_lo: bool,
}

/// `temperature`: 0 is greedy.
pub const TEMPERATURE: Range = Range::inclusive("temperature", 0.0, 2.0);
/// `top_p`: a probability mass, more than none.
pub const TOP_P: Range = Range {
    above_lo: true,
    ..Range::inclusive("top_p", 0.0, 1.0)
};
/// `min_p`: a fraction of the likeliest token's probability.
pub const MIN_P: Range = Range::inclusive("min_p", 0.0, 1.0);
/// `presence_penalty`, as OpenAI bounds it.
pub const PRESENCE_PENALTY: Range = Range::inclusive("presence_penalty", -2.0, 2.0);
/// `frequency_penalty`, as OpenAI bounds it.
pub const FREQUENCY_PENALTY: Range = Range::inclusive("frequency_penalty", -2.0, 2.0);
/// `repetition_penalty`: 1 is none; 0 would divide by zero.
pub const REPETITION_PENALTY: Range = Range::inclusive("repetition_penalty", 0.01, 10.0);

impl Range {
    const fn inclusive(name: &'static str, lo: f32, hi: f32) -> Self {
        Self {
            name,
            lo,
            hi,
            above_lo: false,
        }
    }

    /// What is wrong with `value` (naming the setting and what it must be), `None` if nothing.
    pub fn problem(&self, value: Option<f32>) -> Option<String> {
        let (name, lo, hi) = (self.name, self.lo, self.hi);
        match value? {
            x if !(lo..=hi).contains(&x) || x.is_nan() => {
                Some(format!("`{name}` must be between {lo} and {hi}, found {x}"))
            }
            x if self.above_lo && x == lo => Some(format!("`{name}` must be greater than {lo}")),
            _ => None,
        }
    }
}

/// What is wrong with a `max_tokens` (0 would end the request before its first token).
pub fn max_tokens_problem(value: Option<u32>) -> Option<&'static str> {
    (value == Some(0)).then_some("`max_tokens` must be at least 1")
}

/// What is wrong with generation defaults, if anything: each held to what a request may ask.
pub fn defaults_problem(g: &GenerationDefaults) -> Option<String> {
    if let Some(problem) = max_tokens_problem(g.max_tokens) {
        return Some(problem.into());
    }
    [
        TEMPERATURE.problem(g.temperature),
        TOP_P.problem(g.top_p),
        MIN_P.problem(g.min_p),
        REPETITION_PENALTY.problem(g.repetition_penalty),
    ]
    .into_iter()
    .flatten()
    .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_names_the_setting_and_its_bounds() {
        assert_eq!(TEMPERATURE.problem(None), None);
        assert_eq!(TEMPERATURE.problem(Some(0.0)), None);
        assert_eq!(TEMPERATURE.problem(Some(2.0)), None);
        assert_eq!(
            TEMPERATURE.problem(Some(-3.0)).as_deref(),
            Some("`temperature` must be between 0 and 2, found -3")
        );
        assert!(TEMPERATURE.problem(Some(f32::NAN)).is_some());
        assert_eq!(
            TOP_P.problem(Some(0.0)).as_deref(),
            Some("`top_p` must be greater than 0")
        );
        assert_eq!(TOP_P.problem(Some(1.0)), None);
        assert!(REPETITION_PENALTY.problem(Some(0.0)).is_some());
    }

    #[test]
    fn defaults_are_held_to_what_a_request_may_ask() {
        let ok = GenerationDefaults {
            max_tokens: Some(16),
            temperature: Some(0.7),
            top_p: Some(0.8),
            top_k: Some(20),
            min_p: Some(0.0),
            repetition_penalty: Some(1.05),
        };
        assert_eq!(defaults_problem(&ok), None);
        assert_eq!(defaults_problem(&GenerationDefaults::default()), None);
        let bad = |g: GenerationDefaults| defaults_problem(&g).unwrap();
        assert!(bad(GenerationDefaults {
            max_tokens: Some(0),
            ..ok.clone()
        })
        .contains("`max_tokens` must be at least 1"));
        assert!(bad(GenerationDefaults {
            top_p: Some(7.0),
            ..ok.clone()
        })
        .contains("`top_p` must be between 0 and 1, found 7"));
        assert!(bad(GenerationDefaults {
            repetition_penalty: Some(0.0),
            ..ok.clone()
        })
        .contains("`repetition_penalty`"));
        assert!(bad(GenerationDefaults {
            min_p: Some(-1.0),
            ..ok
        })
        .contains("`min_p`"));
    }
}
