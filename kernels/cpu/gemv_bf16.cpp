// Skinny bf16 matmul for CPU decode: out[M, N] = x[M, K] @ W[N, K]^T, M small.
//
// Decode reads every weight once per step, so it is bound by memory
// bandwidth. The weight is packed once at load time as [N/4, K/32, 4, 32]:
// each tile of 4 output rows is one sequential stream (the hardware
// prefetcher follows one stream per thread far better than 4 interleaved
// rows: 27 vs 16 GB/s on 2 Zen 4 cores, benchmarks/micro/cpu_gemv.py).
// AVX-512 BF16 dot products (vdpbf16ps) accumulate in fp32; tiles of 4 rows
// x 4 tokens; rows split across torch's threads.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>

namespace {

constexpr int kRows = 4;   // weight rows per packed tile
constexpr int kToks = 4;   // tokens (rows of x) per register tile

template <int T>
inline void tile(const at::BFloat16* x, const at::BFloat16* wt, at::BFloat16* out,
                 int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[T][kRows];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    const at::BFloat16* p = wt + kb * kRows * 32;
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(p + r * 32);
    for (int t = 0; t < T; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + t) * K + kb * 32);
      for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kRows; ++r) out[(m0 + t) * N + n0 + r] = at::BFloat16(_mm512_reduce_add_ps(acc[t][r]));
}

}  // namespace

torch::Tensor pack_bf16(torch::Tensor w) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.dim() == 2, "pack_bf16: a bf16 [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kRows == 0 && K % 32 == 0, "pack_bf16: N must be a multiple of 4 and K of 32");
  return w.contiguous().view({N / kRows, kRows, K / 32, 32}).transpose(1, 2).contiguous();
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && packed.dtype() == torch::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 32 && packed.is_contiguous(),
              "gemv_bf16: weight must come from pack_bf16");
  const int64_t M = x.size(0), K = packed.size(1) * 32, N = packed.size(0) * kRows;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "gemv_bf16: x must be contiguous [M, K]");
  auto out = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  // torch's own thread pool: a second OpenMP runtime would spin against it.
  at::parallel_for(0, N / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const at::BFloat16* wt = wp + nb * K * kRows;
      int64_t m = 0;
      for (; m + kToks <= M; m += kToks) tile<kToks>(xp, wt, op, K, N, nb * kRows, m);
      for (; m < M; ++m) tile<1>(xp, wt, op, K, N, nb * kRows, m);
    }
  });
  return out;
}
