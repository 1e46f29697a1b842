#!/usr/bin/env bash
# The GPU checks, as one script for a machine with an NVIDIA GPU (sized for under 10 minutes on
# one): build the `cuda` feature, run the engine's GPU tests (parity with transformers' goldens in
# f32, bf16 against the CPU's bf16 error, batched parity, the paged decode kernel against candle's
# gather path, the memory cap), then a short benchmark on a Qwen3-4B-shaped checkpoint in bf16:
# single-stream decode and 32 streams at once, beside the device's memory-bandwidth limit.
#
#   tests/gpu/run.sh [--no-bench]
#
# The toolkit: an installed one (nvcc on the PATH, CUDA_COMPUTE_CAP set or detected), else the
# registry's wheels (tests/gpu/toolkit.sh, needs pip and a network). The bench checkpoint:
# PIO_GPU_BENCH_MODEL (a Qwen3ForCausalLM snapshot, e.g. the real Qwen3-4B-Instruct-2507), else
# one generated with transformers (tests/bench/make_checkpoint.py qwen3-4b), else the bench is
# skipped with a message. Figures are printed and written to target/gpu/bench.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."

bench=1
[ "${1:-}" = "--no-bench" ] && bench=0

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi -L fails): nothing to check; CI builds the feature without one"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader

if ! command -v nvcc >/dev/null 2>&1; then
  eval "$(tests/gpu/toolkit.sh)"
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  export CUDA_COMPUTE_CAP
fi
# The wheels' runtime libraries, when that is where the toolkit came from.
if [ -n "${CUDA_ROOT:-}" ] && [ -d "$CUDA_ROOT/lib" ]; then
  export LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
mkdir -p target/gpu

echo "== build (cuda feature)"
# One feature set for every step, so each builds on the last (candle's kernels compile once).
cargo build --release -p pio-host -p pio-plugin-qwen3 --features pio-engine/cuda

echo "== GPU tests"
cargo test --release -p pio-engine --features pio-engine/cuda --test gpu -- --test-threads=1 --nocapture

[ $bench = 1 ] || exit 0
# Workers run as an unprivileged uid with a cleared environment: what they read (library, model,
# CUDA libraries) goes where any uid can read it, and the libraries where the loader looks.
shared=/var/tmp/pio-gpu-bench
mkdir -p "$shared" && chmod 755 "$shared"
install -m 644 target/release/libpio_plugin_qwen3.so "$shared/"
if [ -n "${CUDA_ROOT:-}" ] && [ -d "$CUDA_ROOT/lib" ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$shared/cuda-lib" && cp -a "$CUDA_ROOT/lib/." "$shared/cuda-lib/" && chmod -R a+rX "$shared/cuda-lib"
  echo "$shared/cuda-lib" >/etc/ld.so.conf.d/pio-gpu-bench.conf && ldconfig
fi
model=${PIO_GPU_BENCH_MODEL:-$shared/qwen3-4b-random}
if [ ! -f "$model/config.json" ]; then
  if python3 -c "import torch, transformers" >/dev/null 2>&1; then
    python3 tests/bench/make_checkpoint.py "$model" qwen3-4b
    # Token ids only name rows of a random model: the fixture's tokenizer and template will do.
    for f in tokenizer.json tokenizer_config.json generation_config.json; do
      cp tests/fixtures/qwen3-tiny/$f "$model/"
    done
  else
    echo "bench skipped: no checkpoint at $model and no torch/transformers to generate one"
    echo "(set PIO_GPU_BENCH_MODEL to a Qwen3-4B snapshot, or pip install -r tests/fixtures/requirements.txt)"
    exit 0
  fi
fi

manifests=target/gpu/manifests
mkdir -p "$manifests"
cat >"$manifests/qwen3-gpu.toml" <<EOF
name = "qwen3-gpu"
version = "0.1.0"
library = "$shared/libpio_plugin_qwen3.so"
api = "^1.1"
tier = "low"

[limits]
memory = "16GiB"
gpu_memory = "${PIO_GPU_BENCH_GPU_MEMORY:-40GiB}"

[model]
path = "$(realpath "$model")"
dtype = "bf16"
device = "cuda"
EOF

pio=target/release/pio
{
  echo "== single stream (bf16, 512-word prompt, 128 tokens)"
  $pio bench qwen3-gpu --plugins "$manifests" --single-stream --output-tokens 128
  echo "== 32 streams at once (128-word prompts, 128 tokens each)"
  $pio bench qwen3-gpu --plugins "$manifests" --concurrency 32 --prompt-words 128 --output-tokens 128
  echo "== 1 stream, the same workload (the ratio's base)"
  $pio bench qwen3-gpu --plugins "$manifests" --concurrency 1 --prompt-words 128 --output-tokens 128
} 2>&1 | tee target/gpu/bench.txt
echo "== the device's memory bandwidth and the decode limit it sets"
cargo test --release -p pio-engine --features pio-engine/cuda --bench gpu -- "$model" 2>&1 | tee -a target/gpu/bench.txt
