#!/usr/bin/env bash
# The GPU checks on binaries built beforehand (tests/gpu/pack.sh), for a machine with an NVIDIA GPU
# and no Rust toolchain (tests/gpu/run.sh builds and then calls this):
#
#   tests/gpu/check.sh BIN_DIR [--no-bench]
#
# BIN_DIR holds `pio`, `libpio_plugin_qwen3.so`, `libpio_test_plugin_hostile.so`, `gpu-tests` (engine/tests/gpu.rs), `gpu-bench`
# (engine/benches/gpu.rs) and `build-root` (the checkout they were built in: the tests find the
# fixtures there, so it is linked to this checkout when it does not exist here). Each step runs
# under a time limit and a failed one does not stop the next; the exit status says whether all
# passed. The CUDA libraries: the system's, else PIO_CUDA_LIBS, else the ones pip installed beside PyTorch (found and
# registered with ldconfig, since workers start with a cleared environment). The bench checkpoint:
# PIO_GPU_BENCH_MODEL, else a Qwen3-4B-shaped one drawn with transformers. Everything printed goes
# to $OUT/check.log (target/gpu/check.log without OUT).
set -uo pipefail
cd "$(dirname "$0")/../.."
bins=$(realpath "$1")
bench=1
[ "${2:-}" = "--no-bench" ] && bench=0
out=${OUT:-$PWD/target/gpu}
mkdir -p "$out"
exec > >(tee "$out/check.log") 2>&1

failed=()
# step NAME SECONDS COMMAND...: runs it under a time limit, noting a failure.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local t0=$SECONDS
  if timeout --kill-after=10 "$limit" "$@"; then
    echo "-- $name: ok ($((SECONDS - t0)) s)"
  else
    echo "-- $name: FAILED (status $?, $((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}

# The bench checkpoint through the daemon's worker, as an operator runs it: at `low`, and briefly at
# `medium` and `high` (the worker's own /dev holding the GPU's nodes, the plugin told `cuda:0`;
# Landlock's device rules). Workers run as an unprivileged uid: what they
# read goes where any uid can read it.
pio_bench() {
  local model=$1 shared=/var/tmp/pio-gpu-bench tier
  mkdir -p "$shared" && chmod 755 "$shared"
  install -m 755 "$bins/pio" "$shared/pio"
  install -m 644 "$bins/libpio_plugin_qwen3.so" "$shared/"
  for tier in low medium high; do
    mkdir -p "$shared/manifests-$tier"
    cat >"$shared/manifests-$tier/qwen3-4b-instruct-2507.toml" <<EOF
name = "qwen3-4b-instruct-2507"
version = "0.1.0"
library = "$shared/libpio_plugin_qwen3.so"
api = "^1.1"
tier = "$tier"

[limits]
memory = "24GiB"
gpu_memory = "${PIO_GPU_BENCH_GPU_MEMORY:-40GiB}"

[model]
path = "$(realpath "$model")"
dtype = "bf16"
device = "cuda"
EOF
  done
  local pio=("$shared/pio" bench qwen3-4b-instruct-2507)
  # --profile: on a GPU the layers' figures are launch times on the host; the head's includes the
  # wait for the device (its output is read back), so forward vs the whole step shows what the
  # host spends outside the model (sampling, bookkeeping).
  step "worker (low): single stream, 512-word prompt, 128 tokens" 90 \
    "${pio[@]}" --plugins "$shared/manifests-low" --single-stream --output-tokens 128 --profile
  step "worker (low): 32 streams, 128-word prompts, 128 tokens each" 90 \
    "${pio[@]}" --plugins "$shared/manifests-low" --concurrency 32 --requests 32 --prompt-words 128 --output-tokens 128 --profile
  # The same, sampled as an API client that sets nothing is (the checkpoint's top-k/top-p).
  step "worker (low): 32 streams sampled" 90 \
    "${pio[@]}" --plugins "$shared/manifests-low" --concurrency 32 --requests 32 --prompt-words 128 --output-tokens 128 --sampled
  step "worker (medium): 4 streams" 60 \
    "${pio[@]}" --plugins "$shared/manifests-medium" --concurrency 4 --requests 4 --prompt-words 32 --output-tokens 16
  step "worker (high): 4 streams" 60 \
    "${pio[@]}" --plugins "$shared/manifests-high" --concurrency 4 --requests 4 --prompt-words 32 --output-tokens 16
  # Diagnostic: Landlock as `high` sets it, then CUDA's start and a context, replayed with ctypes.
  step "Landlock replay: cuInit and a context (diagnostic)" 30 \
    python3 tests/gpu/landlock_cuinit.py w:/proc/self/task
}

