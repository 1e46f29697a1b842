// The engine's CUDA kernels (engine/src/cuda/*.cu) compiled as C++ and run on the CPU, each
// against a plain reference, so that a kernel's indexing, reductions and rounding are checked on
// machines without a GPU (engine/tests/kernels_emulated.rs builds and runs this). A block's
// threads are real threads: __syncthreads is a barrier of the block, a warp shuffle one of the
// warp, __shared__ memory is static (blocks run one after another). What this cannot check is
// how the GPU runs them (timing, memory ordering across blocks); engine/tests/gpu.rs does that on
// a device.
//
// Exits 0 when every check passes; prints each failure and exits 1 otherwise.

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#define PIO_EMULATED
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

static std::unique_ptr<std::barrier<>> block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static std::vector<float> shuffle_slots;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x, warp = t / 32;
  shuffle_slots[t] = v;
  warp_barriers[warp]->arrive_and_wait();
  const float other = shuffle_slots[(t & ~31u) | ((t % 32) ^ (unsigned)lane_mask)];
  warp_barriers[warp]->arrive_and_wait();
  return other;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::max;
using std::min;

inline float f16_to_f32(unsigned short x) {
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return (float)h;
}
inline unsigned short f32_to_f16(float f) {
  _Float16 h = (_Float16)f;
  unsigned short x;
  std::memcpy(&x, &h, 2);
  return x;
}

struct uint4 {
  unsigned x, y, z, w;
};

#include "common.cuh"
#include "fused.cu"
#include "kv_write.cu"
#include "paged_attention.cu"
#include "top_k.cu"
#include "experts.cu"
#include "gemv.cu"

// Runs `kernel` over `grid` blocks of `block` threads, one block at a time.
static void launch(Dim3 grid, unsigned block, const std::function<void()> &kernel) {
  gridDim = grid;
  blockDim = Dim3{block, 1, 1};
  shuffle_slots.assign(block, 0.f);
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        block_barrier = std::make_unique<std::barrier<>>(block);
        warp_barriers.clear();
        for (unsigned w = 0; w < (block + 31) / 32; w++)
          warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - w * 32)));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++)
          threads.emplace_back([=, &kernel] {
            threadIdx = Dim3{t, 0, 0};
            blockIdx = Dim3{x, y, z};
            kernel();
          });
        for (auto &th : threads) th.join();
      }
}

// ---- element types: values are kept as their stored bits, compared as f32.

struct F32 {
  typedef float T;
  static constexpr const char *name = "f32";
  static float get(T v) { return v; }
  static T put(float f) { return f; }
  static constexpr double tolerance = 2e-5;
};
struct Bf16 {
  typedef unsigned short T;
  static constexpr const char *name = "bf16";
  static float get(T v) { return bf16_to_f32(v); }
  static T put(float f) { return f32_to_bf16(f); }
  static constexpr double tolerance = 1.6e-2;  // two steps of bf16's 8-bit significand
};
struct F16 {
  typedef unsigned short T;
  static constexpr const char *name = "f16";
  static float get(T v) { return f16_to_f32(v); }
  static T put(float f) { return f32_to_f16(f); }
  static constexpr double tolerance = 2e-3;
};

static int failures = 0;
static std::mt19937 rng(7);

template <class E>
static std::vector<typename E::T> random_values(size_t n, float scale, float offset = 0.f) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<typename E::T> v(n);
  for (auto &x : v) x = E::put(normal(rng) + offset);
  return v;
}

// Fails (once per check) where |got - want| > tolerance · max(1, |want|).
static void expect_close(const char *what, const char *type, const std::vector<float> &got,
                         const std::vector<double> &want, double tolerance) {
  for (size_t i = 0; i < want.size(); i++) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tolerance * std::max(1.0, std::fabs(want[i])))) {
      std::printf("FAIL %s (%s): element %zu is %.7g, expected %.7g\n", what, type, i, got[i], want[i]);
      failures++;
      return;
    }
  }
  std::printf("ok   %s (%s): %zu elements\n", what, type, want.size());
}

