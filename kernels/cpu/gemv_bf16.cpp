// Skinny bf16 matmul for CPU decode: out[M, N] = x[M, K] @ W[N, K]^T, M small.
//
// One packed layout serves every M (weights are packed once at load time):
// panels of 48 output columns, each panel one sequential stream of
// [K/2, 48, 2] (the last panel narrower when 48 does not divide N). One zmm
// load is 16 columns x 2 consecutive k, the operand vdpbf16ps multiplies
// against a broadcast 32-bit pair (x[m, k], x[m, k+1]); so a register tile
// of up to 8 tokens x 3 zmm columns (24 fp32 accumulators) needs no
// horizontal reductions and reuses each weight load 8 times.
//   M = 1-2: bound by streaming the weights (one sequential stream per
//   panel, which the hardware prefetcher follows; ~25 GB/s on 2 Zen 4 cores).
//   M >= 8: bound by vdpbf16ps (one zmm per cycle per core; ~220 GFLOP/s a
//   core measured, benchmarks/results/cpu_gemv.md).
// Panels are split across torch's threads.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <cstring>

#if defined(__AVX512BF16__)
namespace {

constexpr int kNR = 3;              // zmm columns per panel
constexpr int kPanel = kNR * 16;    // output columns per panel
constexpr int kMR = 8;              // tokens per register tile

// out[t, 0:16*NR] = x[t, :] @ panel for t < MR; x rows as 32-bit k pairs (ldx pairs apart).
template <int MR, int NR>
inline void tile(const uint32_t* x, int64_t ldx, const at::BFloat16* w, int64_t KP, at::BFloat16* out,
                 int64_t ldo) {
  __m512 acc[MR][NR];
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    const at::BFloat16* p = w + kp * NR * 32;
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(p + j * 32);
    for (int t = 0; t < MR; ++t) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x[t * ldx + kp]);
      for (int j = 0; j < NR; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], wv[j], xb);
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j)   // round to nearest even, as at::BFloat16(float)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * ldo + j * 16), (__m256i)_mm512_cvtneps_pbh(acc[t][j]));
}

template <int NR, int... MRs>
inline void tail(int rows, const uint32_t* x, int64_t KP, const at::BFloat16* w, at::BFloat16* out, int64_t N,
                 std::integer_sequence<int, MRs...>) {
  ((rows == MRs + 1 ? tile<MRs + 1, NR>(x, KP, w, KP, out, N) : void()), ...);
}

// All M rows of x against one panel of NR * 16 columns (out points at its first column).
template <int NR>
void panel(const uint32_t* x, int64_t M, int64_t KP, const at::BFloat16* w, at::BFloat16* out, int64_t N) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile<kMR, NR>(x + m * KP, KP, w, KP, out + m * N, N);
  if (m < M) tail<NR>(static_cast<int>(M - m), x + m * KP, KP, w, out + m * N, N,
                      std::make_integer_sequence<int, kMR - 1>{});
}

}  // namespace

torch::Tensor pack_bf16(torch::Tensor w) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.dim() == 2, "pack_bf16: a bf16 [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 2 == 0, "pack_bf16: N must be a multiple of 16 and K of 2");
  auto wc = w.contiguous();
  // Shape [N/16, 16 K] only carries N and K; the memory is the panels, in order.
  auto out = torch::empty({N / 16, K * 16}, w.options());
  auto* o = out.data_ptr<at::BFloat16>();
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, N - n0);
    auto p = wc.narrow(0, n0, width).view({width, K / 2, 2}).transpose(0, 1).contiguous();
    std::memcpy(o + n0 * K, p.data_ptr<at::BFloat16>(), width * K * sizeof(at::BFloat16));
  }
  return out;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && packed.dtype() == torch::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous(), "gemv_bf16: weight must come from pack_bf16");
  const int64_t M = x.size(0), K = packed.size(1) / 16, N = packed.size(0) * 16;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "gemv_bf16: x must be contiguous [M, K]");
  auto out = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = packed.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t KP = K / 2;
  // torch's own thread pool: a second OpenMP runtime would spin against it.
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, width = std::min<int64_t>(kPanel, N - n0);
      const at::BFloat16* w = wp + n0 * K;
      if (width == kPanel) panel<kNR>(xp, M, KP, w, op + n0, N);
      else if (width == 32) panel<2>(xp, M, KP, w, op + n0, N);
      else panel<1>(xp, M, KP, w, op + n0, N);
    }
  });
  return out;
}

#else  // a build without AVX-512 BF16 (kernels/cpu/__init__.py never calls these there)

torch::Tensor pack_bf16(torch::Tensor) { TORCH_CHECK(false, "pack_bf16: this build has no AVX-512 BF16"); }
torch::Tensor gemv_bf16(torch::Tensor, torch::Tensor) { TORCH_CHECK(false, "gemv_bf16: this build has no AVX-512 BF16"); }

#endif
