// Python bindings of the CPU kernels (one extension module).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_bf16", &pack_bf16, "pack a bf16 [N, K] weight for gemv_bf16");
  m.def("gemv_bf16", &gemv_bf16, "skinny bf16 matmul x @ w.T (small M) on a packed weight");
  m.def("decode_attention", &decode_attention, "paged decode attention, one query token per sequence");
  m.def("add_rmsnorm", &add_rmsnorm, "(rmsnorm(x + residual) * weight, x + residual)");
  m.def("rope_", &rope_, "rotary embedding in place (rotate-half layout, sign folded into sin)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("pack_q", &pack_q, "repack GGUF Q4_0 / Q4_1 / Q8_0 blocks of a [N, K] weight for qgemv");
  m.def("qgemv", &qgemv, "fp32 x @ W.T with W as repacked GGUF blocks (AVX2)");
  m.def("decode_layer", &decode_layer, "one decoder layer of a bf16 decode step");
}