template <class E>
static std::vector<float> widen(const std::vector<typename E::T> &v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = E::get(v[i]);
  return out;
}

// The element as the kernels' 16-bit types round it.
template <class E>
static double rounded(double v) {
  return E::get(E::put((float)v));
}

// ---- add_rms_norm: (x + y, norm(x + y)) as candle's add and rms_norm compute them.

template <class E>
static void check_add_rms_norm(void (*kernel)(typename E::T *, const typename E::T *,
                                              const typename E::T *, const typename E::T *, int,
                                              float),
                               int rows, int width, unsigned block) {
  const float eps = 1e-6f;
  auto x = random_values<E>(rows * width, 1.f), y = random_values<E>(rows * width, 0.5f);
  auto w = random_values<E>(width, 0.2f, 1.f);
  std::vector<typename E::T> out(2 * rows * width);
  launch({(unsigned)rows, 1, 1}, block,
         [&] { kernel(out.data(), x.data(), y.data(), w.data(), width, eps); });
  std::vector<double> sum(rows * width), normed(rows * width);
  for (int r = 0; r < rows; r++) {
    double squares = 0;
    for (int i = 0; i < width; i++) {
      const int at = r * width + i;
      sum[at] = rounded<E>((double)E::get(x[at]) + E::get(y[at]));
      squares += sum[at] * sum[at];
    }
    const double scale = 1.0 / std::sqrt(squares / width + eps);
    for (int i = 0; i < width; i++) normed[r * width + i] = sum[r * width + i] * scale * E::get(w[i]);
  }
  auto got = widen<E>(out);
  char what[96];
  std::snprintf(what, sizeof what, "add_rms_norm sum, %d × %d, %u threads", rows, width, block);
  expect_close(what, E::name, std::vector<float>(got.begin(), got.begin() + rows * width), sum, 0);
  std::snprintf(what, sizeof what, "add_rms_norm norm, %d × %d, %u threads", rows, width, block);
  expect_close(what, E::name, std::vector<float>(got.begin() + rows * width, got.end()), normed,
               E::tolerance);
}

// ---- attention_inputs: per-head norm, rotation, queries out, keys and values into the pool.

