#!/usr/bin/env bash
# A CUDA toolkit from the Python package registry, enough to *build* the `cuda` feature on a machine
# without a GPU or an installed toolkit (CI does this). Prints the environment to use it:
#   eval "$(tests/gpu/toolkit.sh)"
# nvcc compiles candle's kernels to PTX; the runtime libraries are only linked against (the driver's
# libcuda comes with the machine that runs it, so a stub stands in for it at link time).
# With a toolkit installed (`/usr/local/cuda`), none of this is needed: see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/../.."

prefix=${PIO_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}
root=$prefix/nvidia/cu13
# CUDA 13.0: nvcc with its front end (crt headers, nvvm) and libcu++ (cccl) for the fp16/bf16 headers;
# the -cu12 wheels carry ptxas only. 13.0, the first 13.x, because a driver loads PTX from its own
# CUDA version or older only: candle's kernels built by 13.0 load under any 13.x driver (the lent
# H200's is 580, CUDA 13.0). Versions pinned so a CI run is repeatable.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)

if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/include/crt/host_config.h" ] || [ ! -e "$root/include/nv/target" ] || [ ! -e "$root/lib/libcublas.so.13" ] \
  || [ "$(cat "$prefix/.pins" 2>/dev/null)" != "${wheels[*]}" ]; then
  echo "installing the CUDA toolkit wheels into $prefix" >&2
  # pip --target does not merge into an existing `nvidia` folder: start from an empty one.
  rm -rf "$prefix"
  pip3 install -q --no-deps --no-cache-dir --target "$prefix" "${wheels[@]}" >&2 2>/dev/null \
    || pip3 install -q --no-deps --no-cache-dir --break-system-packages --target "$prefix" "${wheels[@]}" >&2
  echo "${wheels[*]}" >"$prefix/.pins"
fi

# The linker looks for unversioned names; the wheels ship only the versioned ones.
links=$prefix/link
mkdir -p "$links"
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
  ln -sf "$root/lib/$lib" "$links/${lib%%.so.*}.so"
done
# A stand-in libcuda.so for the link step: every driver function cudarc declares, doing nothing.
# Plugins (shared libraries) could leave those symbols undefined, but the GPU test and bench
# executables must resolve them when linked; at run time the driver's libcuda.so.1 (the same
# soname) is loaded instead.
if [ ! -s "$links/libcuda.so" ] || ! nm -D "$links/libcuda.so" | grep -q cuInit; then
  cudarc=$(cargo metadata --format-version 1 --features pio-engine/cuda --filter-platform "$(rustc -vV | sed -n "s/host: //p")" | python3 -c '
import json, sys, os
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  grep -ho 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | sort -u |
    sed 's/pub unsafe fn \(.*\)/void \1(void) {}/' |
    cc -x c -shared -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1 -
fi

cat <<EOF
export PATH="$root/bin:\$PATH"
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export LIBRARY_PATH="$links\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
EOF
