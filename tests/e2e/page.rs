//! The daemon's web page: served from the binary, open while the APIs behind it keep their keys,
//! and driven in a real browser (headless Chromium through Selenium: CI installs both;
//! elsewhere the browser part is skipped without them).

use crate::daemon::{echo_dir, run_python_checks, Daemon};
use crate::support::{manifest, plugin_lib, repo_root};
use crate::worker::confinement_available;

#[test]
fn the_page_chats_and_shows_status_in_a_real_browser() {
    if !confinement_available() {
        return;
    }
    // `thinker`: the echo plugin again, under its own name, slow and marking reasoning.
    let dir = echo_dir("");
    dir.write(
        "thinker.toml",
        &manifest(
            "thinker",
            "0.1.0",
            "libecho.so",
            "plugin = \"echo\"\n[model.options]\ndelay_ms = 40\nreasoning_format = \"glm45\"\n",
        ),
    );
    // A vision model, for the image field.
    let vl = repo_root().join("tests/fixtures/qwen3-vl-tiny");
    dir.write(
        "qwen3-vl.toml",
        &manifest(
            "qwen3-vl-2b",
            "0.1.0",
            &plugin_lib("pio_plugin_qwen3_vl").display().to_string(),
            &format!("[model]\npath = \"{}\"\ndtype = \"f32\"\n", vl.display()),
        ),
    );
    let d = Daemon::start(
        dir,
        "[server]\napi_keys = [\"user-key\"]\nadmin_keys = [\"admin-key\"]\n",
    );
    d.wait_ready();
    // The page and its files need no key; the data does.
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let response = d.agent.get(&format!("{}{path}", d.base)).call().unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        let content_type = headers["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
    }
    assert_eq!(d.get("/v1/models").0, 401);

    let have = std::process::Command::new("python3")
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success())
        && std::path::Path::new("/usr/bin/chromedriver").exists();
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium, chromium-driver and tests/browser/requirements.txt"
        );
        eprintln!("skipped: no chromium-driver or selenium (apt install chromium chromium-driver; pip install -r tests/browser/requirements.txt)");
        return;
    }
    let image = repo_root().join("tests/fixtures/images/photo.jpg");
    run_python_checks(
        &d,
        "browser/page.py",
        &[&d.base, "admin-key", image.to_str().unwrap()],
    );
}