template <class E>
static void check_attention_inputs(
    void (*kernel)(typename E::T *, typename E::T *, typename E::T *, const typename E::T *,
                   const typename E::T *, const typename E::T *, const typename E::T *,
                   const typename E::T *, const u32 *, int, int, int, float),
    int rows, int heads, int kv_heads, int head_dim) {
  typedef typename E::T T;
  const float eps = 1e-6f;
  const int half = head_dim / 2, width = (heads + 2 * kv_heads) * head_dim, pool_slots = 3 * rows + 5;
  auto qkv = random_values<E>(rows * width, 1.f);
  auto qw = random_values<E>(head_dim, 0.2f, 1.f), kw = random_values<E>(head_dim, 0.2f, 1.f);
  std::vector<T> cos(rows * half), sin(rows * half);
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < half; i++) {
      const double angle = (7 * r + 3) * std::pow(10000.0, -2.0 * i / head_dim);
      cos[r * half + i] = E::put((float)std::cos(angle));
      sin[r * half + i] = E::put((float)std::sin(angle));
    }
  std::vector<u32> slots(rows);
  for (int r = 0; r < rows; r++) slots[r] = (u32)(pool_slots - 1 - 3 * r);  // out of order
  const T sentinel = E::put(42.f);
  std::vector<T> keys(pool_slots * kv_heads * head_dim, sentinel), values = keys, q(rows * heads * head_dim);
  const unsigned block = std::max(32, (half + 31) / 32 * 32);
  launch({(unsigned)(heads + kv_heads), (unsigned)rows, 1}, block, [&] {
    kernel(q.data(), keys.data(), values.data(), qkv.data(), qw.data(), kw.data(), cos.data(),
           sin.data(), slots.data(), heads, kv_heads, head_dim, eps);
  });
  std::vector<double> want_q(q.size()), want_keys(keys.size(), 42.0), want_values(values.size(), 42.0);
  for (int r = 0; r < rows; r++)
    for (int h = 0; h < heads + kv_heads; h++) {
      const T *src = &qkv[r * width + h * head_dim];
      const bool query = h < heads;
      const auto &weight = query ? qw : kw;
      double squares = 0;
      for (int i = 0; i < head_dim; i++) squares += (double)E::get(src[i]) * E::get(src[i]);
      const double scale = 1.0 / std::sqrt(squares / head_dim + eps);
      std::vector<double> n(head_dim);
      for (int i = 0; i < head_dim; i++) n[i] = rounded<E>(E::get(src[i]) * scale * E::get(weight[i]));
      const size_t at = ((size_t)slots[r] * kv_heads + (h - heads)) * head_dim;
      double *dst = query ? &want_q[((size_t)r * heads + h) * head_dim] : &want_keys[at];
      for (int i = 0; i < half; i++) {
        const double c = E::get(cos[r * half + i]), s = E::get(sin[r * half + i]);
        dst[i] = rounded<E>(rounded<E>(n[i] * c) - rounded<E>(n[i + half] * s));
        dst[i + half] = rounded<E>(rounded<E>(n[i] * s) + rounded<E>(n[i + half] * c));
      }
      if (!query)
        for (int i = 0; i < head_dim; i++) want_values[at + i] = E::get(src[kv_heads * head_dim + i]);
    }
  char what[96];
  std::snprintf(what, sizeof what, "attention_inputs queries, %d rows, %d/%d heads of %d", rows, heads,
                kv_heads, head_dim);
  expect_close(what, E::name, widen<E>(q), want_q, E::tolerance);
  std::snprintf(what, sizeof what, "attention_inputs keys in the pool, %d rows", rows);
  expect_close(what, E::name, widen<E>(keys), want_keys, E::tolerance);
  std::snprintf(what, sizeof what, "attention_inputs values in the pool, %d rows", rows);
  expect_close(what, E::name, widen<E>(values), want_values, 0);
}

// ---- swiglu: silu(gate) · up.

template <class E>
static void check_swiglu(void (*kernel)(typename E::T *, const typename E::T *, int), int rows,
                         int width) {
  auto gate_up = random_values<E>(rows * 2 * width, 2.f);
  std::vector<typename E::T> out(rows * width);
  const unsigned block = std::min(256, std::max(32, (width + 31) / 32 * 32));
  launch({(unsigned)((width + block - 1) / block), (unsigned)rows, 1}, block,
         [&] { kernel(out.data(), gate_up.data(), width); });
  std::vector<double> want(rows * width);
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < width; i++) {
      const double g = E::get(gate_up[r * 2 * width + i]), u = E::get(gate_up[r * 2 * width + width + i]);
      want[r * width + i] = rounded<E>(g / (1 + std::exp(-g))) * u;
    }
  char what[64];
  std::snprintf(what, sizeof what, "swiglu, %d × %d", rows, width);
  expect_close(what, E::name, widen<E>(out), want, E::tolerance);
}

// ---- scatter_rows: row i to slot slots[i].

static void check_scatter_rows() {
  const int n = 5, row_len = 70, pool_rows = 12;
  std::vector<u32> pool(pool_rows * row_len, 7), rows(n * row_len);
  for (size_t i = 0; i < rows.size(); i++) rows[i] = 1000 + (u32)i;
  std::vector<u32> slots = {11, 0, 6, 3, 9};
  launch({n, 1, 1}, 64, [&] { scatter_rows_u32(pool.data(), rows.data(), slots.data(), row_len); });
  std::vector<double> want(pool.size(), 7);
  for (int i = 0; i < n; i++)
    for (int j = 0; j < row_len; j++) want[slots[i] * row_len + j] = rows[i * row_len + j];
  std::vector<float> got(pool.begin(), pool.end());
  expect_close("scatter_rows", "u32", got, want, 0);
}

