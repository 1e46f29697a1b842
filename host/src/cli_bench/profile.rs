//! `pio bench --profile`: the engine's time per kind of operation (the model's
//! `[model.options] profile`, set for the run), read from the last request's outcome
//! (`timings.profile`: totals since load) and printed per token run through a forward pass.

use pio_plugin_api::wire::ModelConfig;
use serde_json::{json, Value};

/// Asks the plugin to time its operations.
pub(super) fn enable(config: &mut ModelConfig) {
    config.extra.insert("profile".into(), Value::Bool(true));
}

/// The operations as the engine reports them, in print order (microsecond totals).
const OPS: [(&str, &str); 4] = [
    ("quantized_linear_us", "quantized linear layers"),
    ("dense_linear_us", "dense linear layers"),
    ("attention_us", "attention over the KV cache"),
    ("head_us", "output head (norm, projection)"),
];

/// The profile with the most tokens among `profiles` (the totals grow from load on), with the
/// time outside the timed operations as `other_us`; `None` when the plugin reported none.
pub(super) fn latest<'a>(profiles: impl Iterator<Item = &'a Value>) -> Option<Value> {
    let mut p = profiles
        .max_by_key(|p| p["tokens"].as_u64().unwrap_or(0))?
        .clone();
    let us = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let timed: f64 = OPS.iter().map(|(k, _)| us(&p, k)).sum();
    p["other_us"] = json!((us(&p, "forward_us") - timed).max(0.0));
    Some(p)
}

/// Prints the profile's table, or why there is none.
pub(super) fn print(profile: Option<&Value>) -> Result<(), crate::cli_run::OutputClosed> {
    let Some(p) = profile else {
        return outln!("profile: the plugin reported none (its engine does not time operations)");
    };
    let us = |k: &str| p[k].as_f64().unwrap_or(0.0);
    let (tokens, forward) = (us("tokens").max(1.0), us("forward_us").max(1.0));
    outln!(
        "time per operation over {} tokens run through forward passes (prompt and output, warm-up included):",
        p["tokens"]
    )?;
    outln!("  operation                                  ms total   share   µs/token")?;
    let other = ("other_us", "other (norms, activations, RoPE, copies)");
    for (key, name) in OPS.iter().chain([&other]) {
        outln!(
            "  {name:<42} {:>9.1} {:>6.1}% {:>10.1}",
            us(key) / 1e3,
            100.0 * us(key) / forward,
            us(key) / tokens
        )?;
    }
    outln!(
        "  {:<42} {:>9.1} {:>6.1}% {:>10.1}",
        "forward passes",
        forward / 1e3,
        100.0,
        forward / tokens
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_profile_is_taken_and_the_rest_is_other() {
        let early = json!({"tokens": 10, "forward_us": 100, "attention_us": 10});
        let late = json!({"tokens": 30, "forward_us": 1000, "quantized_linear_us": 600,
            "attention_us": 100, "head_us": 200, "dense_linear_us": 0});
        let p = latest([&late, &early].into_iter()).expect("a profile");
        assert_eq!(p["tokens"], 30);
        assert_eq!(p["other_us"], 100.0);
        assert!(latest(std::iter::empty()).is_none());
        let mut config = ModelConfig::default();
        enable(&mut config);
        assert_eq!(config.extra["profile"], true);
    }
}
