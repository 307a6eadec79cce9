// 16 floats as one vector, for the kernels that run on both instruction sets:
// one zmm where the build has AVX-512 (-mavx512f), two ymm on AVX2 + FMA.
// Only what the kernels use: load/store (fp32, bf16; masked tails), set1,
// arithmetic, fma, min/max, a horizontal sum and exp.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)

struct V16 {
  __m512 v;
};
inline V16 v_zero() { return {_mm512_setzero_ps()}; }
inline V16 v_set1(float x) { return {_mm512_set1_ps(x)}; }
inline V16 v_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void v_store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 v_load(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
}
inline V16 v_load_n(const float* p, int n) {            // the first n < 16 floats, zeros after
  return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p)};
}
inline void v_store_n(float* p, V16 a, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v);
}
inline V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 v_mul(V16 a, V16 b) { return a * b; }
inline V16 v_fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }     // a * b + c
inline V16 v_fnma(V16 a, V16 b, V16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }   // c - a * b
inline V16 v_min(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V16 v_max(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 v_round(V16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V16 v_scale2(V16 p, V16 n) { return {_mm512_scalef_ps(p.v, n.v)}; }             // p * 2^n, n integral
inline float v_sum(V16 a) { return _mm512_reduce_add_ps(a.v); }
#if defined(__AVX512BF16__)
inline void v_store(at::BFloat16* p, V16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a.v));
}
#else
inline void v_store(at::BFloat16* p, V16 a) {
  alignas(64) float f[16];
  _mm512_store_ps(f, a.v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(f[i]);
}
#endif

#else  // AVX2 + FMA

struct V16 {
  __m256 lo, hi;
};
inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 v_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void v_store(float* p, V16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline __m256 bf16x8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline V16 v_load(const at::BFloat16* p) { return {bf16x8(p), bf16x8(p + 8)}; }
inline void v_store(at::BFloat16* p, V16 a) {
  alignas(32) float f[16];
  _mm256_store_ps(f, a.lo);
  _mm256_store_ps(f + 8, a.hi);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(f[i]);   // round to nearest even
}
inline V16 v_load_n(const float* p, int n) {
  alignas(32) float f[16] = {0};
  for (int i = 0; i < n; ++i) f[i] = p[i];
  return {_mm256_load_ps(f), _mm256_load_ps(f + 8)};
}
inline void v_store_n(float* p, V16 a, int n) {
  alignas(32) float f[16];
  _mm256_store_ps(f, a.lo);
  _mm256_store_ps(f + 8, a.hi);
  for (int i = 0; i < n; ++i) p[i] = f[i];
}
inline V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 v_mul(V16 a, V16 b) { return a * b; }
inline V16 v_fma(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 v_fnma(V16 a, V16 b, V16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 v_min(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V16 v_max(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 v_round(V16 a) {
  constexpr int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, r), _mm256_round_ps(a.hi, r)};
}
inline __m256 scale2_8(__m256 p, __m256 n) {   // n integral in [-127, 128]: add it to the exponent in two halves
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
inline V16 v_scale2(V16 p, V16 n) { return {scale2_8(p.lo, n.lo), scale2_8(p.hi, n.hi)}; }
inline float v_sum(V16 a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

#endif
