// One decoder layer of a decode step in a single call (bf16, CPU): the same
// ops the Python layer runs for few tokens, chained in C++ so that a step
// pays one dispatch per layer instead of a dozen (~2 ms of 15 ms for
// SmolLM2 at batch 1). Llama-family layers: optional QKV bias, no q/k norm.
#include "ops.h"
#include <cstring>

// k, v [T, KVH, D] (rows strided) into the pools at out_slots; at::index_put_
// costs ~10 us a call, more than the copy.
static void store_kv(torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& out_slots) {
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), bytes = row * k.element_size();
  const auto* slots = out_slots.data_ptr<int64_t>();
  auto* kd = static_cast<char*>(kc.data_ptr());
  auto* vd = static_cast<char*>(vc.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  const int64_t src_stride = k.stride(0) * k.element_size();
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(kd + slots[t] * bytes, ks + t * src_stride, bytes);
    std::memcpy(vd + slots[t] * bytes, vs + t * src_stride, bytes);
  }
}

// weights: [input_norm, post_attention_norm, qkv_packed, o_packed, gate_up_packed, down_packed]
// cache:   [k_cache, v_cache, out_slots, slots, lens, positions, cos, sin]
std::vector<torch::Tensor> decode_layer(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                        std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> qkv_bias,
                                        std::vector<torch::Tensor> cache, int64_t heads, int64_t kv_heads,
                                        double eps, double scale) {
  TORCH_CHECK(weights.size() == 6 && cache.size() == 8, "decode_layer: 6 weights and 8 cache tensors");
  const int64_t T = x.size(0), D = cache[0].size(2);
  auto n1 = add_rmsnorm(x, residual, weights[0], eps);
  auto qkv = gemv_bf16(n1[0], weights[2]);
  if (qkv_bias.has_value()) qkv.add_(*qkv_bias);
  rope_(qkv.narrow(1, 0, (heads + kv_heads) * D).view({T, heads + kv_heads, D}), cache[5], cache[6], cache[7]);
  auto k = qkv.narrow(1, heads * D, kv_heads * D).view({T, kv_heads, D});
  auto v = qkv.narrow(1, (heads + kv_heads) * D, kv_heads * D).view({T, kv_heads, D});
  store_kv(cache[0], cache[1], k, v, cache[2]);
  auto q = qkv.narrow(1, 0, heads * D).view({T, heads, D}).contiguous();
  auto o = decode_attention(q, cache[0], cache[1], cache[3], cache[4], scale);
  auto attn = gemv_bf16(o.view({T, heads * D}), weights[3]);
  auto n2 = add_rmsnorm(attn, n1[1], weights[1], eps);
  auto out = gemv_bf16(silu_mul(gemv_bf16(n2[0], weights[4])), weights[5]);
  return {out, n2[1]};
}
