#!/usr/bin/env bash
# Runs fuzz targets under libFuzzer on the stable toolchain: `fuzz/run.sh [SECONDS] [TARGET...]`
# (default 10 s, every target). cargo-fuzz needs nightly for its default sanitizer flags, so the
# targets are built here with libfuzzer-sys and the same coverage instrumentation cargo-fuzz
# passes (SanitizerCoverage, stable -C flags), plus debug assertions and overflow checks.
# New interesting inputs go to target/fuzz/corpus/<target>/; a crash, hang or allocation over
# the limits stops the run and is written to fuzz/artifacts/<target>/ — move it to
# fuzz/regressions/<target>/ once fixed, where `cargo test -p pio-fuzz` replays it for good.
# (Built with `--cfg fuzzing`, the png crate skips CRC checks: fix a PNG finding's CRCs before
# keeping it, or the replay stops at the CRC.) FUZZ_SEED fixes libFuzzer's seed (CI: 1), so a run
# that fails fails again.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest frames openai checkpoint chat_template tool_calls images)
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
# An explicit --target keeps the instrumentation out of build scripts and proc macros.
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --profile fuzz --quiet -p pio-fuzz --features libfuzzer --target "$triple" \
  --target-dir target/fuzz "${bins[@]}"

status=0
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "== fuzz $t for ${seconds} s"
  log="target/fuzz/$t.log"
  if ! "target/fuzz/$triple/fuzz/$t" -seed="${FUZZ_SEED:-0}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -malloc_limit_mb=1024 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$t/" "target/fuzz/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1; then
    status=1
    tail -40 "$log"
    echo "!! $t failed: see fuzz/artifacts/$t/ and $log"
  fi
  grep -E "^(#[0-9]+\s+DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)" "$log" || true
done
exit $status
