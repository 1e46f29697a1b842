//! `pio list --start`: starts every ready plugin in its confined worker, loads its model, and
//! reports what the supervisor sees (pid, tier applied, state, restarts, memory from the cgroup),
//! then stops them all. A dry run of what the daemon would serve.

use anyhow::Context;
use pio_host::config::Config;
use pio_host::discovery::{Candidate, Status};
use pio_host::launch;
use pio_host::sandbox::{HostSupport, Policy};
use pio_host::supervisor::Supervised;
use pio_host::units::ByteSize;
use serde_json::{json, Value};

/// One started (or refused) plugin.
pub struct Started {
    /// The plugin.
    pub name: String,
    /// What the supervisor reported, or why the worker could not start.
    pub outcome: Result<pio_host::supervisor::Status, String>,
}

/// Starts each ready candidate, reads its status, stops it.
pub fn start_all(
    candidates: &[Candidate],
    config: &Config,
    policy: &Policy,
) -> anyhow::Result<Vec<Started>> {
    let exe = std::env::current_exe().context("cannot find the running `pio` executable")?;
    let host = HostSupport::detect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut started = Vec::new();
    for c in candidates
        .iter()
        .filter(|c| matches!(c.status, Status::Ready))
    {
        let (Some(manifest), Some(library)) = (&c.manifest, &c.library) else {
            continue;
        };
        let outcome = match launch::plan(manifest, config, policy, &host) {
            Err(e) => Err(e.to_string()),
            Ok(plan) => {
                let model = launch::model_config(manifest, &c.manifest_path);
                let spec = launch::worker_spec(&manifest.name, library, &model, plan, exe.clone());
                runtime.block_on(async {
                    match Supervised::start(spec, model, config.restart_policy()).await {
                        Ok((plugin, _)) => {
                            let status = plugin.status();
                            plugin.stop().await;
                            Ok(status)
                        }
                        Err(e) => Err(e.to_string()),
                    }
                })
            }
        };
        started.push(Started {
            name: manifest.name.clone(),
            outcome,
        });
    }
    Ok(started)
}

/// The workers table.
pub fn table(started: &[Started]) -> String {
    let mut out = String::from("\nWORKERS (started, checked, stopped)\n");
    for s in started {
        match &s.outcome {
            Ok(st) => {
                let stats = st.stats.clone().unwrap_or_default();
                let size = |b: Option<u64>| b.map_or("-".to_string(), |b| ByteSize(b).to_string());
                out.push_str(&format!(
                    "{}  pid {}  tier {}  {:?}  restarts {}  memory {} of {}\n",
                    s.name,
                    st.pid.map_or("-".into(), |p| p.to_string()),
                    st.tier,
                    st.state,
                    st.restarts,
                    size(stats.memory_bytes),
                    size(stats.memory_limit_bytes),
                ));
            }
            Err(e) => out.push_str(&format!("{}  failed to start: {e}\n", s.name)),
        }
    }
    out
}

/// The workers as JSON, keyed by plugin name.
pub fn json(started: &[Started]) -> Value {
    started
        .iter()
        .map(|s| {
            let value = match &s.outcome {
                Ok(st) => json!({
                    "pid": st.pid,
                    "tier": st.tier,
                    "state": st.state,
                    "restarts": st.restarts,
                    "memory_bytes": st.stats.as_ref().and_then(|x| x.memory_bytes),
                    "memory_limit_bytes": st.stats.as_ref().and_then(|x| x.memory_limit_bytes),
                }),
                Err(e) => json!({ "error": e }),
            };
            (s.name.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