// ---- paged_attention: every row of a step over its sequence's blocks, against causal softmax
// attention. Sequences: a first decoded token, a prompt chunk continuing at position 5 (its rows
// attend over 6..9 positions), a decode at position 13.

template <class E>
static void check_paged_attention(
    void (*kernel)(typename E::T *, const typename E::T *, const typename E::T *,
                   const typename E::T *, const u32 *, const u32 *, const u32 *, float *, int, int,
                   int, int, int, int, float),
    void (*merge)(typename E::T *, const float *, int, int, int), int heads, int kv_heads,
    int head_dim, int value_dim, int splits) {
  const int block_size = 4, pool_blocks = 16;
  const std::vector<int> starts = {0, 5, 13}, counts = {1, 4, 1};
  // Each sequence's blocks, scattered over the pool.
  const std::vector<std::vector<u32>> tables = {{5}, {2, 9, 0}, {15, 3, 7, 11}};
  const int seqs = (int)tables.size();
  int max_blocks = 0;
  for (auto &t : tables) max_blocks = std::max(max_blocks, (int)t.size());
  std::vector<u32> block_tables(seqs * max_blocks, 0), lens, row_seqs;
  for (int s = 0; s < seqs; s++) {
    for (size_t b = 0; b < tables[s].size(); b++) block_tables[s * max_blocks + b] = tables[s][b];
    for (int i = 0; i < counts[s]; i++) {
      lens.push_back((u32)(starts[s] + i + 1));
      row_seqs.push_back((u32)s);
    }
  }
  const int rows = (int)lens.size();
  auto q = random_values<E>(rows * heads * head_dim, 1.f);
  auto keys = random_values<E>(pool_blocks * block_size * kv_heads * head_dim, 1.f);
  auto values = random_values<E>(pool_blocks * block_size * kv_heads * head_dim, 1.f);
  std::vector<typename E::T> out(rows * heads * value_dim);
  std::vector<float> part(splits > 1 ? rows * heads * splits * (value_dim + 2) : 1);
  const float scale = 1.f / std::sqrt((float)head_dim);
  launch({(unsigned)heads, (unsigned)rows, (unsigned)splits}, 8 * 32, [&] {
    kernel(out.data(), q.data(), keys.data(), values.data(), block_tables.data(), lens.data(),
           row_seqs.data(), part.data(), heads, kv_heads, head_dim, value_dim, block_size,
           max_blocks, scale);
  });
  if (splits > 1)
    launch({(unsigned)heads, (unsigned)rows, 1}, 8 * 32,
           [&] { merge(out.data(), part.data(), heads, value_dim, splits); });
  std::vector<double> want(out.size());
  for (int r = 0; r < rows; r++)
    for (int h = 0; h < heads; h++) {
      const auto &table = tables[row_seqs[r]];
      const int kv = h / (heads / kv_heads), len = (int)lens[r];
      auto slot = [&](int p) { return (size_t)table[p / block_size] * block_size + p % block_size; };
      std::vector<double> score(len);
      double top = -INFINITY, total = 0;
      for (int p = 0; p < len; p++) {
        double dot = 0;
        for (int d = 0; d < head_dim; d++)
          dot += (double)E::get(q[(r * heads + h) * head_dim + d]) *
                 E::get(keys[(slot(p) * kv_heads + kv) * head_dim + d]);
        score[p] = dot * scale;
        top = std::max(top, score[p]);
      }
      for (auto &x : score) total += (x = std::exp(x - top));
      for (int d = 0; d < value_dim; d++) {
        double v = 0;
        for (int p = 0; p < len; p++)
          v += score[p] * E::get(values[(slot(p) * kv_heads + kv) * head_dim + d]);
        want[(r * heads + h) * value_dim + d] = v / total;
      }
    }
  char what[96];
  std::snprintf(what, sizeof what, "paged_attention, %d/%d heads of %d (values %d), %d splits",
                heads, kv_heads, head_dim, value_dim, splits);
  expect_close(what, E::name, widen<E>(out), want, std::max(E::tolerance, 1e-4));
}

