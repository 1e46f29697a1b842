// Each row's k best logits on the GPU (k <= MAX_TOP_K), for a sampler that draws among its top k:
// k (id, logit) pairs go back to the host instead of the row. Compiled at run time by NVRTC
// behind common.cuh (engine/src/cuda/top_k.rs).
//
// Order: the logit's total order (Rust's f32::total_cmp, as the host's top_k uses), best first,
// ties to the lower id. Grid: one block per row; block: TOP_K_THREADS threads (a power of two).
// Each thread keeps the best k of its strided share in order (one comparison rejects almost every
// entry); then k rounds each take the best head among the threads' lists by a tree reduction in
// shared memory, and the thread it came from moves to its next.

#define TOP_K_THREADS 256
#define MAX_TOP_K 64

// A key whose unsigned order is the total order of the floats.
__device__ __forceinline__ u32 order_key(float v) {
  const u32 bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Whether (key a, id a) ranks before (key b, id b).
__device__ __forceinline__ bool ranks_before(u32 ka, u32 ia, u32 kb, u32 ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// out: per row, k ids then the k logits' bits (one u32 buffer, one copy back).
extern "C" __global__ void top_k_f32(u32 *out, const float *logits, int vocab, int k) {
  const int row = blockIdx.x, t = threadIdx.x;
  const float *x = logits + (u64)row * vocab;
  u32 keys[MAX_TOP_K], ids[MAX_TOP_K];
  int n = 0;
  for (int i = t; i < vocab; i += blockDim.x) {
    const u32 key = order_key(x[i]);
    // Entries come in increasing id, so an equal key never displaces an earlier one.
    if (n == k && key <= keys[k - 1]) continue;
    int j = n < k ? n++ : k - 1;
    for (; j > 0 && keys[j - 1] < key; j--) {
      keys[j] = keys[j - 1];
      ids[j] = ids[j - 1];
    }
    keys[j] = key;
    ids[j] = (u32)i;
  }
  __shared__ u32 best_key[TOP_K_THREADS], best_id[TOP_K_THREADS], best_from[TOP_K_THREADS];
  int head = 0;
  u32 *row_out = out + (u64)row * 2 * k;
  for (int r = 0; r < k; r++) {
    // A spent list offers the lowest key and an id past any row: every real entry ranks before.
    best_key[t] = head < n ? keys[head] : 0u;
    best_id[t] = head < n ? ids[head] : 0xffffffffu;
    best_from[t] = (u32)t;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (t < stride &&
          ranks_before(best_key[t + stride], best_id[t + stride], best_key[t], best_id[t])) {
        best_key[t] = best_key[t + stride];
        best_id[t] = best_id[t + stride];
        best_from[t] = best_from[t + stride];
      }
      __syncthreads();
    }
    if (t == 0) {
      row_out[r] = best_id[0];
      row_out[k + r] = __float_as_uint(x[best_id[0]]);
    }
    if (best_from[0] == (u32)t) head++;
    __syncthreads();
  }
}
