// A decoder layer's small steps fused into one launch each, on the GPU. A decode step of a 4B
// model is bound by launches from the host, not by the device (H200: ~7.4 ms a step where reading
// the weights takes ~1.9 ms, 18 launches per layer): each kernel here replaces several of candle's
// (a residual add and the next norm; the query/key norms, the rotation, the head split and the
// KV pool's two writes; SiLU and the gate product), computing what they computed and rounding
// where they wrote an intermediate out in the model's dtype. Compiled at run time by NVRTC behind
// common.cuh (engine/src/cuda/fused.rs).

// sum = x + y and normed = sum / √(mean(sum²) + eps) · weight, one row of `width` per block: `sum`
// and `normed` are the two halves of `out` (`rows × width` each).
//
// Grid: rows. Block: up to 1024 threads (whole warps) walking the row.
#define ADD_RMS_NORM(NAME, T, TO_F32, FROM_F32)                                                  \
  extern "C" __global__ void NAME(T *out, const T *x, const T *y, const T *weight, int width,  \
                                  float eps) {                                                 \
    const u64 row = (u64)blockIdx.x * width, half = (u64)gridDim.x * width;                    \
    T *sum = out + row, *normed = out + half + row;                                            \
    float squares = 0.f;                                                                       \
    for (int i = threadIdx.x; i < width; i += blockDim.x) {                                    \
      const T s = FROM_F32(TO_F32(x[row + i]) + TO_F32(y[row + i]));                           \
      const float f = TO_F32(s);                                                               \
      sum[i] = s;                                                                              \
      squares += f * f;                                                                        \
    }                                                                                          \
    const float scale = rsqrtf(block_sum(squares) / width + eps);                              \
    for (int i = threadIdx.x; i < width; i += blockDim.x)                                      \
      normed[i] = FROM_F32(scale * TO_F32(sum[i]) * TO_F32(weight[i]));                        \
  }

// Attention's inputs from one row of the stacked projection `qkv` — `heads` query heads, then
// `kv_heads` key heads, then as many value heads, each `head_dim` wide: every query and key head
// normalized (RMSNorm with its own weight) and rotated (RoPE, halves layout, by the row's
// `cos`/`sin`, `head_dim / 2` each); queries to `q_out` (rows, heads, head_dim), keys and values
// straight into the paged pool at the row's slot (slot, kv_heads, head_dim).
//
// Grid: (heads + kv_heads, rows). Block: head_dim / 2 threads, rounded up to whole warps; thread i
// rotates the pair (i, i + head_dim / 2).
#define ATTENTION_INPUTS(NAME, T, TO_F32, FROM_F32, ROUND)                                      \
  extern "C" __global__ void NAME(T *q_out, T *keys, T *values, const T *qkv,                  \
                                  const T *q_weight, const T *k_weight, const T *cos,          \
                                  const T *sin, const u32 *slots, int heads, int kv_heads,     \
                                  int head_dim, float eps) {                                   \
    const int head = blockIdx.x, row = blockIdx.y, half = head_dim / 2, i = threadIdx.x;       \
    const bool query = head < heads;                                                           \
    const u64 width = (u64)(heads + 2 * kv_heads) * head_dim;                                  \
    const T *src = qkv + row * width + (u64)head * head_dim;                                   \
    float a = 0.f, b = 0.f;                                                                    \
    if (i < half) {                                                                            \
      a = TO_F32(src[i]);                                                                      \
      b = TO_F32(src[i + half]);                                                               \
    }                                                                                          \
    const float scale = rsqrtf(block_sum(a * a + b * b) / head_dim + eps);                     \
    if (i >= half) return;                                                                     \
    const T *weight = query ? q_weight : k_weight;                                             \
    const float na = ROUND(scale * a * TO_F32(weight[i]));                                     \
    const float nb = ROUND(scale * b * TO_F32(weight[i + half]));                              \
    const float c = TO_F32(cos[(u64)row * half + i]), s = TO_F32(sin[(u64)row * half + i]);   \
    const int kv_head = head - heads;                                                          \
    const u64 at = ((u64)slots[row] * kv_heads + kv_head) * head_dim;                          \
    T *dst = query ? q_out + ((u64)row * heads + head) * head_dim : keys + at;                 \
    dst[i] = FROM_F32(ROUND(na * c) - ROUND(nb * s));                                          \
    dst[i + half] = FROM_F32(ROUND(na * s) + ROUND(nb * c));                                   \
    if (!query) {                                                                              \
      const T *v = src + (u64)kv_heads * head_dim;                                             \
      values[at + i] = v[i];                                                                   \
      values[at + i + half] = v[i + half];                                                     \
    }                                                                                          \
  }

// out = silu(gate) · up from `gate_up` = (rows, [gate | up]), each `width` wide.
//
// Grid: (⌈width / block⌉, rows). Block: up to 256 threads, one element each.
#define SWIGLU(NAME, T, TO_F32, FROM_F32, ROUND)                                                 \
  extern "C" __global__ void NAME(T *out, const T *gate_up, int width) {                       \
    const int i = blockIdx.x * blockDim.x + threadIdx.x;                                       \
    if (i >= width) return;                                                                    \
    const u64 row = blockIdx.y;                                                                \
    const float g = TO_F32(gate_up[row * 2 * width + i]);                                      \
    const float u = TO_F32(gate_up[row * 2 * width + width + i]);                              \
    out[row * width + i] = FROM_F32(ROUND(g / (1.f + __expf(-g))) * u);                        \
  }

#define FUSED(SUFFIX, T, TO_F32, FROM_F32, ROUND)                                                \
  ADD_RMS_NORM(add_rms_norm_##SUFFIX, T, TO_F32, FROM_F32)                                       \
  ATTENTION_INPUTS(attention_inputs_##SUFFIX, T, TO_F32, FROM_F32, ROUND)                        \
  SWIGLU(swiglu_##SUFFIX, T, TO_F32, FROM_F32, ROUND)

FUSED(f32, float, IDENTITY, IDENTITY, IDENTITY)
FUSED(bf16, u16, bf16_to_f32, f32_to_bf16, ROUND_BF16)
FUSED(f16, u16, f16_to_f32, f32_to_f16, ROUND_F16)
