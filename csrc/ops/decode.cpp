// mplus_fast::decode_attention and mplus_fast::decode_gemv, CPU kernels: the two halves of a
// one-token decode step, both bound by how fast memory streams in (weights, then the KV cache).
//
// decode_gemv: out (M, N) = x (M, K) @ w (K, N), w stored (in, out) row-major, M small (decode
// rows). Split-K (see gemv_kernel): every weight is read exactly once, in one sequential stream
// per thread. MKL's sgemm with M = 1 reaches ~75 % of the machine's read bandwidth here.
//
// decode_attention: one query token per sequence over a static cache with a validity mask. One
// task per (batch, kv head, key split): the G = Hq/Hkv query heads of the kv head share every key
// and value row loaded (GQA), scores for the split go to a float32 scratch, then an exp2 pass
// (vectorised, shared with memory_attention) and the P·V pass. Splits are merged by log-sum-exp.
// Keys and values are each read once, sequentially. An optional batch-shared prefix (k_shared /
// v_shared, (1, Hkv, P, D), all visible: the [bos | STM] every sequence reads) is attended in the
// same pass by tasks of its own, each over all B·G query rows of a kv head (so a shared row is
// read once per step for the whole batch), and merged with the sequence's splits.
#include "ops/check.h"
#include "ops/softmax.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace mplus_fast {
namespace {

// ------------------------------------------------------------------------------ decode_gemv
// Mirrors check_decode_gemv_args in mplus_fast/ops/decode.py.
void check_gemv_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && is_float(x), "decode_gemv: x must be (M, K) float32/bfloat16/float16, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "decode_gemv: w must be (K=", x.size(1), ", N) of x's dtype ", x.scalar_type(), ", got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "decode_gemv: x (", x.device(), ") and w (", w.device(),
              ") must share a device");
}

// acc[m, :] += sum over k in [k0, k1) of x[m, k] * w[k, :]: rows k0..k1 of w are one contiguous
// stream, read once, four rows per pass over the accumulators (float32).
template <typename T>
void gemv_rows(const float* xf, int64_t K, const T* w, int64_t ldw, int64_t M, int64_t N, int64_t k0, int64_t k1,
               float* acc) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const T* w0 = w + k * ldw;
    const T* w1 = w0 + ldw;
    const T* w2 = w1 + ldw;
    const T* w3 = w2 + ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = xf + m * K + k;
      const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      float* am = acc + m * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        am[j] += a0 * static_cast<float>(w0[j]) + a1 * static_cast<float>(w1[j]) + a2 * static_cast<float>(w2[j]) +
                 a3 * static_cast<float>(w3[j]);
    }
  }
  for (; k < k1; ++k) {
    const T* wk = w + k * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float a = xf[m * K + k];
      float* am = acc + m * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) am[j] += a * static_cast<float>(wk[j]);
    }
  }
}

// Split-K: each thread streams one contiguous band of w's rows into its own M x N float32
// accumulator (whole rows: a band is a single sequential read, which is what a GEMV needs to run
// at memory speed; column blocks of a row-major w read short strided segments and run ~2x
// slower), then the per-thread accumulators are summed.
template <typename T>
void gemv_kernel(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  std::vector<float> xf(static_cast<size_t>(M * K));
  const T* xp = x.const_data_ptr<T>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = static_cast<float>(xp[m * x.stride(0) + k]);
  const int64_t threads = at::get_num_threads();
  std::vector<float> acc(static_cast<size_t>(threads * M * N), 0.0f);
  const T* wp = w.const_data_ptr<T>();
  const int64_t ldw = w.stride(0);
  const int64_t grain = std::max<int64_t>(64, (1 << 16) / std::max<int64_t>(1, N));  // >= ~256 KB of w per task
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    gemv_rows<T>(xf.data(), K, wp, ldw, M, N, k0, k1, acc.data() + at::get_thread_num() * M * N);
  });
  T* op = out.data_ptr<T>();
  at::parallel_for(0, M * N, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float sum = 0.0f;
      for (int64_t t = 0; t < threads; ++t) sum += acc[t * M * N + i];
      op[i] = static_cast<T>(sum);
    }
  });
}

