// Skinny fp32 matmul on GGUF-quantized weights, AVX2 + FMA + F16C:
// out[M, N] = x[M, K] @ W[N, K]^T with W kept as llama.cpp stores it
// (blocks of 32 along K), repacked once into panels of 8 output rows.
//
// A panel is one sequential stream of K/32 blocks; a block of 8 rows is
//   4-bit (Q4_0, Q4_1): 8 fp16 scales d, 8 fp16 offsets m, then 16 x 8 bytes:
//     byte [k][c] holds row c's quant of k (low nibble) and of k+16 (high);
//     w = d * q + m  (Q4_0: m = -8 d)
//   8-bit (Q8_0): 8 fp16 scales d, then 32 x 8 int8: w = d * q.
// d * q is exact in fp32 (11 + 8 significant bits at most), so the fused
// multiply-add of d * q + m rounds exactly as gguf's numpy dequantization
// does: every weight the kernel multiplies is bit for bit the fp32 weight of
// the converted model. Only the order of the sums differs from a GEMM.
//
// Per 16 weights of a row the 4-bit kernel spends one widening load, an and,
// a shift, two int->float converts and two FMAs to dequantize, then one FMA
// per token: M = 1 is bound by those ops, not by the bytes (SmolLM2's 134M
// weights on a 2-core Zen 3: ~9 ms on 2 threads, ~17 ms on 1, against ~6 ms
// to stream their 96 MB); M = 8 reuses each dequantized vector 8 times.
// Panels split across threads.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cstring>

namespace {

constexpr int64_t kRows = 8;                      // output rows per panel (one ymm)
constexpr int64_t kBlock4 = 32 + 16 * kRows;      // bytes per 4-bit block of a panel
constexpr int64_t kBlock8 = 16 + 32 * kRows;      // bytes per 8-bit block of a panel

inline __m256 half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// out[t, 8 j : 8 j + 8] for t < MR, j < NR; panel j starts at w + j * pstride.
template <int MR, int NR>
inline void tile4(const float* x, int64_t K, const uint8_t* w, int64_t pstride, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j) acc[t][j] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi32(0x0F);
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* pb[NR];
    __m256 d[NR], m[NR];
    for (int j = 0; j < NR; ++j) {
      pb[j] = w + j * pstride + b * kBlock4;
      d[j] = half8(pb[j]);
      m[j] = half8(pb[j] + 16);
    }
    const float* xb = x + b * 32;
    for (int k = 0; k < 16; ++k) {
      for (int j = 0; j < NR; ++j) {
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb[j] + 32 + k * 8)));
        const __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, lo4)), d[j], m[j]);
        const __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), d[j], m[j]);
        for (int t = 0; t < MR; ++t) {
          acc[t][j] = _mm256_fmadd_ps(wl, _mm256_broadcast_ss(xb + t * K + k), acc[t][j]);
          acc[t][j] = _mm256_fmadd_ps(wh, _mm256_broadcast_ss(xb + t * K + k + 16), acc[t][j]);
        }
      }
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(out + t * ldo + j * kRows, acc[t][j]);
}

template <int MR, int NR>
inline void tile8(const float* x, int64_t K, const uint8_t* w, int64_t pstride, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j) acc[t][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* pb[NR];
    __m256 d[NR];
    for (int j = 0; j < NR; ++j) {
      pb[j] = w + j * pstride + b * kBlock8;
      d[j] = half8(pb[j]);
    }
    const float* xb = x + b * 32;
    for (int k = 0; k < 32; ++k) {
      for (int j = 0; j < NR; ++j) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb[j] + 16 + k * 8)));
        const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d[j]);
        for (int t = 0; t < MR; ++t)
          acc[t][j] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(xb + t * K + k), acc[t][j]);
      }
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(out + t * ldo + j * kRows, acc[t][j]);
}

template <bool Q4, int MR, int NR>
inline void tile(const float* x, int64_t K, const uint8_t* w, int64_t pstride, float* out, int64_t ldo) {
  if constexpr (Q4) tile4<MR, NR>(x, K, w, pstride, out, ldo);
  else tile8<MR, NR>(x, K, w, pstride, out, ldo);
}

// Rows [m0, M) of x against NR panels: tiles of 8 tokens, then the rest.
template <bool Q4, int NR>
void rows(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t pstride, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile<Q4, 8, NR>(x + m * K, K, w, pstride, out + m * N, N);
  switch (M - m) {
    case 0: break;
    case 1: tile<Q4, 1, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    case 2: tile<Q4, 2, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    case 3: tile<Q4, 3, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    case 4: tile<Q4, 4, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    case 5: tile<Q4, 5, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    case 6: tile<Q4, 6, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
    default: tile<Q4, 7, NR>(x + m * K, K, w, pstride, out + m * N, N); break;
  }
}