// ---- top_k: each row's k best (id, logit), best first, ties to the lower id, in the total order
// of the floats (as Rust's f32::total_cmp). Rows with planted ties, -inf, -0/+0 and a NaN.

static void check_top_k(int rows, int vocab, int k) {
  std::mt19937 gen(rows * 1000 + k);
  std::uniform_int_distribution<int> coarse(-300, 300);
  std::vector<float> logits(rows * vocab);
  // Coarse values: many exact ties.
  for (auto &v : logits) v = coarse(gen) / 16.f;
  for (int r = 0; r < rows; r++) {
    float *x = logits.data() + r * vocab;
    x[vocab - 1] = 90.f;  // last in the row
    x[3] = x[vocab / 2] = 50.f;  // a tie between two threads' lists: the lower id first
    // A tie for the best within one thread's list (ids 256 apart): the lower id first.
    x[5] = 100.f;
    if (vocab > 5 + 256) x[5 + 256] = 100.f;
    x[7] = -INFINITY;
    x[8] = -0.f;
    x[9] = 0.f;
    if (r == 1) x[11] = __uint_as_float(0x7fc00000u);  // NaN: above +inf in the total order
  }
  std::vector<u32> out(rows * 2 * k);
  launch({(unsigned)rows, 1, 1}, 256,
         [&] { top_k_f32(out.data(), logits.data(), vocab, k); });
  auto key = [](float v) {
    u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
  };
  std::vector<float> got, want;
  for (int r = 0; r < rows; r++) {
    const float *x = logits.data() + r * vocab;
    std::vector<u32> order(vocab);
    for (int i = 0; i < vocab; i++) order[i] = (u32)i;
    std::stable_sort(order.begin(), order.end(),
                     [&](u32 a, u32 b) { return key(x[a]) > key(x[b]); });
    for (int j = 0; j < k; j++) {
      got.push_back((float)out[r * 2 * k + j]);
      want.push_back((float)order[j]);
      const u32 bits = out[r * 2 * k + k + j];
      got.push_back(bits == __float_as_uint(x[order[j]]) ? 1.f : 0.f);
      want.push_back(1.f);
    }
  }
  char what[64];
  std::snprintf(what, sizeof what, "top_k, %d rows of %d, k %d (ids, logits)", rows, vocab, k);
  expect_close(what, "f32", got, std::vector<double>(want.begin(), want.end()), 0);
}

// ---- experts: routed experts over a step's routing words, against each pair's SwiGLU MLP and
// the weighted sum in ascending expert order, rounded where candle's path rounds. Six experts of
// which 1, 3 and 4 are active over three tokens, one expert holding more pairs than a CHUNK.

