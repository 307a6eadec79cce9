// Paged decode attention for CPU: one new token per sequence attends to its
// cached K/V, read in place from the paged pool (no gather copy).
//
//   q       [B, H, D]        bf16 or fp32
//   k, v    [S, KVH, D]      the layer's pool (slot-major), same dtype as q
//   slots   [B, L] int64     KV slots of each sequence, padded
//   lens    [B]    int64     valid length of each row of slots
//   out     [B, H, D]        same dtype as q
//
// Work is split over (sequence, kv head); the G = H / KVH query heads of a
// group share each K/V row load (GQA). Scores and softmax are fp32. For
// head_dim 64 / 128 and G <= 8 the group is compiled for its shape, so the
// G x D output accumulators stay in registers (2.3x over the runtime-shaped
// loop at batch 16, SmolLM2: 338 -> 145 us a layer).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace {

// K/V rows of a sequence sit at scattered slots: the hardware prefetcher
// cannot follow them, so each row is fetched a few keys ahead.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const void* p, int bytes) {
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
}

template <typename T>
void one_group(const T* q, const T* k, const T* v, const int64_t* slots, int64_t len,
               T* out, int G, int D, int64_t row_stride, float scale, std::vector<float>& s) {
  // q, out: G consecutive heads of D; k, v: the group's kv head at slot 0.
  const int nv = D / 16;
  s.resize(static_cast<size_t>(G) * len);
  std::vector<V16> qv(G * nv);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < nv; ++c) qv[g * nv + c] = v_mul(v_load(q + g * D + c * 16), v_set1(scale));
  std::vector<float> mx(G, -INFINITY);
  const int row_bytes = D * static_cast<int>(sizeof(T));
  for (int64_t j = 0; j < len; ++j) {
    const T* kr = k + slots[j] * row_stride;
    if (j + kAhead < len) prefetch_row(k + slots[j + kAhead] * row_stride, row_bytes);
    for (int g = 0; g < G; ++g) {
      V16 acc = v_zero();
      for (int c = 0; c < nv; ++c) acc = v_fma(qv[g * nv + c], v_load(kr + c * 16), acc);
      float x = v_sum(acc);
      s[g * len + j] = x;
      mx[g] = x > mx[g] ? x : mx[g];
    }
  }
  std::vector<V16> acc(G * nv, v_zero());
  std::vector<float> den(G, 0.f);
  for (int g = 0; g < G; ++g) {
    float* sg = s.data() + g * len;
    for (int64_t j = 0; j < len; ++j) sg[j] -= mx[g];
    exp_inplace(sg, len);
    for (int64_t j = 0; j < len; ++j) den[g] += sg[j];
  }
  for (int64_t j = 0; j < len; ++j) {
    const T* vr = v + slots[j] * row_stride;
    if (j + kAhead < len) prefetch_row(v + slots[j + kAhead] * row_stride, row_bytes);
    for (int c = 0; c < nv; ++c) {
      V16 vv = v_load(vr + c * 16);
      for (int g = 0; g < G; ++g)
        acc[g * nv + c] = v_fma(v_set1(s[g * len + j]), vv, acc[g * nv + c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    V16 inv = v_set1(1.f / den[g]);
    for (int c = 0; c < nv; ++c) v_store(out + g * D + c * 16, v_mul(acc[g * nv + c], inv));
  }
}

// exp(s - mx) in place over n floats; returns their sum (vectorized: a scalar
// running sum is one dependent add per key).
inline float exp_sum(float* s, int64_t n, float mx) {
  const V16 m = v_set1(mx);
  V16 sum = v_zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V16 e = v_exp(v_load(s + i) - m);
    v_store(s + i, e);
    sum = sum + e;
  }
  float total = v_sum(sum);
  if (i < n) {                          // the tail: at most 15 keys
    const int r = static_cast<int>(n - i);
    v_store_n(s + i, v_exp(v_load_n(s + i, r) - m), r);
    for (; i < n; ++i) total += s[i];
  }
  return total;
}

// one_group with G and D = 16 NV known at compile time: q and the G x NV output
// accumulators live in registers instead of memory.
template <typename T, int G, int NV>
void group_fixed(const T* q, const T* k, const T* v, const int64_t* slots, int64_t len,
                 T* out, int64_t row_stride, float scale, std::vector<float>& s) {
  constexpr int D = NV * 16, row_bytes = D * static_cast<int>(sizeof(T));
  s.resize(static_cast<size_t>(G) * len);
  V16 qv[G][NV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) qv[g][c] = v_mul(v_load(q + g * D + c * 16), v_set1(scale));
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    const T* kr = k + slots[j] * row_stride;
    if (j + kAhead < len) prefetch_row(k + slots[j + kAhead] * row_stride, row_bytes);
    V16 kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = v_load(kr + c * 16);
    for (int g = 0; g < G; ++g) {
      V16 acc = v_mul(qv[g][0], kv[0]);
      for (int c = 1; c < NV; ++c) acc = v_fma(qv[g][c], kv[c], acc);
      const float x = v_sum(acc);
      s[g * len + j] = x;
      mx[g] = x > mx[g] ? x : mx[g];
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = 1.f / exp_sum(s.data() + g * len, len, mx[g]);
  V16 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) acc[g][c] = v_zero();
  for (int64_t j = 0; j < len; ++j) {
    const T* vr = v + slots[j] * row_stride;
    if (j + kAhead < len) prefetch_row(v + slots[j + kAhead] * row_stride, row_bytes);
    for (int c = 0; c < NV; ++c) {
      const V16 vv = v_load(vr + c * 16);
      for (int g = 0; g < G; ++g) acc[g][c] = v_fma(v_set1(s[g * len + j]), vv, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) v_store(out + g * D + c * 16, v_mul(acc[g][c], v_set1(inv[g])));
}

template <typename T>
using GroupFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, T*, int64_t, float,
                         std::vector<float>&);

template <typename T, int NV, int... Gs>
GroupFn<T> pick_g(int G, std::integer_sequence<int, Gs...>) {
  GroupFn<T> f = nullptr;
  ((G == Gs + 1 ? (f = &group_fixed<T, Gs + 1, NV>, 0) : 0), ...);
  return f;
}

// The compiled-in group shapes: head_dim 64 or 128, up to 8 query heads per kv head.
template <typename T>
GroupFn<T> pick(int G, int64_t D) {
  if (D == 64) return pick_g<T, 4>(G, std::make_integer_sequence<int, 8>{});
  if (D == 128) return pick_g<T, 8>(G, std::make_integer_sequence<int, 8>{});
  return nullptr;
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
         const torch::Tensor& slots, const torch::Tensor& lens, torch::Tensor& out, float scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = slots.size(1);
  const int G = static_cast<int>(H / KVH);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t row_stride = KVH * D;
  const GroupFn<T> fixed = pick<T>(G, D);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / KVH, h = w % KVH;
      if (fixed) {
        fixed(qp + (b * H + h * G) * D, kp + h * D, vp + h * D, sp + b * L, lp[b], op + (b * H + h * G) * D,
              row_stride, scale, scratch);
        continue;
      }
      one_group<T>(qp + (b * H + h * G) * D, kp + h * D, vp + h * D, sp + b * L, lp[b],
                   op + (b * H + h * G) * D, G, static_cast<int>(D), row_stride, scale, scratch);
    }
  });
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor slots, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "decode_attention: q [B,H,D], k/v [S,KVH,D]");
  TORCH_CHECK(q.size(2) == k.size(2) && q.size(2) % 16 == 0, "decode_attention: head_dim must match, multiple of 16");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(q.dtype() == k.dtype() && k.dtype() == v.dtype(), "decode_attention: one dtype for q, k, v");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "decode_attention: contiguous q, k, v");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && lens.dtype() == torch::kInt64 && slots.dim() == 2 &&
              slots.size(0) == q.size(0) && lens.numel() == q.size(0) && slots.is_contiguous(),
              "decode_attention: slots [B,L] and lens [B] int64");
  auto out = torch::empty_like(q);
  if (q.dtype() == torch::kBFloat16) {
    run<at::BFloat16>(q, k, v, slots, lens, out, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.dtype() == torch::kFloat32, "decode_attention: bf16 or fp32");
    run<float>(q, k, v, slots, lens, out, static_cast<float>(scale));
  }
  return out;
}
