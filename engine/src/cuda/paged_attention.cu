// Attention over the paged KV pool, on the GPU: every query row of a step (a decoding sequence's
// one, a prompt chunk's many) in one launch, each reading its sequence's keys and values through
// the block table in place; a row at position p attends over positions 0..=p, which is the causal
// mask. Compiled at run time by NVRTC behind common.cuh (engine/src/cuda/paged.rs).
//
// Grid: (query heads, rows, splits). Block: WARPS warps. Row r reads block table row_seqs[r] and
// attends over lens[r] positions. With one split a block writes the head's output; with more, each
// block takes one contiguous share of the positions and writes its running maximum, sum and
// unnormalized output to `part`, and a second launch (NAME_merge) weighs the shares together, as
// flash-decoding does: a single decoding sequence has only as many blocks as query heads (32 of an
// H200's 132 multiprocessors for Qwen3-4B) without them. A prompt chunk's rows fill the GPU by
// themselves; its rows re-read their sequence's keys, which the L2 cache then serves.
// Each warp walks its share of the positions UNROLL at a time (every WARPS-th group of UNROLL)
// with an online softmax (running maximum, running sum, unnormalized output), lanes splitting the
// head's dimensions; the warps' partial results are merged at the end. The UNROLL positions' loads are independent, so a warp has that
// many in flight instead of waiting for one row before it asks for the next: decode attention is
// bound by the latency of these loads, not by their bytes (on an H200, with 4 warps of one
// position each, a 4B model's single-stream decode fell from 110 to 60 tokens/s between 190 and
// 640 positions, where the bytes read grow by 0.06 GB per step).

#define WARPS 8
#define UNROLL 4
// Value dimensions per lane: value heads of up to 16 × 32 = 512 (MLA's latent cache).
#define MAX_V_PER_LANE 16
// Query (and key) head size the shared buffer holds: MLA's 512 + 64.
#define MAX_HEAD_DIM 1024