template <class E>
static void check_experts(
    void (*gate_up_k)(typename E::T *, const typename E::T *, const u32 *, const u32 *, int, int,
                      int),
    void (*down_k)(float *, const typename E::T *, const u32 *, const u32 *, int, int, int),
    void (*sum_k)(typename E::T *, const float *, const u32 *, int, int, int, int, int),
    int hidden, int width, bool weight_in_dtype) {
  using T = typename E::T;
  const int experts = 6, tokens = 10;
  std::vector<std::vector<T>> gate_up(experts), down(experts);
  std::vector<u32> gate_up_table, down_table;
  for (int e = 0; e < experts; e++) {
    gate_up[e] = random_values<E>(2 * width * hidden, 0.2f);
    down[e] = random_values<E>(hidden * width, 0.2f);
    const u64 a = (u64)gate_up[e].data();
    gate_up_table.insert(gate_up_table.end(), {(u32)a, (u32)(a >> 32)});
    const u64 d = (u64)down[e].data();
    down_table.insert(down_table.end(), {(u32)d, (u32)(d >> 32)});
  }
  auto x = random_values<E>(tokens * hidden, 1.f);
  // Every token to expert 4 (10 pairs: two chunks), some to 1 and 3; listed in no order.
  std::vector<std::vector<std::pair<int, float>>> choices(tokens);
  for (int t = 0; t < tokens; t++) {
    choices[t].push_back({4, 0.5f + 0.03f * t});
    if (t % 2) choices[t].push_back({1, 0.3f});
    if (t % 3 == 0) choices[t].insert(choices[t].begin(), {3, 0.2f - 0.01f * t});
  }
  // The routing words, as models::experts::routing_words lays them out.
  std::vector<int> active;
  std::vector<std::vector<std::pair<int, float>>> by_expert(experts);
  for (int t = 0; t < tokens; t++)
    for (auto [e, w] : choices[t]) by_expert[e].push_back({t, w});
  for (int e = 0; e < experts; e++)
    if (!by_expert[e].empty()) active.push_back(e);
  std::vector<u32> words(active.begin(), active.end());
  u32 start = 0;
  words.push_back(0);
  for (int e : active) words.push_back(start += by_expert[e].size());
  std::vector<std::vector<u32>> per_token(tokens);
  std::vector<u32> weights;
  std::vector<std::pair<int, int>> pair_of;  // (expert, token)
  for (int e : active)
    for (auto [t, w] : by_expert[e]) {
      per_token[t].push_back((u32)pair_of.size());
      words.push_back((u32)t);
      weights.push_back(__float_as_uint(w));
      pair_of.push_back({e, t});
    }
  start = 0;
  words.push_back(0);
  for (auto &p : per_token) words.push_back(start += p.size());
  for (auto &p : per_token) words.insert(words.end(), p.begin(), p.end());
  words.insert(words.end(), weights.begin(), weights.end());
  const int groups = (int)active.size(), pairs = (int)pair_of.size();

  std::vector<T> h(pairs * width), out(tokens * hidden);
  std::vector<float> y(pairs * hidden);
  launch({(unsigned)((width + 7) / 8), (unsigned)groups, 1}, 8 * 32, [&] {
    gate_up_k(h.data(), x.data(), gate_up_table.data(), words.data(), groups, hidden, width);
  });
  launch({(unsigned)((hidden + 7) / 8), (unsigned)groups, 1}, 8 * 32, [&] {
    down_k(y.data(), h.data(), down_table.data(), words.data(), groups, hidden, width);
  });
  launch({(unsigned)tokens, 1, 1}, 128, [&] {
    sum_k(out.data(), y.data(), words.data(), groups, pairs, tokens, hidden, weight_in_dtype);
  });

  auto round = [](double v) { return (double)E::get(E::put((float)v)); };
  std::vector<double> want(tokens * hidden);
  for (int t = 0; t < tokens; t++) {
    std::vector<double> acc(hidden, 0.0);
    auto mine = choices[t];
    std::sort(mine.begin(), mine.end());
    for (auto [e, w] : mine) {
      std::vector<double> inner(width);
      for (int j = 0; j < width; j++) {
        double g = 0, u = 0;
        for (int d = 0; d < hidden; d++) {
          const double xv = E::get(x[t * hidden + d]);
          g += E::get(gate_up[e][j * hidden + d]) * xv;
          u += E::get(gate_up[e][(width + j) * hidden + d]) * xv;
        }
        g = round(g), u = round(u);
        inner[j] = round(g / (1 + std::exp(-g)) * u);
      }
      const double weight = weight_in_dtype ? round(w) : (double)w;
      for (int i = 0; i < hidden; i++) {
        double v = 0;
        for (int d = 0; d < width; d++) v += E::get(down[e][i * width + d]) * inner[d];
        acc[i] = round(acc[i] + round(round(v) * weight));
      }
    }
    for (int i = 0; i < hidden; i++) want[t * hidden + i] = acc[i];
  }
  char what[96];
  std::snprintf(what, sizeof what, "experts, hidden %d, width %d, %d pairs, weight %s", hidden,
                width, pairs, weight_in_dtype ? "in the dtype" : "in f32");
  expect_close(what, E::name, widen<E>(out), want, std::max(E::tolerance, 1e-4));
}

