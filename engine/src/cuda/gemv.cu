// A projection of a few rows on the GPU, y = x · Wᵀ with x of at most GEMV_ROWS rows (a decode
// step's): bound by reading W once, which cuBLAS's general products do not always reach at so few
// rows, and one launch with no library call in front. Compiled at run time by NVRTC behind
// common.cuh (engine/src/cuda/gemv.rs).
//
// W is (n, k) row-major as checkpoints store it, x (rows, k), y (rows, n); k a multiple of 8 and
// both 16-byte aligned (gemv.rs checks). Grid: ceil(n / GEMV_WARPS) blocks of GEMV_WARPS warps; a
// warp owns one output column j (W's row j) for every row of x: each lane reads 8 consecutive
// weights (16 bytes for the 16-bit types) and the same 8 of each x row (from cache: x is small
// and every warp reads it), accumulates in f32, and the warp's sum is rounded once.

#define GEMV_WARPS 8
#define GEMV_ROWS 8

// 8 consecutive elements at p (16-byte aligned for u16, 32 for float) as f32.
#ifdef PIO_EMULATED
#define LOAD16(dst, p) std::memcpy(&(dst), (p), 16)
#else
#define LOAD16(dst, p) (dst) = *(const uint4 *)(p)
#endif

__device__ __forceinline__ void load8_bf16(const u16 *p, float *out) {
  uint4 v;
  LOAD16(v, p);
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; i++) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void load8_f16(const u16 *p, float *out) {
  uint4 v;
  LOAD16(v, p);
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; i++) {
    out[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
    out[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
  }
}

__device__ __forceinline__ void load8_f32(const float *p, float *out) {
  uint4 a, b;
  LOAD16(a, p);
  LOAD16(b, p + 4);
  const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  for (int i = 0; i < 8; i++) out[i] = __uint_as_float(w[i]);
}

#define GEMV(SUFFIX, T, LOAD8, FROM_F32)                                                     \
  extern "C" __global__ void gemv_##SUFFIX(T *y, const T *x, const T *w, int rows, int n,   \
                                          int k) {                                          \
    const int warp = threadIdx.x / LANES, lane = threadIdx.x % LANES;                       \
    const int j = blockIdx.x * GEMV_WARPS + warp;                                           \
    if (j >= n) return;                                                                     \
    const T *row = w + (u64)j * k;                                                          \
    float acc[GEMV_ROWS];                                                                   \
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.f;                                       \
    for (int d = lane * 8; d < k; d += LANES * 8) {                                         \
      float wv[8], xv[8];                                                                   \
      LOAD8(row + d, wv);                                                                   \
      /* A fixed trip count with a guard keeps acc in registers. */                         \
      for (int r = 0; r < GEMV_ROWS; r++) {                                                 \
        if (r < rows) {                                                                     \
          LOAD8(x + (u64)r * k + d, xv);                                                    \
          float s = 0.f;                                                                    \
          for (int i = 0; i < 8; i++) s += wv[i] * xv[i];                                   \
          acc[r] += s;                                                                      \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
    for (int r = 0; r < GEMV_ROWS; r++) {                                                   \
      if (r < rows) {                                                                       \
        const float v = warp_sum(acc[r]);                                                   \
        if (lane == 0) y[(u64)r * n + j] = FROM_F32(v);                                     \
      }                                                                                     \
    }                                                                                       \
  }

GEMV(f32, float, load8_f32, IDENTITY)
GEMV(bf16, u16, load8_bf16, f32_to_bf16)
GEMV(f16, u16, load8_f16, f32_to_f16)