// The kernel body for element type T, read through TO_F32 and written through FROM_F32.
#define PAGED_ATTENTION(NAME, T, TO_F32, FROM_F32)                                               \
  extern "C" __global__ void NAME(                                                            \
      T *out, const T *q, const T *keys, const T *values, const u32 *block_tables,           \
      const u32 *lens, const u32 *row_seqs, float *part, int heads, int kv_heads,             \
      int head_dim, int value_dim, int block_size, int max_blocks, float scale) {             \
    const int head = blockIdx.x, row = blockIdx.y, split = blockIdx.z, splits = gridDim.z;  \
    const int warp = threadIdx.x / LANES, lane = threadIdx.x % LANES;                         \
    const int kv_head = head / (heads / kv_heads);                                            \
    const int len = (int)lens[row], chunk = (len + splits - 1) / splits;                     \
    const int begin = split * chunk, end = min(len, begin + chunk);                           \
    const u32 *table = block_tables + (u64)row_seqs[row] * max_blocks;                     \
    __shared__ float query[MAX_HEAD_DIM];                                                     \
    __shared__ float part_max[WARPS], part_sum[WARPS];                                        \
    __shared__ float part_out[WARPS][MAX_V_PER_LANE * LANES];                                 \
    const T *qh = q + ((u64)row * heads + head) * head_dim;                                \
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = TO_F32(qh[d]);       \
    __syncthreads();                                                                          \
    float m = NEG_INF, l = 0.f, acc[MAX_V_PER_LANE];                                        \
    for (int i = 0; i < MAX_V_PER_LANE; i++) acc[i] = 0.f;                                    \
    for (int base = begin + warp * UNROLL; base < end; base += WARPS * UNROLL) {              \
      u64 at[UNROLL];                                                                         \
      float s[UNROLL];                                                                        \
      for (int u = 0; u < UNROLL; u++) {                                                      \
        const int pos = min(base + u, end - 1);                                               \
        const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;     \
        at[u] = (slot * kv_heads + kv_head) * head_dim;                                       \
        s[u] = 0.f;                                                                           \
      }                                                                                       \
      for (int d = lane; d < head_dim; d += LANES) {                                          \
        const float qd = query[d];                                                            \
        for (int u = 0; u < UNROLL; u++) s[u] += qd * TO_F32(keys[at[u] + d]);               \
      }                                                                                       \
      float m_new = m;                                                                        \
      for (int u = 0; u < UNROLL; u++) {                                                      \
        s[u] = base + u < end ? warp_sum(s[u]) * scale : NEG_INF;                             \
        m_new = fmaxf(m_new, s[u]);                                                           \
      }                                                                                       \
      const float correction = __expf(m - m_new);                                             \
      float p[UNROLL];                                                                        \
      l *= correction;                                                                        \
      for (int u = 0; u < UNROLL; u++) {                                                      \
        p[u] = __expf(s[u] - m_new);                                                          \
        l += p[u];                                                                            \
      }                                                                                       \
      for (int i = 0; i < MAX_V_PER_LANE; i++) {                                              \
        const int d = lane + i * LANES;                                                       \
        if (d < value_dim) {                                                                  \
          float a = acc[i] * correction;                                                      \
          for (int u = 0; u < UNROLL; u++) a += p[u] * TO_F32(values[at[u] + d]);            \
          acc[i] = a;                                                                         \
        }                                                                                     \
      }                                                                                       \
      m = m_new;                                                                              \
    }                                                                                         \
    if (lane == 0) {                                                                          \
      part_max[warp] = m;                                                                     \
      part_sum[warp] = l;                                                                     \
    }                                                                                         \
    for (int i = 0; i < MAX_V_PER_LANE; i++) {                                                \
      const int d = lane + i * LANES;                                                         \
      if (d < value_dim) part_out[warp][d] = acc[i];                                          \
    }                                                                                         \
    __syncthreads();                                                                          \
    float top = NEG_INF;                                                                    \
    for (int w = 0; w < WARPS; w++) top = fmaxf(top, part_max[w]);                            \
    float total = 0.f;                                                                        \
    for (int w = 0; w < WARPS; w++)                                                           \
      if (part_sum[w] > 0.f) total += part_sum[w] * __expf(part_max[w] - top);                \
    float *ph = part + (((u64)row * heads + head) * splits + split) * (value_dim + 2);        \
    if (splits > 1 && threadIdx.x == 0) {                                                     \
      ph[0] = top;                                                                            \
      ph[1] = total;                                                                          \
    }                                                                                         \
    T *oh = out + ((u64)row * heads + head) * value_dim;                                   \
    for (int d = threadIdx.x; d < value_dim; d += blockDim.x) {                               \
      float v = 0.f;                                                                          \
      for (int w = 0; w < WARPS; w++)                                                         \
        if (part_sum[w] > 0.f) v += part_out[w][d] * __expf(part_max[w] - top);               \
      if (splits > 1)                                                                         \
        ph[2 + d] = v;                                                                        \
      else                                                                                    \
        oh[d] = FROM_F32(v / total);                                                          \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  extern "C" __global__ void NAME##_merge(T *out, const float *part, int heads, int value_dim, \
                                          int splits) {                                       \
    const int head = blockIdx.x, row = blockIdx.y, stride = value_dim + 2;                    \
    const float *ph = part + ((u64)row * heads + head) * splits * stride;                   \
    float top = NEG_INF, total = 0.f;                                                       \
    for (int s = 0; s < splits; s++)                                                          \
      if (ph[s * stride + 1] > 0.f) top = fmaxf(top, ph[s * stride]);                         \
    for (int s = 0; s < splits; s++)                                                          \
      if (ph[s * stride + 1] > 0.f) total += ph[s * stride + 1] * __expf(ph[s * stride] - top); \
    T *oh = out + ((u64)row * heads + head) * value_dim;                                   \
    for (int d = threadIdx.x; d < value_dim; d += blockDim.x) {                               \
      float v = 0.f;                                                                          \
      for (int s = 0; s < splits; s++)                                                        \
        if (ph[s * stride + 1] > 0.f) v += ph[s * stride + 2 + d] * __expf(ph[s * stride] - top); \
      oh[d] = FROM_F32(v / total);                                                            \
    }                                                                                         \
  }

PAGED_ATTENTION(paged_attention_f32, float, IDENTITY, IDENTITY)
PAGED_ATTENTION(paged_attention_bf16, u16, bf16_to_f32, f32_to_bf16)
PAGED_ATTENTION(paged_attention_f16, u16, f16_to_f32, f32_to_f16)
