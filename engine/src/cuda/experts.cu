// A sparse layer's routed experts on the GPU, every active expert in one launch per stage, where
// candle's path launched ~8 operations per active expert (a token's 8 experts in 48 layers: ~3,000
// a step). Compiled at run time by NVRTC behind common.cuh (engine/src/cuda/experts.rs).
//
// The step's routing comes in one u32 buffer, `words` (G active experts, P (token, expert) pairs,
// T tokens):
//   group_expert[G]   each active expert, ascending
//   group_start[G+1]  where its pairs start in the pair lists
//   pair_token[P]     each pair's token, grouped by expert
//   token_start[T+1]  where each token's pairs start in token_pair
//   token_pair[P]     each token's pairs, in ascending expert order
//   pair_weight[P]    each pair's routing weight, f32 bits
// and each expert's weights by address: `gate_up` and `down` hold, per expert, the low and high
// halves of the device address of its stacked gate/up weight (2·width × hidden) and its down
// weight (hidden × width), row-major as the checkpoint stores them.
//
// Three stages, rounded where candle's path wrote a tensor in the model's dtype (ROUND), so the
// result is what that path computes but for the order of the sums inside each product:
//   1. h[p] = silu(gate_e · x_t) · (up_e · x_t) for every pair (grid: output rows, experts)
//   2. y[p] = down_e · h[p] (grid: output rows, experts), kept in f32 after rounding
//   3. out[t] = the token's y[p] · weight, added in ascending expert order (grid: tokens)
// A router whose choice is each token's k most probable experts (Qwen3-MoE) builds the words on
// the device too (route_words), so that a layer needs no copy to the host and back.

#define EXPERT_WARPS 8
// Pairs a warp carries at once: each weight row is read once per CHUNK pairs of its expert.
#define CHUNK 8

__device__ __forceinline__ const void *address(const u32 *table, int expert) {
  return (const void *)(((u64)table[2 * expert + 1] << 32) | (u64)table[2 * expert]);
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

#define EXPERTS(SUFFIX, T, TO_F32, FROM_F32, ROUND)                                          \
  extern "C" __global__ void experts_gate_up_##SUFFIX(                                      \
      T *h, const T *x, const u32 *gate_up, const u32 *words, int groups, int hidden,        \
      int width) {                                                                           \
    const int warp = threadIdx.x / LANES, lane = threadIdx.x % LANES;                        \
    const int j = blockIdx.x * EXPERT_WARPS + warp, g = blockIdx.y;                          \
    if (j >= width) return;                                                                  \
    const u32 *group_start = words + groups, *pair_token = words + 2 * groups + 1;           \
    const T *w = (const T *)address(gate_up, (int)words[g]);                                 \
    const T *gate_row = w + (u64)j * hidden, *up_row = w + (u64)(width + j) * hidden;        \
    for (u32 p0 = group_start[g]; p0 < group_start[g + 1]; p0 += CHUNK) {                    \
      const int n = (int)min((u32)CHUNK, group_start[g + 1] - p0);                           \
      float acc_gate[CHUNK], acc_up[CHUNK];                                                  \
      for (int c = 0; c < CHUNK; c++) acc_gate[c] = acc_up[c] = 0.f;                         \
      for (int d = lane; d < hidden; d += LANES) {                                           \
        const float wg = TO_F32(gate_row[d]), wu = TO_F32(up_row[d]);                        \
        for (int c = 0; c < n; c++) {                                                        \
          const float xv = TO_F32(x[(u64)pair_token[p0 + c] * hidden + d]);                  \
          acc_gate[c] += wg * xv;                                                            \
          acc_up[c] += wu * xv;                                                              \
        }                                                                                    \
      }                                                                                      \
      for (int c = 0; c < n; c++) {                                                          \
        const float gate = ROUND(warp_sum(acc_gate[c])), up = ROUND(warp_sum(acc_up[c]));     \
        if (lane == 0) h[(u64)(p0 + c) * width + j] = FROM_F32(silu(gate) * up);             \
      }                                                                                      \
    }                                                                                        \
  }                                                                                          \
                                                                                             \
  extern "C" __global__ void experts_down_##SUFFIX(                                         \
      float *y, const T *h, const u32 *down, const u32 *words, int groups, int hidden,       \
      int width) {                                                                           \
    const int warp = threadIdx.x / LANES, lane = threadIdx.x % LANES;                        \
    const int i = blockIdx.x * EXPERT_WARPS + warp, g = blockIdx.y;                          \
    if (i >= hidden) return;                                                                 \
    const u32 *group_start = words + groups;                                                 \
    const T *row = (const T *)address(down, (int)words[g]) + (u64)i * width;                 \
    for (u32 p0 = group_start[g]; p0 < group_start[g + 1]; p0 += CHUNK) {                    \
      const int n = (int)min((u32)CHUNK, group_start[g + 1] - p0);                           \
      float acc[CHUNK];                                                                      \
      for (int c = 0; c < CHUNK; c++) acc[c] = 0.f;                                          \
      for (int d = lane; d < width; d += LANES) {                                            \
        const float wd = TO_F32(row[d]);                                                     \
        for (int c = 0; c < n; c++) acc[c] += wd * TO_F32(h[(u64)(p0 + c) * width + d]);     \
      }                                                                                      \
      for (int c = 0; c < n; c++) {                                                          \
        const float v = ROUND(warp_sum(acc[c]));                                             \
        if (lane == 0) y[(u64)(p0 + c) * hidden + i] = v;                                    \
      }                                                                                      \
    }                                                                                        \
  }                                                                                          \
                                                                                             \
  /* weight_in_dtype: the weight rounded to T before the product (Qwen3-MoE casts its        \
     routing weights); else the product is taken in f32 and rounded once (GLM). */           \
  extern "C" __global__ void experts_sum_##SUFFIX(                                          \
      T *out, const float *y, const u32 *words, int groups, int pairs, int tokens,           \
      int hidden, int weight_in_dtype) {                                                     \
    const int t = blockIdx.x;                                                                \
    const u32 *token_start = words + 2 * groups + 1 + pairs;                                 \
    const u32 *token_pair = token_start + tokens + 1;                                        \
    const u32 *pair_weight = token_pair + pairs;                                             \
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {                                 \
      float acc = 0.f;                                                                       \
      for (u32 k = token_start[t]; k < token_start[t + 1]; k++) {                            \
        const u32 p = token_pair[k];                                                         \
        float weight = __uint_as_float(pair_weight[p]);                                      \
        if (weight_in_dtype) weight = ROUND(weight);                                         \
        acc = ROUND(acc + ROUND(y[(u64)p * hidden + i] * weight));                           \
      }                                                                                      \
      out[(u64)t * hidden + i] = FROM_F32(acc);                                              \
    }                                                                                        \
  }

