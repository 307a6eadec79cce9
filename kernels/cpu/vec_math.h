// Vectorized math for the CPU kernels (simd.h: AVX-512 or AVX2).
#pragma once
#include "simd.h"

// exp(x) for 16 floats: x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor on r
// (relative error < 1e-7 over the float range), then scale by 2^n.
inline V16 v_exp(V16 x) {
  x = v_max(v_min(x, v_set1(88.3762626647949f)), v_set1(-103.972084f));
  const V16 n = v_round(x * v_set1(1.44269504088896341f));
  V16 r = v_fnma(n, v_set1(0.693359375f), x);
  r = v_fnma(n, v_set1(-2.12194440e-4f), r);
  V16 p = v_set1(1.f / 5040);
  p = v_fma(p, r, v_set1(1.f / 720));
  p = v_fma(p, r, v_set1(1.f / 120));
  p = v_fma(p, r, v_set1(1.f / 24));
  p = v_fma(p, r, v_set1(1.f / 6));
  p = v_fma(p, r, v_set1(0.5f));
  p = v_fma(p, r, v_set1(1.f));
  p = v_fma(p, r, v_set1(1.f));
  return v_scale2(p, n);
}

// exp of n floats in place.
inline void exp_inplace(float* x, long n) {
  long i = 0;
  for (; i + 16 <= n; i += 16) v_store(x + i, v_exp(v_load(x + i)));
  if (i < n) v_store_n(x + i, v_exp(v_load_n(x + i, static_cast<int>(n - i))), static_cast<int>(n - i));
}