at::Tensor decode_gemv_cpu(const at::Tensor& x_in, const at::Tensor& w_in) {
  check_gemv_args(x_in, w_in);
  auto x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  auto w = w_in.stride(1) == 1 ? w_in : w_in.contiguous();
  auto out = at::empty({x.size(0), w.size(1)}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  switch (x.scalar_type()) {
    case at::kFloat: gemv_kernel<float>(x, w, out); break;
    case at::kBFloat16: gemv_kernel<c10::BFloat16>(x, w, out); break;
    case at::kHalf: gemv_kernel<c10::Half>(x, w, out); break;
    default: TORCH_CHECK(false, "decode_gemv: unsupported dtype ", x.scalar_type());
  }
  return out;
}

// ------------------------------------------------------------------------------ decode_attention
// Mirrors check_decode_attention_args in mplus_fast/ops/decode.py.
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && is_float(q) && q.size(3) > 0,
              "decode_attention: q must be (B, Hq, 1, D) float32/bfloat16/float16, got ", q.sizes(), " ",
              q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) > 0 && Hq % k.size(1) == 0 && k.size(3) == D &&
                  k.scalar_type() == q.scalar_type(),
              "decode_attention: k must be (B=", B, ", Hkv, S, D=", D, ") of q's dtype with Hq=", Hq,
              " divisible by Hkv, got ", k.sizes(), " ", k.scalar_type());
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "decode_attention: v must have k's shape ", k.sizes(), " and dtype, got ", v.sizes(), " ",
              v.scalar_type());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == B && valid.size(1) == k.size(2) && valid.scalar_type() == at::kBool,
              "decode_attention: valid must be bool (B=", B, ", S=", k.size(2), "), got ", valid.sizes(), " ",
              valid.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && valid.device() == q.device(),
              "decode_attention: q, k, v and valid must share a device");
}

struct Partial {  // one task's unnormalised result for its query rows
  std::vector<float> o;  // rows x D: sum of 2^(s - m) v
  std::vector<float> m;  // rows: max log2-scaled score (-inf when no valid key)
  std::vector<float> l;  // rows: sum of 2^(s - m)
};

// out[g * ld] = q[g] . kr for g < G (q: G rows of D floats). Scalar fallback, vectorisable.
void dots_scalar(const float* q, int64_t G, int64_t D, const float* kr, float* out, int64_t ld) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
    out[g * ld] = dot;
  }
}

// o[g] += p[g * ldp] * vr for g < G. Scalar fallback, vectorisable.
void axpys_scalar(const float* p, int64_t ldp, int64_t G, int64_t D, const float* vr, float* o) {
  for (int64_t g = 0; g < G; ++g) {
    const float pg = p[g * ldp];
    float* og = o + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) og[d] += pg * vr[d];
  }
}

#if defined(__x86_64__)
// AVX2 + FMA versions for D % 8 == 0, selected at run time (the build targets baseline x86-64).
__attribute__((target("avx2,fma"))) void dots_avx2(const float* q, int64_t G, int64_t D, const float* kr, float* out,
                                                   int64_t ld) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kr + d), acc);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[g * ld] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
  }
}

__attribute__((target("avx2,fma"))) void axpys_avx2(const float* p, int64_t ldp, int64_t G, int64_t D, const float* vr,
                                                    float* o) {
  for (int64_t g = 0; g < G; ++g) {
    const __m256 pg = _mm256_set1_ps(p[g * ldp]);
    float* og = o + g * D;
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(og + d, _mm256_fmadd_ps(pg, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(og + d)));
  }
}
#endif

using DotsFn = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t);
using AxpysFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*);

// A row of T as floats: the row itself for float, else converted into `buf`.
template <typename T>
inline const float* as_float_row(const T* row, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(row[d]);
    return buf;
  }
}