// ---- gemv: y = x · Wᵀ for a few rows of x, against the products in double.

template <class E>
static void check_gemv(void (*kernel)(typename E::T *, const typename E::T *,
                                      const typename E::T *, int, int, int),
                       int rows, int n, int k) {
  auto x = random_values<E>(rows * k, 1.f);
  auto w = random_values<E>(n * k, 0.1f);
  std::vector<typename E::T> y(rows * n);
  launch({(unsigned)((n + 7) / 8), 1, 1}, 8 * 32,
         [&] { kernel(y.data(), x.data(), w.data(), rows, n, k); });
  std::vector<double> want(rows * n);
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < n; j++) {
      double s = 0;
      for (int d = 0; d < k; d++) s += (double)E::get(x[r * k + d]) * E::get(w[j * k + d]);
      want[r * n + j] = s;
    }
  char what[64];
  std::snprintf(what, sizeof what, "gemv, %d rows, %d × %d", rows, n, k);
  expect_close(what, E::name, widen<E>(y), want, E::tolerance);
}

// ---- route_words: the routing words of each token's k best experts (top_k.cu's output), every
// expert a group, against the layout built here from the same choices.

static void check_route_words(int tokens, int k, int experts, bool normalize) {
  std::mt19937 gen(tokens * 100 + k);
  std::vector<u32> best(tokens * 2 * k);
  std::vector<std::vector<std::pair<u32, float>>> chosen(tokens);
  for (int t = 0; t < tokens; t++) {
    // k distinct experts, best first, with made-up descending probabilities.
    std::vector<u32> ids(experts);
    for (int e = 0; e < experts; e++) ids[e] = (u32)e;
    std::shuffle(ids.begin(), ids.end(), gen);
    float p = 0.5f;
    for (int s = 0; s < k; s++) {
      chosen[t].push_back({ids[s], p});
      best[t * 2 * k + s] = ids[s];
      best[t * 2 * k + k + s] = __float_as_uint(p);
      p *= 0.61f;
    }
  }
  const int pairs = tokens * k, groups = std::min(experts, pairs);
  std::vector<u32> words(2 * groups + 1 + 3 * pairs + tokens + 1, 0xdeadbeefu);
  launch({1, 1, 1}, (unsigned)((experts + 31) / 32 * 32),
         [&] { route_words(words.data(), best.data(), tokens, k, experts, normalize); });
  // The layout: the active experts then empty slots, their starts, pairs' tokens by expert,
  // token starts, each token's pairs by ascending expert, weights.
  std::vector<std::vector<std::pair<int, float>>> by_expert(experts);
  for (int t = 0; t < tokens; t++) {
    float sum = 0.f;
    for (auto [e, p] : chosen[t]) sum += p;
    for (auto [e, p] : chosen[t]) by_expert[e].push_back({t, normalize ? p / sum : p});
  }
  std::vector<u32> want, starts{0};
  u32 at = 0;
  for (int e = 0; e < experts; e++)
    if (!by_expert[e].empty()) {
      want.push_back((u32)e);
      starts.push_back(at += by_expert[e].size());
    }
  while ((int)want.size() < groups) {
    want.push_back(0);
    starts.push_back(at);
  }
  want.insert(want.end(), starts.begin(), starts.end());
  std::vector<std::vector<std::pair<u32, u32>>> per_token(tokens);  // (expert, pair)
  std::vector<u32> weights;
  u32 pair = 0;
  for (int e = 0; e < experts; e++)
    for (auto [t, w] : by_expert[e]) {
      want.push_back((u32)t);
      per_token[t].push_back({(u32)e, pair++});
      weights.push_back(__float_as_uint(w));
    }
  for (int t = 0; t <= tokens; t++) want.push_back((u32)(t * k));
  for (auto &mine : per_token) {
    std::sort(mine.begin(), mine.end());
    for (auto [e, p] : mine) want.push_back(p);
  }
  want.insert(want.end(), weights.begin(), weights.end());
  std::vector<float> got_f, want_f;
  for (size_t i = 0; i < want.size(); i++) {
    got_f.push_back(words[i] == want[i] ? 1.f : 0.f);
    want_f.push_back(1.f);
  }
  char what[96];
  std::snprintf(what, sizeof what, "route_words, %d tokens, k %d of %d experts%s", tokens, k,
                experts, normalize ? ", renormalized" : "");
  expect_close(what, "u32", got_f, std::vector<double>(want_f.begin(), want_f.end()), 0);
}

