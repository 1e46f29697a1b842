//! How discovery results are shown: a table for people, JSON for scripts.

use serde_json::{json, Value};

use crate::discovery::{Candidate, Status};

/// One row of `pio list`, as JSON.
pub fn candidate_json(c: &Candidate) -> Value {
    let manifest = c.manifest.as_ref();
    let (status, error, kind) = match &c.status {
        Status::Ready => ("ready", None, None),
        Status::Superseded { by } => (
            "superseded",
            Some(format!("superseded by version {by}")),
            None,
        ),
        Status::Failed(e) => ("error", Some(e.to_string()), Some(e.kind().to_string())),
    };
    json!({
        "name": manifest.map(|m| m.name.clone()),
        "version": manifest.map(|m| m.version.to_string()),
        "family": c.report.as_ref().map(|r| r.family.clone()),
        "capabilities": c.report.as_ref().map(|r| r.capabilities.names()),
        "api_version": c.report.as_ref().map(|r| r.api_version.clone()),
        "tier": manifest.map(|m| m.tier.to_string()),
        "manifest": c.manifest_path.display().to_string(),
        "library": c.library.as_ref().map(|l| l.display().to_string()),
        "status": status,
        "error_kind": kind,
        "error": error,
    })
}

/// `pio list`'s table: NAME VERSION FAMILY TIER STATUS, one row per manifest.
pub fn candidates_table(candidates: &[Candidate]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "VERSION".to_string(),
        "FAMILY".to_string(),
        "TIER".to_string(),
        "STATUS".to_string(),
    ]];
    for c in candidates {
        let m = c.manifest.as_ref();
        let fallback_name = c
            .manifest_path
            .file_stem()
            .map(|s| format!("({})", s.to_string_lossy()))
            .unwrap_or_default();
        let status = match &c.status {
            Status::Ready => "ready".to_string(),
            Status::Superseded { by } => format!("superseded by {by}"),
            Status::Failed(e) => format!("error: {e}"),
        };
        rows.push([
            m.map(|m| m.name.clone()).unwrap_or(fallback_name),
            m.map(|m| m.version.to_string())
                .unwrap_or_else(|| "-".into()),
            c.report
                .as_ref()
                .map(|r| r.family.clone())
                .unwrap_or_else(|| "-".into()),
            m.map(|m| m.tier.to_string()).unwrap_or_else(|| "-".into()),
            status,
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|col| {
            rows.iter()
                .map(|r| r[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        for (col, width) in widths.iter().enumerate() {
            out.push_str(&format!("{:<width$}  ", row[col], width = *width));
        }
        out.push_str(&row[4]);
        out.push('\n');
    }
    out
}