template <bool Q4>
void run(const float* x, int64_t M, int64_t K, const uint8_t* w, float* out, int64_t N) {
  const int64_t P = N / kRows;
  const int64_t pstride = (K / 32) * (Q4 ? kBlock4 : kBlock8);
  // One token: 4 panels at a time keep 4 FMA chains in flight; more tokens: one
  // panel, its dequantized vectors reused by up to 8 tokens.
  const int64_t G = M == 1 ? 4 : 1;
  at::parallel_for(0, (P + G - 1) / G, 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p = g * G;
      const uint8_t* wp = w + p * pstride;
      float* op = out + p * kRows;
      if (G == 4 && p + 4 <= P) rows<Q4, 4>(x, M, K, wp, pstride, op, N);
      else
        for (int64_t q = p; q < std::min(p + G, P); ++q)
          rows<Q4, 1>(x, M, K, w + q * pstride, pstride, out + q * kRows, N);
    }
  });
}

}  // namespace

// x [M, K] fp32 contiguous, packed uint8 (pack_q4 / pack_q8 in quant.py), bits 4 or 8.
torch::Tensor qgemv(torch::Tensor x, torch::Tensor packed, int64_t N, int64_t bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "qgemv: x must be fp32 [M, K], contiguous");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous(), "qgemv: packed must be contiguous uint8");
  TORCH_CHECK(bits == 4 || bits == 8, "qgemv: bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && N % kRows == 0, "qgemv: K must be a multiple of 32 and N of 8");
  TORCH_CHECK(packed.numel() == (N / kRows) * (K / 32) * (bits == 4 ? kBlock4 : kBlock8),
              "qgemv: packed size does not match [N, K]");
  auto out = torch::empty({M, N}, x.options());
  if (bits == 4) run<true>(x.data_ptr<float>(), M, K, packed.data_ptr<uint8_t>(), out.data_ptr<float>(), N);
  else run<false>(x.data_ptr<float>(), M, K, packed.data_ptr<uint8_t>(), out.data_ptr<float>(), N);
  return out;
}

// GGUF blocks of a [N, K] weight (uint8 [N, K / 32 * block bytes], rows in the model's
// order) -> the panel layout above. ggml_type: 2 Q4_0, 3 Q4_1, 8 Q8_0.
torch::Tensor pack_q(torch::Tensor blocks, int64_t N, int64_t K, int64_t ggml_type) {
  TORCH_CHECK(ggml_type == 2 || ggml_type == 3 || ggml_type == 8, "pack_q: Q4_0, Q4_1 or Q8_0 blocks");
  TORCH_CHECK(K % 32 == 0 && N % kRows == 0, "pack_q: K must be a multiple of 32 and N of 8");
  const int64_t bs = ggml_type == 2 ? 18 : ggml_type == 3 ? 20 : 34, KB = K / 32;
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.is_contiguous() && blocks.numel() == N * KB * bs,
              "pack_q: blocks must be contiguous uint8 of N * K / 32 blocks");
  const bool q4 = ggml_type != 8;
  const int64_t per = q4 ? kBlock4 : kBlock8, nq = q4 ? 16 : 32, qoff = ggml_type == 3 ? 4 : 2;
  auto out = torch::empty({(N / kRows) * KB * per}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kRows, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < KB; ++b) {
        uint8_t* o = dst + (p * KB + b) * per;
        for (int64_t c = 0; c < kRows; ++c) {
          const uint8_t* blk = src + ((p * kRows + c) * KB + b) * bs;
          std::memcpy(o + 2 * c, blk, 2);                                     // d
          if (ggml_type == 3) std::memcpy(o + 16 + 2 * c, blk + 2, 2);         // m
          if (ggml_type == 2) {                                                // m = -8 d, exact in fp16
            uint16_t dbits;
            std::memcpy(&dbits, blk, 2);
            const c10::Half m(-8.f * static_cast<float>(c10::Half(dbits, c10::Half::from_bits())));
            std::memcpy(o + 16 + 2 * c, &m.x, 2);
          }
          for (int64_t k = 0; k < nq; ++k) o[(q4 ? 32 : 16) + k * kRows + c] = blk[qoff + k];
        }
      }
  });
  return out;
}
