// Fused per-token ops for CPU decode, where eager torch pays a dispatch per op.
// Same semantics as the transformers reference (fp32 statistics, one rounding
// to the model dtype at the end of each fused op).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace {

template <typename T>
void add_rmsnorm_rows(const T* x, const T* res, const T* w, T* out, T* res_out,
                      int64_t rows, int64_t n, float eps, bool has_res) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * n;
    T* ro = res_out + r * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      T s = has_res ? static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(res[r * n + i])) : xr[i];
      ro[i] = s;
      float f = static_cast<float>(s);
      ss += f * f;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    T* o = out + r * n;
    for (int64_t i = 0; i < n; ++i) {
      T normed = static_cast<T>(static_cast<float>(ro[i]) * inv);          // cast back, then weight
      o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
  });
}

template <typename T>
void rope_rows(T* x, const int64_t* pos, const float* cos, const float* sin, int64_t tokens,
               int64_t heads, int64_t d, int64_t tok_stride) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const float* c = cos + pos[t] * d;
    const float* s = sin + pos[t] * d;     // sign folded in: [-sin, sin]
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * tok_stride + h * d;
      for (int64_t i = 0; i < half; ++i) {
        float a = static_cast<float>(v[i]), b = static_cast<float>(v[i + half]);
        float ca = static_cast<float>(static_cast<T>(c[i])), cb = static_cast<float>(static_cast<T>(c[i + half]));
        float sa = static_cast<float>(static_cast<T>(s[i])), sb = static_cast<float>(static_cast<T>(s[i + half]));
        v[i] = static_cast<T>(a * ca + b * sa);
        v[i + half] = static_cast<T>(b * cb + a * sb);
      }
    }
  }
  });
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = gu + r * 2 * n;
    const T* u = g + n;
    T* o = out + r * n;
    std::vector<float> e(n);
    for (int64_t i = 0; i < n; ++i) e[i] = -static_cast<float>(g[i]);
    exp_inplace(e.data(), n);                       // e = exp(-g), vectorized
    for (int64_t i = 0; i < n; ++i) {
      float gf = static_cast<float>(g[i]);
      float act = static_cast<float>(static_cast<T>(gf / (1.f + e[i])));
      o[i] = static_cast<T>(act * static_cast<float>(u[i]));
    }
  }
  });
}

void check_2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), what, ": a contiguous 2-D tensor is required");
}

}  // namespace

std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                       torch::Tensor weight, double eps) {
  check_2d(x, "add_rmsnorm x");
  TORCH_CHECK(weight.numel() == x.size(1) && weight.dtype() == x.dtype(), "add_rmsnorm: weight [n] of x's dtype");
  const bool has_res = residual.has_value();
  if (has_res) {
    check_2d(*residual, "add_rmsnorm residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->dtype() == x.dtype(), "add_rmsnorm: residual like x");
  }
  auto out = torch::empty_like(x);
  auto res_out = torch::empty_like(x);
  AT_DISPATCH_SWITCH(x.scalar_type(), "add_rmsnorm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      add_rmsnorm_rows<float>(x.data_ptr<float>(), has_res ? residual->data_ptr<float>() : nullptr,
                              weight.data_ptr<float>(), out.data_ptr<float>(), res_out.data_ptr<float>(),
                              x.size(0), x.size(1), static_cast<float>(eps), has_res); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = at::BFloat16;
      add_rmsnorm_rows<T>(x.data_ptr<T>(), has_res ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                          out.data_ptr<T>(), res_out.data_ptr<T>(), x.size(0), x.size(1),
                          static_cast<float>(eps), has_res); }));
  return {out, res_out};
}

void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_: x [T, heads, d], rows contiguous");
  TORCH_CHECK(positions.dtype() == torch::kInt64 && positions.numel() == x.size(0) && positions.is_contiguous(),
              "rope_: positions [T] int64");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
              sin.is_contiguous() && cos.size(1) == x.size(2), "rope_: fp32 tables [P, d]");
  AT_DISPATCH_SWITCH(x.scalar_type(), "rope_",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rope_rows<float>(x.data_ptr<float>(), positions.data_ptr<int64_t>(), cos.data_ptr<float>(),
                       sin.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      rope_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), positions.data_ptr<int64_t>(), cos.data_ptr<float>(),
                              sin.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.stride(0)); }));
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_2d(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: even width [gate | up]");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_SWITCH(gate_up.scalar_type(), "silu_mul",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), out.size(0), out.size(1)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      silu_mul_rows<at::BFloat16>(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), out.size(0),
                                  out.size(1)); }));
  return out;
}
