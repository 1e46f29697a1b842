#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench and llama-quantize (CPU only, Release, the CPU's ISA without AMX) into
# target/bench/llama.cpp/, the outside reference for the model benchmarks (see llama_cpp_bench.py;
# `pio bench --compare-llama-cpp` runs llama-batched-bench). The source comes from the
# llama-cpp-python sdist on PyPI, which vendors llama.cpp with its GGUF converter, so nothing but a
# package registry is needed. The build runs under `nice -n 19` so that it does not disturb
# benchmarks running beside it. Idempotent: each step is skipped when its output exists.
# Prints the path of the llama-bench binary on stdout (everything else goes to stderr).
#
# Usage: tests/bench/build_llama_cpp.sh   (env: LLAMA_CPP_PYTHON_VERSION, JOBS)
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${JOBS:-2}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/target/bench/llama.cpp"
src="$out/src"
build="$out/build"
bin="$out/bin/llama-bench"  # a link into build/bin, where tests/bench/common.rs looks
batched="$out/bin/llama-batched-bench"
quantize="$out/bin/llama-quantize"

if [[ ! -x "$bin" || ! -x "$batched" || ! -x "$quantize" ]]; then
    mkdir -p "$out"
    sdist="$out/llama_cpp_python-$version.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        # Only llama-cpp-python itself as source: its build backend still comes as wheels.
        nice -n 19 python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            --dest "$out" "llama-cpp-python==$version" >&2
    fi
    if [[ ! -f "$src/CMakeLists.txt" ]]; then
        rm -rf "$src" "$out/llama_cpp_python-$version"
        tar -xzf "$sdist" -C "$out" "llama_cpp_python-$version/vendor/llama.cpp"
        mv "$out/llama_cpp_python-$version/vendor/llama.cpp" "$src"
        rm -rf "$out/llama_cpp_python-$version"
    fi
    command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
    # The CPU's own instruction set, except AMX: ggml's AMX matrix product (which -march=native
    # compiles in where the CPU has it) crashes llama-bench's prefill of Q8_0 and Q4_K files
    # (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp of llama-cpp-python 0.3.36). Without AMX
    # the AVX-512 flags are spelled out; its repacked Q4_0/Q4_K kernels stay.
    isa=(-DGGML_NATIVE=ON)
    if grep -qw amx_int8 /proc/cpuinfo; then
        isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
        for f in avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
            grep -qw "${f%%:*}" /proc/cpuinfo && isa+=("-DGGML_${f##*:}=ON")
        done
    fi
    nice -n 19 cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        "${isa[@]}" -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
    nice -n 19 cmake --build "$build" --target llama-bench llama-batched-bench llama-quantize -j "$jobs" >&2
    mkdir -p "$out/bin"
    ln -sfn ../build/bin/llama-bench "$bin"
    ln -sfn ../build/bin/llama-batched-bench "$batched"
    ln -sfn ../build/bin/llama-quantize "$quantize"
fi
# llama.cpp's converter (llama_cpp_bench.py runs it) imports sentencepiece even for BPE vocabularies.
python3 -c "import sentencepiece" 2>/dev/null ||
    python3 -m pip install --quiet "sentencepiece>=0.1.98,<0.3.0" >&2
echo "$bin"
