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
# CUDA 13.5: nvcc with its front end (crt headers, nvvm) and libcu++ (cccl) for the fp16/bf16 headers;
# the -cu12 wheels carry ptxas only. Versions pinned so a CI run is repeatable.
wheels=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37 nvidia-cuda-runtime==13.5.37
  nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-nvrtc==13.5.37
  nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25)

if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/include/crt/host_config.h" ] || [ ! -e "$root/include/nv/target" ] || [ ! -e "$root/lib/libcublas.so.13" ]; then
  echo "installing the CUDA toolkit wheels into $prefix" >&2
  # pip --target does not merge into an existing `nvidia` folder: start from an empty one.
  rm -rf "$prefix"
  pip3 install -q --no-deps --target "$prefix" "${wheels[@]}" >&2 2>/dev/null \
    || pip3 install -q --no-deps --break-system-packages --target "$prefix" "${wheels[@]}" >&2
fi

# The linker looks for unversioned names; the wheels ship only the versioned ones.
links=$prefix/link
mkdir -p "$links"
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
  ln -sf "$root/lib/$lib" "$links/${lib%%.so.*}.so"
done
# An empty libcuda.so: plugins are shared libraries, so the driver's symbols may stay undefined until
# the real libcuda.so.1 is loaded beside them at run time.
if [ ! -e "$links/libcuda.so" ]; then
  echo "" | cc -x c -shared -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1 -
fi

cat <<EOF
export PATH="$root/bin:\$PATH"
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export LIBRARY_PATH="$links\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13040
EOF