// `rows` query rows qf (float, pre-scaled by scale * log2 e) over n keys/values of one kv head;
// valid == nullptr: every key is visible (the shared prefix).
template <typename T>
void attend_split(const float* qf, int64_t rows, const T* k, const T* v, int64_t sks, int64_t svs, const bool* valid,
                  int64_t n, int64_t D, Partial& part, std::vector<float>& scores, std::vector<float>& buf) {
  DotsFn dots = dots_scalar;
  AxpysFn axpys = axpys_scalar;
#if defined(__x86_64__)
  if (kHaveAvx2 && D % 8 == 0) {
    dots = dots_avx2;
    axpys = axpys_avx2;
  }
#endif
  scores.assign(static_cast<size_t>(rows * n), kNegInf);
  buf.resize(static_cast<size_t>(D));
  for (int64_t s = 0; s < n; ++s)
    if (!valid || valid[s]) dots(qf, rows, D, as_float_row(k + s * sks, D, buf.data()), scores.data() + s, n);
  part.o.assign(static_cast<size_t>(rows * D), 0.0f);
  part.m.assign(static_cast<size_t>(rows), kNegInf);
  part.l.assign(static_cast<size_t>(rows), 0.0f);
  for (int64_t g = 0; g < rows; ++g) {
    float* row = scores.data() + g * n;
    float mx = kNegInf;
    for (int64_t s = 0; s < n; ++s) mx = row[s] > mx ? row[s] : mx;
    part.m[g] = mx;
    if (mx == kNegInf) {
      std::fill(row, row + n, 0.0f);
      continue;
    }
    part.l[g] = exp2_sub_sum(row, n, mx);
  }
  for (int64_t s = 0; s < n; ++s)
    if (!valid || valid[s]) axpys(scores.data() + s, n, rows, D, as_float_row(v + s * svs, D, buf.data()), part.o.data());
}

// Key splits of a part of `len` keys such that about `want` tasks cover it, each >= 256 keys.
inline int64_t splits_for(int64_t len, int64_t want) { return std::max<int64_t>(1, std::min<int64_t>(want, len / 256)); }

// Tasks: first the shared prefix's (kv head, split) — the B*G query rows of the kv head's group
// across the batch share each shared key row loaded, so it is read once per step, not once per
// sequence — then each sequence's (batch, kv head, split). Threads take tasks in that order
// from a counter (the shared tasks are the long ones), so unequal parts still balance. The
// result is the same whatever thread ran a task: every task writes its own partial and the
// partials are merged in a fixed order.
template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                             const at::Tensor* ks, const at::Tensor* vs, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const int64_t Ps = ks ? ks->size(2) : 0;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = splits_for(S, (2 * threads + B * Hkv - 1) / (B * Hkv));
  const int64_t span = (S + splits - 1) / splits;
  const int64_t splits_s = Ps > 0 ? splits_for(Ps, (2 * threads + Hkv - 1) / Hkv) : 0;
  const int64_t span_s = splits_s > 0 ? (Ps + splits_s - 1) / splits_s : 0;
  const int64_t n_shared = Hkv * splits_s, n_tasks = n_shared + B * Hkv * splits;
  // The queries as float, pre-scaled, twice: (B, Hkv, G, D) for the per-sequence tasks and
  // (Hkv, B, G, D) for the shared ones (a kv head's rows of the whole batch, consecutive).
  const float qscale = static_cast<float>(scale) * kLog2e;
  std::vector<float> qf(static_cast<size_t>(B * Hq * D)), qs(Ps > 0 ? qf.size() : 0);
  const T* qp = q.const_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq)
      for (int64_t d = 0; d < D; ++d) {
        const float x = static_cast<float>(qp[b * q.stride(0) + hq * q.stride(1) + d]) * qscale;
        qf[(b * Hq + hq) * D + d] = x;
        if (Ps > 0) qs[(((hq / G) * B + b) * G + hq % G) * D + d] = x;
      }
  std::vector<Partial> parts(static_cast<size_t>(n_tasks));
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const bool* mp = valid.const_data_ptr<bool>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> scores, buf;
    for (int64_t t = next++; t < n_tasks; t = next++) {
      if (t < n_shared) {
        const int64_t h = t / splits_s, s0 = (t % splits_s) * span_s, n = std::max<int64_t>(0, std::min(span_s, Ps - s0));
        attend_split<T>(qs.data() + h * B * G * D, B * G,
                        ks->const_data_ptr<T>() + ks->stride(1) * h + ks->stride(2) * s0,
                        vs->const_data_ptr<T>() + vs->stride(1) * h + vs->stride(2) * s0, ks->stride(2),
                        vs->stride(2), nullptr, n, D, parts[t], scores, buf);
        continue;
      }
      const int64_t u = t - n_shared;
      const int64_t b = u / (Hkv * splits), h = (u / splits) % Hkv, sp = u % splits;
      const int64_t s0 = sp * span, n = std::max<int64_t>(0, std::min(span, S - s0));
      attend_split<T>(qf.data() + (b * Hq + h * G) * D, G, kp + k.stride(0) * b + k.stride(1) * h + k.stride(2) * s0,
                      vp + v.stride(0) * b + v.stride(1) * h + v.stride(2) * s0, k.stride(2), v.stride(2),
                      mp + valid.stride(0) * b + s0, n, D, parts[t], scores, buf);
    }
  });
  // (partial, row) pairs of output row (b, h, g): the shared splits, then the sequence's own.
  std::vector<std::pair<const Partial*, int64_t>> row_parts;
  std::vector<float> acc(static_cast<size_t>(D));
  T* op = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        row_parts.clear();
        for (int64_t sp = 0; sp < splits_s; ++sp) row_parts.emplace_back(&parts[h * splits_s + sp], b * G + g);
        for (int64_t sp = 0; sp < splits; ++sp) row_parts.emplace_back(&parts[n_shared + (b * Hkv + h) * splits + sp], g);
        float mx = kNegInf;
        for (const auto& [p, r] : row_parts) mx = std::max(mx, p->m[r]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float l = 0.0f;
        for (const auto& [p, r] : row_parts) {
          if (p->m[r] == kNegInf) continue;
          const float w = std::exp2(p->m[r] - mx);
          l += w * p->l[r];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * p->o[r * D + d];
        }
        T* row = op + ((b * Hkv + h) * G + g) * D;  // out is (B, Hq, 1, D) contiguous; head = h * G + g
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no valid key: zeros, as SDPA's fused kernels
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(acc[d] * inv);
      }
    }
  }
}

