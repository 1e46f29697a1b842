#!/usr/bin/env bash
# The GPU checks, as one script for a machine with an NVIDIA GPU and a Rust toolchain (sized for
# under 10 minutes on one): builds the `cuda` feature (tests/gpu/pack.sh), then runs
# tests/gpu/check.sh on what it built — the engine's GPU tests (parity with transformers' goldens
# in f32, bf16 and q8/q4 against the CPU's own error, batched parity, the paged attention
# kernel against candle's gather path, the fused kernels, the memory cap), then a bench on a
# Qwen3-4B-shaped checkpoint in bf16: in process and through the worker, one stream and 32 at
# once, beside the device's memory-bandwidth limit.
#
#   tests/gpu/run.sh [--no-bench]
#
# On a GPU machine without Rust, run tests/gpu/pack.sh where Rust is, carry target/gpu-pack over
# and run tests/gpu/check.sh target/gpu-pack there. The toolkit: an installed one (nvcc on the
# PATH), else the registry's wheels (tests/gpu/toolkit.sh, needs pip and a network). The bench
# checkpoint: PIO_GPU_BENCH_MODEL (a Qwen3ForCausalLM snapshot, e.g. the real
# Qwen3-4B-Instruct-2507), else one drawn with transformers. The log: target/gpu/check.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi -L fails): nothing to check; CI builds the feature without one"
  exit 0
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  export CUDA_COMPUTE_CAP
fi
if ! command -v nvcc >/dev/null 2>&1; then
  eval "$(tests/gpu/toolkit.sh)"
  # Workers read the wheels' libraries too: somewhere any uid can (check.sh registers them).
  mkdir -p /var/tmp/pio-gpu-bench/cuda-lib && cp -a "$CUDA_ROOT/lib/." /var/tmp/pio-gpu-bench/cuda-lib/
  chmod -R a+rX /var/tmp/pio-gpu-bench
  export PIO_CUDA_LIBS=/var/tmp/pio-gpu-bench/cuda-lib
fi
tests/gpu/pack.sh target/gpu-pack
exec tests/gpu/check.sh target/gpu-pack "$@"
