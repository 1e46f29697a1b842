//! Running as a service: the daemon's systemd notifications (`Type=notify`) on a socket of the
//! test's own, the shipped unit file checked by `systemd-analyze verify`, and the container and
//! Kubernetes files checked against what the daemon accepts.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::daemon::{qwen_dir, Daemon};
use crate::support::{pio_bin, repo_root};
use crate::worker::confinement_available;

/// The next notification that is not a watchdog ping, failing after a minute.
fn next(socket: &UnixDatagram, pings: &mut usize) -> String {
    let mut buf = [0u8; 512];
    loop {
        // A receive with a timeout is not restarted after a signal handler runs, even with
        // SA_RESTART (signal(7)), and this process has handlers (tokio's SIGCHLD): try again.
        let len = match socket.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            got => got.expect("a notification within a minute"),
        };
        let msg = String::from_utf8_lossy(&buf[..len]).to_string();
        if msg == "WATCHDOG=1" {
            *pings += 1;
        } else {
            return msg;
        }
    }
}

#[test]
fn systemd_hears_ready_reloading_stopping_and_the_watchdog() {
    if !confinement_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "300000"),
    ];
    let mut d = Daemon::start_env(qwen_dir(""), "", &[], &env);
    let mut pings = 0;
    let ready = next(&socket, &mut pings);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 2 of 2 models"),
        "{ready}"
    );
    assert_eq!(d.get("/ready").0, 200, "READY=1 means /ready answers 200");

    // Workers do not inherit the socket (systemd would take their messages for the daemon's).
    let (_, plugins) = d.get("/v1/plugins");
    let pids: Vec<u64> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 2, "{plugins}");
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(
            !environ.contains("NOTIFY_SOCKET") && !environ.contains("WATCHDOG_USEC"),
            "{pid}"
        );
    }

    std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    let reloading = next(&socket, &mut pings);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let again = next(&socket, &mut pings);
    assert!(again.starts_with("READY=1"), "{again}");

    std::thread::sleep(Duration::from_millis(400));
    d.terminate();
    let stopping = next(&socket, &mut pings);
    assert_eq!(stopping, "STOPPING=1\nSTATUS=draining");
    assert!(d.wait_exit(60).success());
    assert!(pings >= 2, "WATCHDOG=1 every 150 ms: {pings}");
}

/// `packaging/pio.service` passes `systemd-analyze verify` with no warning (CI installs
/// systemd; elsewhere the test is skipped without it).
#[test]
fn the_shipped_unit_file_verifies() {
    let have = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(std::env::var_os("CI").is_none(), "CI must install systemd");
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(repo_root().join("packaging/pio.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/pio serve"),
        "{unit}"
    );
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pio.service");
    let bin = pio_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/pio", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The container and Kubernetes files: their configuration and manifests are ones the daemon
/// accepts, the probes and ports are the daemon's, and a pod has time to drain. (The YAML is
/// read with PyYAML: CI installs it with the API tests' requirements.)
#[test]
fn the_container_and_kubernetes_files_agree_with_the_daemon() {
    use pio_host::config::Config;
    let root = repo_root();
    let image = Config::load(&root.join("packaging/pio.container.toml")).unwrap();
    assert_eq!(image.server.listen, "0.0.0.0:8080");
    let dockerfile = std::fs::read_to_string(root.join("packaging/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("EXPOSE 8080")
            && dockerfile.contains("COPY packaging/pio.container.toml /etc/pio/pio.toml")
    );
    // `docker run pio --allow-downgrade` replaces CMD: the configuration must not live there.
    assert!(
        dockerfile.contains("ENV PIO_CONFIG=/etc/pio/pio.toml") && !dockerfile.contains("CMD "),
        "{dockerfile}"
    );
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("pio.toml"),
        "[server]
queue_depth = 0
",
    )
    .unwrap();
    let out = std::process::Command::new(pio_bin())
        .current_dir(bad.path())
        .args(["list", "--plugins", "."])
        .env("PIO_CONFIG", bad.path().join("pio.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pio.toml") && err.contains("queue_depth"),
        "PIO_CONFIG is read: {err}"
    );

    let yaml = std::process::Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(root.join("packaging/kubernetes/pio.yaml"))
        .output()
        .unwrap();
    if !yaml.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install PyYAML (tests/api/requirements.txt)"
        );
        eprintln!("skipped: python3 with PyYAML is not installed");
        return;
    }
    let docs: Vec<serde_json::Value> = serde_json::from_slice(&yaml.stdout).unwrap();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("pio.toml");
    std::fs::write(
        &config_path,
        kind("Secret")["stringData"]["pio.toml"].as_str().unwrap(),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    assert!(!config.server.api_keys.is_empty() && !config.server.metrics_keys.is_empty());
    assert_eq!(
        kind("Secret")["stringData"]["metrics-key"].as_str(),
        config.server.metrics_keys.first().map(String::as_str),
        "the ServiceMonitor's key is one the daemon takes"
    );
    for (name, text) in kind("ConfigMap")["data"].as_object().unwrap() {
        let path = dir.path().join(name);
        pio_host::manifest::Manifest::parse(&path, text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let pod = &kind("Deployment")["spec"]["template"]["spec"];
    // The configuration holds the keys: root's alone (0600), out of the workers' reach.
    let volumes = pod["volumes"].as_array().unwrap();
    let secret = volumes.iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(secret["secret"]["defaultMode"], 0o600, "{secret}");
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(config.server.listen.ends_with(&format!(":{port}")));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.server.drain_timeout_secs,
        "{grace} s to drain"
    );
    assert_eq!(kind("PodDisruptionBudget")["spec"]["minAvailable"], 1);
    let monitor = &kind("ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(monitor["path"], "/metrics");
}
