// Writes one layer's new key (or value) rows of a whole step into the paged KV pool in place: row
// i goes to slot slots[i]. One launch per layer and vector, where a copy per sequence and block
// cost a driver call each (32 sequences × 36 layers × 2 vectors a step). Compiled at run time by
// NVRTC behind common.cuh (engine/src/cuda/kv_write.rs); elements are copied as raw 16- or 32-bit words.
//
// Grid: rows. Block: up to 256 threads walking the row's elements.

#define SCATTER_ROWS(NAME, T)                                                                 \
  extern "C" __global__ void NAME(T *pool, const T *rows, const u32 *slots, int row_len) {    \
    const T *src = rows + (u64)blockIdx.x * row_len;                                          \
    T *dst = pool + (u64)slots[blockIdx.x] * row_len;                                         \
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) dst[i] = src[i];                  \
  }

SCATTER_ROWS(scatter_rows_u16, u16)
SCATTER_ROWS(scatter_rows_u32, u32)
