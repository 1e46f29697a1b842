//! The engine's CUDA kernels checked without a GPU: `emulated/harness.cpp` compiles their sources
//! as C++ (a block's threads as real threads, its barriers and warp shuffles emulated) and runs
//! each against a plain reference — the fused layer kernels, the KV pool's row writes and paged
//! attention (decode rows and prompt chunks), in f32, bf16 and f16; each row's best logits. On a device, `gpu.rs` runs them for real.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_cuda_kernels_compute_their_references_when_emulated_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("harness");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-Wall",
            "-Wno-unused-function",
            "-I",
        ])
        .arg(root.join("src/cuda"))
        .arg(root.join("tests/emulated/harness.cpp"))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| panic!("running {compiler} (a C++20 compiler; set CXX): {e}"));
    assert!(
        built.status.success(),
        "compiling the kernels as C++ failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&binary).output().unwrap();
    let report = String::from_utf8_lossy(&ran.stdout);
    println!("{report}");
    assert!(
        ran.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    // Every kernel was checked, not just compiled.
    for kernel in [
        "add_rms_norm",
        "attention_inputs",
        "swiglu",
        "scatter_rows",
        "paged_attention",
        "top_k",
        "experts",
        "route_words",
        "gemv",
    ] {
        assert!(
            report.contains(&format!("ok   {kernel}")),
            "{kernel} was not checked:\n{report}"
        );
    }
}
