// The vectorised exp2 of the CPU attention kernels (memory_attention, decode_attention).
#pragma once
#include <bit>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <limits>

namespace mplus_fast {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (0 below -126, including -inf); ~1 ulp; written to vectorise (Taylor of degree 7
// on [-0.5, 0.5], error < 1e-8 relative).
__attribute__((always_inline)) inline float exp2_nonpos(float x) {
  const float xc = x < -126.0f ? -126.0f : x;
  const int32_t k = static_cast<int32_t>(xc - 0.5f);  // nearest integer (xc <= 0); no libm call
  const float f = xc - static_cast<float>(k);            // [-0.5, 0.5]
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const float two_k = std::bit_cast<float>((k + 127) << 23);
  return x < -126.0f ? 0.0f : p * two_k;
}

// x[j] <- 2^(x[j] - m) for j < n (x[j] - m <= 0); returns the sum. Scalar, vectorisable fallback.
inline float exp2_sub_sum_scalar(float* x, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp2_nonpos(x[j] - m);
    x[j] = p;
    sum += p;
  }
  return sum;
}

#if defined(__x86_64__)
// AVX2 + FMA version of exp2_sub_sum_scalar (same polynomial), selected at run time.
__attribute__((target("avx2,fma"))) inline float exp2_sub_sum_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(-126.0f), half = _mm256_set1_ps(0.5f);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    const __m256 dead = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);  // includes -inf (masked keys)
    const __m256 xc = _mm256_max_ps(v, lo);
    const __m256i k = _mm256_cvttps_epi32(_mm256_sub_ps(xc, half));
    const __m256 f = _mm256_sub_ps(xc, _mm256_cvtepi32_ps(k));
    __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, bias), 23));
    const __m256 r = _mm256_andnot_ps(dead, _mm256_mul_ps(p, two_k));
    _mm256_storeu_ps(x + j, r);
    acc = _mm256_add_ps(acc, r);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  return sum + exp2_sub_sum_scalar(x + j, n - j, m);
}
inline const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

inline float exp2_sub_sum(float* x, int64_t n, float m) {
#if defined(__x86_64__)
  if (kHaveAvx2) return exp2_sub_sum_avx2(x, n, m);
#endif
  return exp2_sub_sum_scalar(x, n, m);
}

}  // namespace mplus_fast