# A confined GPU worker's own /dev on the real driver, through the hostile test plugin: at `medium`
# the harmless devices and one GPU's nodes (its own, the control node, unified memory's), nothing
# else; at `medium` and `high` the plugin is told `cuda:0`, the only GPU CUDA counts there.
worker_dev() {
  local shared=/var/tmp/pio-gpu-dev tier said listed
  mkdir -p "$shared/model" && echo '{}' >"$shared/model/config.json"
  install -m 644 "$bins/libpio_test_plugin_hostile.so" "$shared/"
  chmod -R a+rX "$shared"
  for tier in high medium; do
    cat >"$shared/hostile.toml" <<EOF
name = "hostile"
version = "0.1.0"
library = "$shared/libpio_test_plugin_hostile.so"
api = "^1.0"
tier = "$tier"

[model]
path = "$shared/model"
device = "cuda:${PIO_GPU_ORDINAL:-0}"
EOF
    said=$("$bins/pio" run hostile --plugins "$shared" --prompt device) || return 1
    echo "$tier: $said"
    [ "$said" = "device cuda:0" ] || return 1
  done
  # Left at `medium`, where Landlock does not hide the listing.
  listed=$("$bins/pio" run hostile --plugins "$shared" --prompt "list /dev") || return 1
  echo "medium's /dev: $listed"
  # Sorted by bytes, as the plugin lists; the profiling node only where the host has it.
  echo "$listed" | grep -Eqx 'listed fd full null nvidia-uvm( nvidia-uvm-tools)? nvidia[0-9]+ nvidiactl random stderr stdin stdout urandom zero'
}

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi -L fails): nothing to check"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.sm,clocks.mem --format=csv
echo "CPU: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo)"
# Which GPU nodes this machine (or container) has, and the driver's list: the sandbox maps CUDA's
# ordinal to a node from both (host/src/sandbox/gpu.rs).
echo "nodes: $(ls -d /dev/nvidia* 2>/dev/null | tr '\n' ' ')"
grep -h "Bus Location\|Device Minor" /proc/driver/nvidia/gpus/*/information 2>/dev/null | tr -s ' \t' ' '

# The CUDA libraries the binaries link against (cuBLAS, cudart, cuRAND, NVRTC) and the driver's.
libdirs=()
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13 libcuda.so.1; do
  ldconfig -p | grep -q "$lib " && continue
  found=$(find ${PIO_CUDA_LIBS:-} /usr/local/nvidia /usr/local/cuda* /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
  [ -n "$found" ] && libdirs+=("$(dirname "$found")") || echo "warning: $lib not found"
done
if [ ${#libdirs[@]} -gt 0 ]; then
  printf '%s\n' "${libdirs[@]}" | sort -u | tee /dev/stderr >/etc/ld.so.conf.d/pio-gpu.conf && ldconfig
fi
for b in "$bins"/*; do
  [ -f "$b" ] && ldd "$b" 2>/dev/null | grep "not found" && echo "^ missing libraries of $b"
done

# The tests read the fixtures where they were built.
root=$(cat "$bins/build-root")
if [ ! -e "$root/tests/fixtures" ]; then
  mkdir -p "$(dirname "$root")" && ln -sfn "$PWD" "$root"
fi

model=${PIO_GPU_BENCH_MODEL:-/var/tmp/pio-gpu-bench/qwen3-4b-random}
if [ $bench = 1 ] && [ ! -f "$model/config.json" ]; then
  # Drawn on the GPU while the tests run (tokens only name rows: the fixture's tokenizer will do).
  mkdir -p "$(dirname "$model")"
  (PIO_CHECKPOINT_DEVICE=cuda timeout 200 python3 tests/bench/make_checkpoint.py "$model" qwen3-4b &&
    cp tests/fixtures/qwen3-tiny/{tokenizer.json,tokenizer_config.json,generation_config.json} "$model/" &&
    chmod -R a+rX "$model") >"$out/checkpoint.log" 2>&1 &
  drawing=$!
fi

step "GPU tests (engine/tests/gpu.rs)" 150 "$bins/gpu-tests" --test-threads=1 --nocapture
# `timeout` runs programs: the function goes through a shell that inherits it.
export -f worker_dev
step "a confined GPU worker's /dev" 30 env bins="$bins" bash -c worker_dev

if [ $bench = 1 ]; then
  if [ -n "${drawing:-}" ]; then
    wait "$drawing" || { echo "drawing the checkpoint failed:"; tail -20 "$out/checkpoint.log"; }
  fi
  step "in-process bench (engine/benches/gpu.rs)" 150 "$bins/gpu-bench" "$model"
  pio_bench "$model"
fi
nvidia-smi --query-gpu=memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all GPU checks passed"
