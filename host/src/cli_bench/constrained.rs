//! `pio bench --constrained`: the same workload again with every output held to a JSON Schema,
//! and what a constrained step costs over a free one (the grammar's mask is computed beside the
//! forward pass, so the difference is what the overlap does not hide).

use anyhow::Context;
use pio_plugin_api::wire::{Constraint, Grammar};
use serde_json::{json, Value};

/// The default schema: records of several field kinds, far more of them than any run
/// generates, so every request runs to its token limit as the free run does.
fn records() -> Value {
    json!({
        "type": "array",
        "minItems": 100000,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "name": {"type": "string", "maxLength": 24},
                "score": {"type": "number"},
                "tags": {"type": "array", "items": {"enum": ["new", "old", "hot", "cold"]}, "maxItems": 3},
                "active": {"type": "boolean"}
            },
            "required": ["id", "name", "score", "tags", "active"],
            "additionalProperties": false
        }
    })
}

/// The constraint every request of the constrained run gets.
pub(super) fn constraint(schema: Option<&std::path::Path>) -> anyhow::Result<Constraint> {
    let schema = match schema {
        None => records(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --json-schema {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("--json-schema {}: not JSON", path.display()))?
        }
    };
    Ok(Constraint {
        grammar: Grammar::JsonSchema(schema),
        after: None,
    })
}

/// The relative cost of `constrained` over `free` (0.05: 5% more).
fn overhead(free: Option<f64>, constrained: Option<f64>, higher_is_faster: bool) -> Option<f64> {
    let (f, c) = (free?, constrained?);
    if f <= 0.0 || c <= 0.0 {
        return None;
    }
    Some(if higher_is_faster {
        f / c - 1.0
    } else {
        c / f - 1.0
    })
}

/// The mean of a figure over two runs (either alone if the other lacks it).
fn mean(a: &Value, b: &Value, key: &str) -> Option<f64> {
    let at = |v: &Value| key.split('.').fold(v, |v, k| &v[k]).as_f64();
    match (at(a), at(b)) {
        (Some(x), Some(y)) => Some((x + y) / 2.0),
        (x, y) => x.or(y),
    }
}

/// What the masks cost per constrained token, from the engine's counters: their computation
/// (beside the forward pass) and the sampler's wait for them (what the overlap did not hide).
fn mask_costs(constrained: &Value) -> Value {
    let e = &constrained["engine"];
    let tokens = e["guided_tokens"].as_f64().unwrap_or(0.0);
    if tokens == 0.0 {
        return Value::Null;
    }
    json!({
        "tokens": tokens,
        "compute_us_per_token": e["guide_compute_us"].as_f64().unwrap_or(0.0) / tokens,
        "wait_us_per_token": e["guide_wait_us"].as_f64().unwrap_or(0.0) / tokens,
    })
}

/// Adds the constrained run's figures, and the overheads against the mean of the free runs
/// before and after it (`free` and `again`), to the first free run's.
pub(super) fn add(free: &mut Value, constrained: Value, again: &Value) {
    let decode = overhead(
        mean(free, again, "decode_tokens_per_s"),
        constrained["decode_tokens_per_s"].as_f64(),
        true,
    );
    let itl_free = mean(free, again, "itl_ms.p50");
    let itl = overhead(itl_free, constrained["itl_ms"]["p50"].as_f64(), false);
    let output = overhead(
        mean(free, again, "output_tokens_per_s"),
        constrained["output_tokens_per_s"].as_f64(),
        true,
    );
    let masks = mask_costs(&constrained);
    // The most the masks can add to a step: the wait, plus their computation if it took the
    // forward pass's cores (it runs on a thread of its own).
    let bound = itl_free.filter(|&t| t > 0.0).and_then(|t| {
        let per = masks["wait_us_per_token"].as_f64()? + masks["compute_us_per_token"].as_f64()?;
        Some(per / 1e3 / t)
    });
    free["constrained"] = json!({
        "figures": constrained,
        "free_again": again,
        "masks": masks,
        "step_overhead_itl_p50": itl,
        "step_overhead_decode": decode,
        "step_overhead_output": output,
        "step_overhead_bound": bound,
    });
}

/// The constrained run in the table, if there was one.
pub(super) fn print(f: &Value) -> Result<(), crate::cli_run::OutputClosed> {
    let c = &f["constrained"];
    if c.is_null() {
        return Ok(());
    }
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("n/a".into(), |x| format!("{:+.1}%", x * 100.0))
    };
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    outln!("constrained (every output held to a JSON Schema), same workload:")?;
    outln!(
        "  output {:.2} tokens/s, ITL p50 {:.1} ms, {} output tokens",
        num(&c["figures"]["output_tokens_per_s"]),
        num(&c["figures"]["itl_ms"]["p50"]),
        c["figures"]["output_tokens"]
    )?;
    outln!(
        "  cost of a constrained step over a free one (free runs before and after): ITL p50 {}, decode throughput {}, output throughput {}",
        pct(&c["step_overhead_itl_p50"]),
        pct(&c["step_overhead_decode"]),
        pct(&c["step_overhead_output"])
    )?;
    let m = &c["masks"];
    if !m.is_null() {
        outln!(
            "  masks: {:.0} µs each to compute (beside the forward pass), {:.0} µs waited for per token; at most {} of a free step",
            num(&m["compute_us_per_token"]),
            num(&m["wait_us_per_token"]),
            pct(&c["step_overhead_bound"])
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn overheads_compare_like_with_like() {
        assert_eq!(overhead(Some(100.0), Some(80.0), true), Some(0.25));
        assert_eq!(
            overhead(Some(10.0), Some(11.0), false),
            Some(0.10000000000000009)
        );
        assert_eq!(overhead(None, Some(1.0), true), None);
        assert_eq!(overhead(Some(0.0), Some(1.0), true), None);
        let mut free = json!({"decode_tokens_per_s": 60.0, "itl_ms": {"p50": 18.0}, "output_tokens_per_s": 40.0});
        let again = json!({"decode_tokens_per_s": 40.0, "itl_ms": {"p50": 22.0}, "output_tokens_per_s": 40.0});
        let constrained = json!({"decode_tokens_per_s": 40.0, "itl_ms": {"p50": 25.0}, "output_tokens_per_s": 40.0,
            "engine": {"guided_tokens": 10, "guide_compute_us": 3000, "guide_wait_us": 1000}});
        add(&mut free, constrained, &again);
        let c = &free["constrained"];
        assert_eq!(c["step_overhead_itl_p50"], json!(0.25));
        assert_eq!(c["step_overhead_decode"], json!(0.25));
        assert_eq!(c["step_overhead_output"], json!(0.0));
        assert_eq!(c["masks"]["compute_us_per_token"], json!(300.0));
        assert_eq!(c["masks"]["wait_us_per_token"], json!(100.0));
        assert_eq!(c["step_overhead_bound"], json!(0.02));
    }

    #[test]
    fn a_schema_file_replaces_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, r#"{"type": "string"}"#).unwrap();
        let c = constraint(Some(&path)).unwrap();
        assert_eq!(c.grammar, Grammar::JsonSchema(json!({"type": "string"})));
        assert!(
            matches!(constraint(None).unwrap().grammar, Grammar::JsonSchema(s) if s["minItems"] == 100000)
        );
        std::fs::write(&path, "nope").unwrap();
        let e = format!("{:#}", constraint(Some(&path)).unwrap_err());
        assert!(e.contains("s.json") && e.contains("not JSON"), "{e}");
    }
}
