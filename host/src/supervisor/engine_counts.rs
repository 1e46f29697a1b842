//! An engine's counters summed over the workers that ran it: each worker's engine counts from
//! nothing, and a counter that went back at every restart or reload would read as a reset to
//! Prometheus (a spike in every `rate()`).

use pio_plugin_api::wire::EngineStats;

/// The counters among an engine's figures (the rest are gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineCounts {
    /// Sequences preempted for want of KV blocks.
    pub preemptions: u64,
    /// Forward passes.
    pub steps: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
}

impl EngineCounts {
    /// The counters of `figures`.
    pub fn of(figures: &EngineStats) -> Self {
        Self {
            preemptions: figures.preemptions,
            steps: figures.steps,
            prefix_hit_tokens: figures.prefix_hit_tokens,
        }
    }

    /// Both summed; `None` when neither has any (no engine ever reported).
    pub fn sum(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (None, None) => None,
            (a, b) => {
                let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
                Some(Self {
                    // The figures are a plugin's: saturating, not a panic (debug) or a wrap.
                    preemptions: a.preemptions.saturating_add(b.preemptions),
                    steps: a.steps.saturating_add(b.steps),
                    prefix_hit_tokens: a.prefix_hit_tokens.saturating_add(b.prefix_hit_tokens),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_nothing_stays_nothing() {
        let one = EngineCounts {
            preemptions: 1,
            steps: 10,
            prefix_hit_tokens: 16,
        };
        assert_eq!(EngineCounts::sum(None, None), None);
        assert_eq!(EngineCounts::sum(Some(one), None), Some(one));
        let most = EngineCounts {
            steps: u64::MAX,
            ..one
        };
        let past = EngineCounts::sum(Some(most), Some(one)).unwrap();
        assert_eq!(past.steps, u64::MAX, "saturates");
        let two = EngineCounts::sum(Some(one), Some(one)).unwrap();
        assert_eq!(
            (two.preemptions, two.steps, two.prefix_hit_tokens),
            (2, 20, 32)
        );
    }
}
