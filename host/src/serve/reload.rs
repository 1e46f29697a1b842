//! `SIGHUP`: the daemon reads its configuration file again and applies what can change while it
//! runs — keys, request limits, loading, supervision (for plugins already serving too) and plugin
//! limits (for workers started from then on) — without dropping a request. A file that does not parse is refused with
//! the reason and the running configuration kept; keys that only a restart can change (listen
//! address, plugin directories, sandbox policy, …) are named in a warning and keep their values.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;

use super::models::Models;

/// The configuration to run with after a reload, and the keys whose change waits for a restart.
/// `running` is what the daemon runs with (flags applied), `started` the file as read at start
/// (whose restart-only keys are the ones in force), `file` the file as read now.
pub fn merge(running: &Config, started: &Config, file: &Config) -> (Config, Vec<&'static str>) {
    let mut next = running.clone();
    next.limits = file.limits.clone();
    next.limits_max = file.limits_max.clone();
    next.supervisor = file.supervisor.clone();
    let (s, f) = (&mut next.server, &file.server);
    s.preload = f.preload.clone();
    s.load_on_demand = f.load_on_demand;
    s.load_wait_secs = f.load_wait_secs;
    s.max_loaded_models = f.max_loaded_models;
    s.api_keys = f.api_keys.clone();
    s.admin_keys = f.admin_keys.clone();
    s.metrics_keys = f.metrics_keys.clone();
    s.max_tokens_limit = f.max_tokens_limit;
    s.queue_depth = f.queue_depth;
    s.stall_timeout_secs = f.stall_timeout_secs;
    s.body_timeout_secs = f.body_timeout_secs;
    s.drain_timeout_secs = f.drain_timeout_secs;
    s.reload_strategy = f.reload_strategy;
    s.warmup = f.warmup;
    s.strict_readiness = f.strict_readiness;
    s.image_root = f.image_root.clone();
    s.allowed_hosts = f.allowed_hosts.clone();

    let (b, f) = (started, file);
    let fixed = [
        ("plugin_dirs", b.plugin_dirs != f.plugin_dirs),
        ("library_dirs", b.library_dirs != f.library_dirs),
        ("sandbox", b.sandbox != f.sandbox),
        ("server.listen", b.server.listen != f.server.listen),
        ("server.watch", b.server.watch != f.server.watch),
        (
            "server.keep_alive_secs",
            b.server.keep_alive_secs != f.server.keep_alive_secs,
        ),
        (
            "server.max_body_size",
            b.server.max_body_size != f.server.max_body_size,
        ),
        (
            "server.header_timeout_secs",
            b.server.header_timeout_secs != f.server.header_timeout_secs,
        ),
        (
            "server.send_buffer",
            b.server.send_buffer != f.server.send_buffer,
        ),
        (
            "server.runtime_dir",
            b.server.runtime_dir != f.server.runtime_dir,
        ),
        (
            "server.log_format",
            b.server.log_format != f.server.log_format,
        ),
    ];
    let restart = fixed
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
    (next, restart)
}

/// Reloads `path` into `models` on every `SIGHUP`, until the daemon stops, telling systemd
/// (once the daemon was ready) when a reload begins and ends.
pub async fn on_sighup(
    models: Arc<Models>,
    path: PathBuf,
    started: Config,
    systemd: Option<Arc<super::systemd::Notifier>>,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        if models.winding_down() {
            tracing::warn!(
                "SIGHUP while the daemon drains to stop: the configuration is not reloaded"
            );
            continue;
        }
        let systemd = systemd.as_ref().filter(|n| n.is_ready());
        if let Some(n) = systemd {
            n.reloading();
        }
        let loaded = Config::load(&path);
        let file = match loaded {
            Ok(file) => file,
            Err(e) => {
                tracing::error!("SIGHUP: kept the running configuration: {e}");
                if let Some(n) = systemd {
                    n.ready("serving; the configuration file did not parse, kept the running one");
                }
                continue;
            }
        };
        let before = models.config();
        let (next, restart) = merge(&before, &started, &file);
        if !restart.is_empty() {
            tracing::warn!(
                "SIGHUP: {} changed in {} but take effect only on a restart; kept as they were",
                restart.join(", "),
                path.display()
            );
        }
        models.set_config(next);
        tracing::info!(config = %path.display(), "SIGHUP: configuration reloaded");
        models.preload_newly_named(&before);
        if let Some(n) = systemd {
            n.ready("serving; configuration reloaded");
        }
    }
}

/// Answers `SIGHUP` when the daemon was started without `--config`: nothing to reload.
pub async fn without_a_file(mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        tracing::warn!("SIGHUP: pio serve was started without --config, so there is no configuration file to reload");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ByteSize;

    #[test]
    fn keys_and_limits_change_and_restart_only_keys_are_kept_and_named() {
        let mut running = Config::default();
        running.server.listen = "0.0.0.0:9000".into(); // from --listen
        let before = Config::default();
        let mut file = Config::default();
        file.server.api_keys = vec!["new".into()];
        file.server.queue_depth = 3;
        file.limits.memory = Some(ByteSize(1 << 30));
        file.server.max_body_size = ByteSize(1 << 10);
        file.sandbox.worker_uid = Some(1234);
        file.server.header_timeout_secs = 5;

        let (next, restart) = merge(&running, &before, &file);
        assert_eq!(next.server.api_keys, vec!["new".to_string()]);
        assert_eq!(next.server.queue_depth, 3);
        assert_eq!(next.limits.memory, Some(ByteSize(1 << 30)));
        assert_eq!(
            next.server.listen, "0.0.0.0:9000",
            "the flag's address stays"
        );
        assert_eq!(next.server.max_body_size, running.server.max_body_size);
        assert_eq!(next.sandbox, running.sandbox);
        assert_eq!(
            restart,
            vec![
                "sandbox",
                "server.max_body_size",
                "server.header_timeout_secs"
            ]
        );
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let mut running = Config::default();
        running.server.listen = "0.0.0.0:9000".into();
        let file = Config::default();
        let (next, restart) = merge(&running, &file, &file);
        assert_eq!(next, running);
        assert!(restart.is_empty(), "{restart:?}");
    }
}
