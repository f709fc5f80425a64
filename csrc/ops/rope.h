// Shared argument checks of mplus_fast::rope_apply (CPU kernel in rope.cpp, CUDA glue in rope_cuda.cu).
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace mplus_fast {

// Checks x (B, H, S, D) float, positions int64 (S,) or (B, S), inv_freq float32 (D/2,), same device.
void check_rope_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);

// Round a float to T and back (the rounding eager PyTorch applies after each op in dtype T).
template <typename T>
inline float rope_round(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// One row's HF cos/sin: c[j] = T(cos(pos * inv_freq[j]) * scaling), s likewise, j < half.
template <typename T>
inline void rope_cos_sin_row(float pos, const float* inv_freq, float scaling, int64_t half, float* c, float* s) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = pos * inv_freq[j];
    c[j] = rope_round<T>(std::cos(a) * scaling);
    s[j] = rope_round<T>(std::sin(a) * scaling);
  }
}

// Rotate one row of x (stride sxd) by cos/sin as HF does in dtype T: out = x*cos + rotate_half(x)*sin,
// each product and the sum rounded to T. Writes the float values of the T results to out[0, 2*half).
template <typename T>
inline void rope_rotate_row(const T* x, int64_t sxd, const float* c, const float* s, int64_t half, float* out) {
  if (sxd == 1) {  // contiguous row: same arithmetic, vectorisable
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = static_cast<float>(x[j]);
      const float x2 = static_cast<float>(x[j + half]);
      out[j] = rope_round<T>(rope_round<T>(x1 * c[j]) + rope_round<T>(-x2 * s[j]));
      out[j + half] = rope_round<T>(rope_round<T>(x2 * c[j]) + rope_round<T>(x1 * s[j]));
    }
    return;
  }
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = static_cast<float>(x[j * sxd]);
    const float x2 = static_cast<float>(x[(j + half) * sxd]);
    out[j] = rope_round<T>(rope_round<T>(x1 * c[j]) + rope_round<T>(-x2 * s[j]));
    out[j + half] = rope_round<T>(rope_round<T>(x2 * c[j]) + rope_round<T>(x1 * s[j]));
  }
}

}  // namespace mplus_fast