// Mirrors the shared-prefix checks of check_decode_attention_args in mplus_fast/ops/decode.py.
void check_shared_args(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& ks,
                       const std::optional<at::Tensor>& vs) {
  TORCH_CHECK(ks.has_value() == vs.has_value(), "decode_attention: k_shared and v_shared must be given together");
  if (!ks) return;
  TORCH_CHECK(ks->dim() == 4 && ks->size(0) == 1 && ks->size(1) == k.size(1) && ks->size(3) == k.size(3) &&
                  ks->scalar_type() == q.scalar_type(),
              "decode_attention: k_shared must be (1, Hkv=", k.size(1), ", P, D=", k.size(3), ") of q's dtype, got ",
              ks->sizes(), " ", ks->scalar_type());
  TORCH_CHECK(vs->sizes() == ks->sizes() && vs->scalar_type() == ks->scalar_type(),
              "decode_attention: v_shared must have k_shared's shape ", ks->sizes(), " and dtype, got ", vs->sizes(),
              " ", vs->scalar_type());
  TORCH_CHECK(ks->device() == q.device() && vs->device() == q.device(),
              "decode_attention: k_shared and v_shared must be on q's device");
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& valid_in, double scale, const std::optional<at::Tensor>& ks_in,
                                const std::optional<at::Tensor>& vs_in) {
  check_attention_args(q_in, k_in, v_in, valid_in);
  check_shared_args(q_in, k_in, ks_in, vs_in);
  auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  auto valid = valid_in.stride(1) == 1 ? valid_in : valid_in.contiguous();
  at::Tensor ks, vs;
  if (ks_in) {
    ks = ks_in->stride(3) == 1 ? *ks_in : ks_in->contiguous();
    vs = vs_in->stride(3) == 1 ? *vs_in : vs_in->contiguous();
  }
  const at::Tensor* ksp = ks.defined() ? &ks : nullptr;
  const at::Tensor* vsp = vs.defined() ? &vs : nullptr;
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_kernel<float>(q, k, v, valid, ksp, vsp, scale, out); break;
    case at::kBFloat16: decode_attention_kernel<c10::BFloat16>(q, k, v, valid, ksp, vsp, scale, out); break;
    case at::kHalf: decode_attention_kernel<c10::Half>(q, k, v, valid, ksp, vsp, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) {
  m.impl("decode_gemv", &decode_gemv_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace mplus_fast
