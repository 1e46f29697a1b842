#!/usr/bin/env bash
# Builds the `cuda` feature (release) and gathers what tests/gpu/check.sh runs into one folder, so
# that a GPU machine needs no Rust toolchain, only the CUDA libraries:
#
#   tests/gpu/pack.sh [DIR]        (default target/gpu-pack)
#
# Without nvcc on the PATH the toolkit comes from the registry's wheels (tests/gpu/toolkit.sh: CUDA
# 13.0, whose PTX any 13.x driver loads); CUDA_COMPUTE_CAP defaults to 90 (Hopper). The binaries
# keep their symbols but lose their line tables (a third of their size).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$(realpath -m "${1:-target/gpu-pack}")

if ! command -v nvcc >/dev/null 2>&1; then
  eval "$(tests/gpu/toolkit.sh)"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cuda=(--release --features pio-engine/cuda)

# The executable a `cargo test|bench --no-run` built for its one test or bench target.
built() {
  cargo "$@" --no-run --message-format=json | python3 -c '
import json, sys
msgs = [json.loads(l) for l in sys.stdin if l.startswith("{")]
print([m["executable"] for m in msgs
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and set(m["target"]["kind"]) & {"test", "bench"}][-1])'
}

cargo build "${cuda[@]}" -p pio-host -p pio-plugin-qwen3
# The hostile test plugin shows a confined GPU worker's /dev on a real driver (check.sh).
cargo build --release -p pio-test-plugin-hostile
tests=$(built test "${cuda[@]}" -p pio-engine --test gpu)
bench=$(built bench --features pio-engine/cuda -p pio-engine --bench gpu)

rm -rf "$dir" && mkdir -p "$dir"
cp "$target/release/pio" "$target/release/libpio_plugin_qwen3.so" \
  "$target/release/libpio_test_plugin_hostile.so" "$dir/"
cp "$tests" "$dir/gpu-tests"
cp "$bench" "$dir/gpu-bench"
strip --strip-debug "$dir"/*
echo "$PWD" >"$dir/build-root"
du -sh "$dir"/*
