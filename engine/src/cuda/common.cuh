// What the engine's kernels share, put in front of each source before NVRTC compiles it
// (engine/src/cuda/mod.rs): NVRTC is given no headers, so 16-bit types are their raw bits, converted
// here. The kernels also compile as C++ on the CPU for the emulated test
// (engine/tests/emulated/harness.cpp), which defines PIO_EMULATED and brings its own f16
// conversions.

#define LANES 32

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __uint_as_float(0xff800000u)
#define IDENTITY(x) (x)

__device__ __forceinline__ float bf16_to_f32(u16 x) {
  return __uint_as_float(((u32)x) << 16);
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u32 bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return (u16)((bits >> 16) | 0x40u);  // NaN stays NaN
  }
  // Round to nearest, ties to even.
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (u16)(bits >> 16);
}

#ifndef PIO_EMULATED
__device__ __forceinline__ float f16_to_f32(u16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

// A value as the 16-bit type stores it, back in f32: where a separate kernel would have written
// an intermediate result out in that type, the fused one rounds it the same way.
#define ROUND_BF16(x) bf16_to_f32(f32_to_bf16(x))
#define ROUND_F16(x) f16_to_f32(f32_to_f16(x))

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = LANES / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The sum of `v` over the block, in every thread (blockDim.x a multiple of LANES, at most 1024;
// every thread of the block calls it).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warps[LANES];
  const int warp = threadIdx.x / LANES, lane = threadIdx.x % LANES;
  v = warp_sum(v);
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x / LANES); w++) total += warps[w];
  __syncthreads();  // before a later call writes `warps` again
  return total;
}