EXPERTS(f32, float, IDENTITY, IDENTITY, IDENTITY)
EXPERTS(bf16, u16, bf16_to_f32, f32_to_bf16, ROUND_BF16)
EXPERTS(f16, u16, f16_to_f32, f32_to_f16, ROUND_F16)

// The routing words for `tokens` tokens each routed to its k most probable experts, from `best`
// (per token: k expert ids, then their probabilities' bits, best first, ties to the lower id, as
// top_k.cu writes them): G = min(experts, tokens·k) group slots — the active experts ascending,
// then empty slots (expert 0, no pairs) — so that the stages' grids hold no more groups than can
// be active; P = tokens·k. The weights are the probabilities, divided by their sum over the k
// (summed best first, as the host's router does) when `normalize`.
// One block, a thread per expert (blockDim.x >= experts, at most 1024).
extern "C" __global__ void route_words(u32 *words, const u32 *best, int tokens, int k,
                                       int experts, int normalize) {
  const int e = threadIdx.x, pairs = tokens * k, groups = min(experts, pairs);
  u32 *group_start = words + groups, *pair_token = words + 2 * groups + 1;
  u32 *token_start = pair_token + pairs, *token_pair = token_start + tokens + 1;
  u32 *pair_weight = token_pair + pairs;
  __shared__ u32 counts[1024], starts[1024];
  if (e < experts) {
    u32 c = 0;
    for (int t = 0; t < tokens; t++)
      for (int s = 0; s < k; s++) c += best[(u64)t * 2 * k + s] == (u32)e;
    counts[e] = c;
  }
  for (int t = threadIdx.x; t <= tokens; t += blockDim.x) token_start[t] = (u32)(t * k);
  __syncthreads();
  if (threadIdx.x == 0) {
    u32 at = 0;
    int g = 0;
    group_start[0] = 0;
    for (int x = 0; x < experts; x++) {
      starts[x] = at;
      if (counts[x] == 0) continue;
      words[g] = (u32)x;
      group_start[++g] = at += counts[x];
    }
    for (; g < groups; g++) {
      words[g] = 0;
      group_start[g + 1] = at;
    }
  }
  __syncthreads();
  if (e >= experts) return;
  u32 p = starts[e];
  for (int t = 0; t < tokens; t++) {
    const u32 *row = best + (u64)t * 2 * k;
    for (int s = 0; s < k; s++) {
      if (row[s] != (u32)e) continue;
      float sum = 1.f;
      if (normalize) {
        sum = 0.f;
        for (int i = 0; i < k; i++) sum += __uint_as_float(row[k + i]);
      }
      // A token's pairs in ascending expert order: this one's place among its k ids.
      int rank = 0;
      for (int i = 0; i < k; i++) rank += row[i] < (u32)e;
      pair_token[p] = (u32)t;
      token_pair[t * k + rank] = p;
      // Correctly rounded, as the host divides, whatever the compiler's fast-math options.
      pair_weight[p] = __float_as_uint(__fdiv_rn(__uint_as_float(row[k + s]), sum));
      p++;
    }
  }
}
