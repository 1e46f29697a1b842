//! Every fuzz target over its committed seed corpus (`fuzz/corpus/<target>/`) and every input that
//! once crashed or hung it (`fuzz/regressions/<target>/`): each must return within ten seconds
//! without a panic — even one the code under test catches (libFuzzer aborts on those too, and a
//! caught overflow still means a wrong answer). This is how a fuzzer's finding stays fixed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by the panic hook whenever anything panics, caught or not.
static PANICKED: AtomicBool = AtomicBool::new(false);

fn inputs(target: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    files.sort();
    files
}

#[test]
fn every_target_survives_its_corpus_and_past_findings() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default_hook(info);
    }));
    for (target, run) in pio_fuzz::TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        for file in files {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = std::thread::spawn(move || {
                run(&data);
                let _ = tx.send(());
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => assert!(
                    !PANICKED.load(Ordering::SeqCst),
                    "{target}: {} panicked, and the panic was caught (see above)",
                    file.display()
                ),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{target}: {} ran past ten seconds", file.display())
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = worker.join();
                    panic!("{target}: {} panicked (see above)", file.display())
                }
            }
        }
    }
}