int main() {
  check_add_rms_norm<F32>(add_rms_norm_f32, 3, 300, 320);
  check_add_rms_norm<F32>(add_rms_norm_f32, 2, 2560, 1024);
  check_add_rms_norm<Bf16>(add_rms_norm_bf16, 3, 300, 320);
  check_add_rms_norm<Bf16>(add_rms_norm_bf16, 1, 40, 64);
  check_add_rms_norm<F16>(add_rms_norm_f16, 2, 96, 96);

  check_attention_inputs<F32>(attention_inputs_f32, 3, 4, 2, 16);
  check_attention_inputs<Bf16>(attention_inputs_bf16, 5, 4, 1, 128);
  check_attention_inputs<Bf16>(attention_inputs_bf16, 1, 2, 2, 80);
  check_attention_inputs<F16>(attention_inputs_f16, 2, 6, 3, 64);

  check_swiglu<F32>(swiglu_f32, 2, 300);
  check_swiglu<Bf16>(swiglu_bf16, 3, 70);
  check_swiglu<F16>(swiglu_f16, 1, 512);

  check_scatter_rows();

  check_paged_attention<F32>(paged_attention_f32, paged_attention_f32_merge, 4, 2, 16, 16, 1);
  check_paged_attention<F32>(paged_attention_f32, paged_attention_f32_merge, 4, 2, 64, 64, 3);
  check_paged_attention<Bf16>(paged_attention_bf16, paged_attention_bf16_merge, 2, 1, 128, 128, 2);
  check_paged_attention<F16>(paged_attention_f16, paged_attention_f16_merge, 2, 2, 64, 64, 1);
  check_paged_attention<F32>(paged_attention_f32, paged_attention_f32_merge, 2, 1, 80, 48, 2);

  check_experts<F32>(experts_gate_up_f32, experts_down_f32, experts_sum_f32, 64, 48, true);
  check_experts<Bf16>(experts_gate_up_bf16, experts_down_bf16, experts_sum_bf16, 96, 40, true);
  check_experts<Bf16>(experts_gate_up_bf16, experts_down_bf16, experts_sum_bf16, 64, 32, false);
  check_experts<F16>(experts_gate_up_f16, experts_down_f16, experts_sum_f16, 40, 24, true);

  check_route_words(6, 3, 10, true);
  check_route_words(1, 8, 128, true);
  check_route_words(9, 2, 40, false);

  check_gemv<F32>(gemv_f32, 1, 20, 264);
  check_gemv<Bf16>(gemv_bf16, 3, 17, 512);
  check_gemv<Bf16>(gemv_bf16, 8, 9, 64);
  check_gemv<F16>(gemv_f16, 5, 12, 776);

  check_top_k(3, 5000, 20);
  check_top_k(2, 700, 64);
  check_top_k(1, 300, 1);
  check_top_k(2, 100, 64);  // fewer entries per thread than k: some lists stay empty

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel checks passed\n");
  return 0;
}
