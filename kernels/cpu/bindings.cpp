// Python bindings of the CPU kernels (one extension module).
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_bf16", &pack_bf16, "pack a bf16 [N, K] weight for gemv_bf16");
  m.def("gemv_bf16", &gemv_bf16, "skinny bf16 matmul x @ w.T (small M) on a packed weight");
  m.def("decode_attention", &decode_attention, "paged decode attention, one query token per sequence");
  m.def("add_rmsnorm", &add_rmsnorm, "(rmsnorm(x + residual) * weight, x + residual)");
  m.def("rope_", &rope_, "rotary embedding in place (rotate-half layout, sign folded into sin)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("decode_layer", &decode_layer, "one decoder layer of a bf16 decode step");
}
