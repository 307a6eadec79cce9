// The CPU kernels' entry points, shared by the bindings and by decode_layer.
#pragma once
#include <torch/extension.h>

torch::Tensor pack_bf16(torch::Tensor w);
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor packed);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor slots, torch::Tensor lens, double scale);
std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                       torch::Tensor weight, double eps);
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
std::vector<torch::Tensor> decode_layer(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                        std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> qkv_bias,
                                        std::vector<torch::Tensor> cache, int64_t heads, int64_t kv_heads,
                                        double eps, double scale);
torch::Tensor pack_q(torch::Tensor blocks, int64_t N, int64_t K, int64_t ggml_type);
torch::Tensor qgemv(torch::Tensor x, torch::Tensor packed, int64_t N, int64_t bits);
