// mplus_fast::memory_attention and mplus_fast::merge_attention_states, CPU kernels.
//
// Design (flash-style, nothing of size n x prefix is ever allocated): one task per
// (batch, kv head, query block). The task stacks the query rows of all Hq/Hkv heads that share the
// kv head (GQA: every key block is loaded, gathered, RoPE'd and converted once for the whole
// group), pre-scaled by scale*log2(e). Keys stream in blocks of kKeyBlock rows: first the prefix
// rows (gathered through prefix_index, rotated on load with HF RoPE rounded in the key dtype, from
// a per-call cos/sin table of size P x D), then the tail rows up to the block's last query, masked
// bottom-right causal and by tail_mask. Per block: S = Q K^T and O += P V as MKL GEMMs on per-thread
// float32 scratch (at::cpu::mm_out / addmm_, single-threaded inside the parallel region), and an
// online softmax with a vectorised exp2 in between. Output and lse (natural log) are written once.
#include "ops/rope.h"
#include "ops/check.h"
#include "ops/softmax.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <bit>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace mplus_fast {
namespace {

constexpr int64_t kRowsTarget = 256;  // query rows (all heads of a kv group) per task
constexpr int64_t kKeyBlock = 512;    // key rows per block (GEMMs of 128 x 512 x D reach ~75 GF/s/core)
constexpr float kLn2 = 0.6931471805599453f;

// Mirrors check_memory_attention_args in mplus_fast/ops/attention.py. Returns P.
int64_t check_args(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                   const std::optional<at::Tensor>& idx, const std::optional<at::Tensor>& pos,
                   const std::optional<at::Tensor>& freq, const at::Tensor& kt, const at::Tensor& vt,
                   const std::optional<at::Tensor>& tmask) {
  TORCH_CHECK(q.dim() == 4 && is_float(q) && q.size(3) > 0,
              "memory_attention: q must be (B, Hq, n, D) float32/bfloat16/float16, got ", q.sizes(), " ",
              q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  TORCH_CHECK(kt.dim() == 4 && kt.size(0) == B && kt.size(1) > 0 && Hq % kt.size(1) == 0 && kt.size(2) == n &&
                  kt.size(3) == D,
              "memory_attention: k_tail must be (B=", B, ", Hkv, n=", n, ", D=", D, ") with Hq=", Hq,
              " divisible by Hkv, got ", kt.sizes());
  const int64_t Hkv = kt.size(1);
  TORCH_CHECK(vt.sizes() == kt.sizes(), "memory_attention: v_tail must have k_tail's shape ", kt.sizes(), ", got ",
              vt.sizes());
  TORCH_CHECK(kp.dim() == 4 && (kp.size(0) == 1 || kp.size(0) == B) && kp.size(1) == Hkv && kp.size(3) == D,
              "memory_attention: k_prefix must be (B=", B, " or 1, Hkv=", Hkv, ", P_src, D=", D, "), got ", kp.sizes());
  TORCH_CHECK(vp.sizes() == kp.sizes(), "memory_attention: v_prefix must have k_prefix's shape ", kp.sizes(),
              ", got ", vp.sizes());
  const std::pair<const char*, const at::Tensor*> kv[] = {{"k_prefix", &kp}, {"v_prefix", &vp}, {"k_tail", &kt},
                                                         {"v_tail", &vt}};
  for (const auto& [name, t] : kv) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), "memory_attention: ", name,
                " must match q's dtype ", q.scalar_type(), " and device ", q.device(), ", got ", t->scalar_type(),
                " ", t->device(), " ", t->sizes());
  }
  int64_t P = kp.size(2);
  if (idx) {
    TORCH_CHECK(idx->scalar_type() == at::kLong && idx->dim() == 2 && idx->size(0) == B && idx->device() == q.device(),
                "memory_attention: prefix_index must be int64 (B=", B, ", P), got ", idx->sizes(), " ",
                idx->scalar_type());
    P = idx->size(1);
  }
  TORCH_CHECK(pos.has_value() == freq.has_value(), "memory_attention: prefix_positions and inv_freq go together");
  if (pos) {
    TORCH_CHECK(pos->scalar_type() == at::kLong && pos->device() == q.device() &&
                    ((pos->dim() == 1 && pos->size(0) == P) ||
                     (pos->dim() == 2 && pos->size(0) == B && pos->size(1) == P)),
                "memory_attention: prefix_positions must be int64 of shape (", P, ",) or (", B, ", ", P, "), got ",
                pos->sizes(), " ", pos->scalar_type());
    TORCH_CHECK(D % 2 == 0 && freq->scalar_type() == at::kFloat && freq->dim() == 1 && freq->size(0) == D / 2 &&
                    freq->device() == q.device(),
                "memory_attention: inv_freq must be float32 of shape (", D / 2, ",) with D=", D, " even, got ",
                freq->sizes(), " ", freq->scalar_type());
  }
  if (tmask) {
    TORCH_CHECK(tmask->scalar_type() == at::kBool && tmask->dim() == 2 && tmask->size(0) == B &&
                    tmask->size(1) == n && tmask->device() == q.device(),
                "memory_attention: tail_mask must be bool of shape (", B, ", ", n, "), got ", tmask->sizes(), " ",
                tmask->scalar_type());
  }
  return P;
}

// Online-softmax step on S (R x nk, log2-scaled logits, -inf = masked): S <- exp2(S - m_new),
// l <- l * alpha + rowsum, O <- O * alpha, m <- m_new.
void online_softmax_block(float* S, int64_t R, int64_t nk, float* m, float* l, float* O, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    float* row = S + r * nk;
    float mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < nk; ++j) mx = row[j] > mx ? row[j] : mx;
    const float m_new = m[r] > mx ? m[r] : mx;
    const float m_safe = m_new == kNegInf ? 0.0f : m_new;
    const float sum = exp2_sub_sum(row, nk, m_safe);
    const float alpha = exp2_nonpos(m[r] - m_safe);
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* o = O + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
    }
  }
}

template <typename T>
inline void load_row(const T* src, int64_t sd, int64_t D, float* dst) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * sd]);
  }
}

template <typename T>
void attention_cpu_kernel(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                          const std::optional<at::Tensor>& idx, const std::optional<at::Tensor>& pos,
                          const std::optional<at::Tensor>& freq, const at::Tensor& kt, const at::Tensor& vt,
                          const std::optional<at::Tensor>& tmask, double scale, int64_t P, at::Tensor& out,
                          at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3), Hkv = kt.size(1);
  const int64_t G = Hq / Hkv, half = D / 2;
  const int64_t bq = std::max<int64_t>(1, std::min<int64_t>(n, (kRowsTarget + G - 1) / G));
  const int64_t nqb = (n + bq - 1) / bq;
  const float qscale = static_cast<float>(scale) * kLog2e;

  const T* qp = q.const_data_ptr<T>();
  const T* kpp = kp.const_data_ptr<T>();
  const T* vpp = vp.const_data_ptr<T>();
  const T* ktp = kt.const_data_ptr<T>();
  const T* vtp = vt.const_data_ptr<T>();
  const int64_t skb = kp.size(0) == 1 ? 0 : kp.stride(0), svb = vp.size(0) == 1 ? 0 : vp.stride(0);
  const int64_t* ip = idx ? idx->const_data_ptr<int64_t>() : nullptr;
  const int64_t sib = idx ? idx->stride(0) : 0, sip = idx ? idx->stride(1) : 0;
  const bool* mp = tmask ? tmask->const_data_ptr<bool>() : nullptr;
  const int64_t smb = tmask ? tmask->stride(0) : 0, smn = tmask ? tmask->stride(1) : 0;
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();

  // cos/sin of every prefix row, once per call: (PB, P, [cos half | sin half]), PB = 1 or B.
  std::vector<float> table;
  const int64_t PB = pos ? (pos->dim() == 2 ? B : 1) : 0;
  if (pos && P > 0) {
    table.resize(PB * P * 2 * half);
    const int64_t* pp = pos->const_data_ptr<int64_t>();
    const int64_t spb = pos->dim() == 2 ? pos->stride(0) : 0, spp = pos->stride(-1);
    auto f = freq->contiguous();
    const float* fp = f.const_data_ptr<float>();
    at::parallel_for(0, PB * P, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* c = table.data() + r * 2 * half;
        rope_cos_sin_row<T>(static_cast<float>(pp[(r / P) * spb + (r % P) * spp]), fp, 1.0f, half, c, c + half);
      }
    });
  }

  at::parallel_for(0, B * Hkv * nqb, 1, [&](int64_t t0, int64_t t1) {
    const int64_t Rmax = G * bq;
    std::vector<float> buf(Rmax * D * 2 + kKeyBlock * D * 2 + Rmax * kKeyBlock + Rmax * 2);
    float* Qf = buf.data();
    float* O = Qf + Rmax * D;
    float* Kf = O + Rmax * D;
    float* Vf = Kf + kKeyBlock * D;
    float* S = Vf + kKeyBlock * D;
    float* m = S + Rmax * kKeyBlock;
    float* l = m + Rmax;
    const auto fopt = at::TensorOptions().dtype(at::kFloat);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (Hkv * nqb), hk = (task / nqb) % Hkv, m0 = (task % nqb) * bq;
      const int64_t rows = std::min(bq, n - m0), R = G * rows;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < rows; ++i) {
          const T* src = qp + b * q.stride(0) + (hk * G + g) * q.stride(1) + (m0 + i) * q.stride(2);
          float* dst = Qf + (g * rows + i) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * q.stride(3)]) * qscale;
        }
      }
      std::fill(m, m + R, kNegInf);
      std::fill(l, l + R, 0.0f);
      std::fill(O, O + R * D, 0.0f);
      at::Tensor Qt = at::from_blob(Qf, {R, D}, fopt);
      at::Tensor Ot = at::from_blob(O, {R, D}, fopt);
      auto block = [&](int64_t nk) {
        at::Tensor St = at::from_blob(S, {R, nk}, fopt);
        at::cpu::mm_out(St, Qt, at::from_blob(Kf, {nk, D}, fopt).t());
      };
      auto finish_block = [&](int64_t nk) {
        online_softmax_block(S, R, nk, m, l, O, D);
        at::cpu::addmm_(Ot, at::from_blob(S, {R, nk}, fopt), at::from_blob(Vf, {nk, D}, fopt));
      };
      // (1) prefix rows
      for (int64_t p0 = 0; p0 < P; p0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, P - p0);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t p = p0 + j;
          const int64_t src = ip ? ip[b * sib + p * sip] : p;
          const T* krow = kpp + b * skb + hk * kp.stride(1) + src * kp.stride(2);
          if (pos) {
            const float* c = table.data() + ((PB == 1 ? 0 : b) * P + p) * 2 * half;
            rope_rotate_row<T>(krow, kp.stride(3), c, c + half, half, Kf + j * D);
          } else {
            load_row<T>(krow, kp.stride(3), D, Kf + j * D);
          }
          load_row<T>(vpp + b * svb + hk * vp.stride(1) + src * vp.stride(2), vp.stride(3), D, Vf + j * D);
        }
        block(nk);
        finish_block(nk);
      }
      // (2) tail rows [0, m0 + rows): bottom-right causal + tail_mask
      const int64_t hi = m0 + rows;
      for (int64_t j0 = 0; j0 < hi; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, hi - j0);
        for (int64_t j = 0; j < nk; ++j) {
          load_row<T>(ktp + b * kt.stride(0) + hk * kt.stride(1) + (j0 + j) * kt.stride(2), kt.stride(3), D,
                      Kf + j * D);
          load_row<T>(vtp + b * vt.stride(0) + hk * vt.stride(1) + (j0 + j) * vt.stride(2), vt.stride(3), D,
                      Vf + j * D);
        }
        block(nk);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = m0 + r % rows;
          float* srow = S + r * nk;
          for (int64_t j = 0; j < nk; ++j) {
            const int64_t key = j0 + j;
            if (key > i || (mp && !mp[b * smb + key * smn])) srow[j] = kNegInf;
          }
        }
        finish_block(nk);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = g * rows + i;
          T* dst = op + ((b * Hq + h) * n + m0 + i) * D;
          const float denom = l[r] > 0.0f ? l[r] : 1.0f;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(O[r * D + d] / denom);
          lp[(b * Hq + h) * n + m0 + i] = l[r] > 0.0f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> memory_attention_cpu(const at::Tensor& q, const at::Tensor& k_prefix,
                                                        const at::Tensor& v_prefix,
                                                        const std::optional<at::Tensor>& prefix_index,
                                                        const std::optional<at::Tensor>& prefix_positions,
                                                        const std::optional<at::Tensor>& inv_freq,
                                                        const at::Tensor& k_tail, const at::Tensor& v_tail,
                                                        const std::optional<at::Tensor>& tail_mask, double scale) {
  const int64_t P = check_args(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq, k_tail, v_tail,
                               tail_mask);
  if (prefix_index && prefix_index->numel() > 0) {  // bad indices raise before anything is read
    const int64_t src = k_prefix.size(2);
    const auto lo = prefix_index->min().item<int64_t>(), hi = prefix_index->max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < src, "memory_attention: prefix_index ", prefix_index->sizes(),
                " has values in [", lo, ", ", hi, "], outside [0, ", src, ")");
  }
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  switch (q.scalar_type()) {
#define MPLUS_CASE(ST, T)                                                                                      \
  case ST:                                                                                                     \
    attention_cpu_kernel<T>(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq, k_tail, v_tail, \
                            tail_mask, scale, P, out, lse);                                                    \
    break;
    MPLUS_CASE(at::kFloat, float)
    MPLUS_CASE(at::kBFloat16, c10::BFloat16)
    MPLUS_CASE(at::kHalf, c10::Half)
#undef MPLUS_CASE
    default: TORCH_CHECK(false, "memory_attention: unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

// --- merge_attention_states ---------------------------------------------------------------------

void check_merge(const at::Tensor& oa, const at::Tensor& la, const at::Tensor& ob, const at::Tensor& lb) {
  TORCH_CHECK(oa.dim() >= 1 && is_float(oa), "merge_attention_states: out_a must be (..., D) float, got ",
              oa.sizes(), " ", oa.scalar_type());
  TORCH_CHECK(ob.sizes() == oa.sizes() && ob.scalar_type() == oa.scalar_type() && ob.device() == oa.device(),
              "merge_attention_states: out_b must match out_a ", oa.sizes(), " ", oa.scalar_type(), ", got ",
              ob.sizes(), " ", ob.scalar_type());
  const auto lead = oa.sizes().slice(0, oa.dim() - 1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lse_a", &la}, {"lse_b", &lb}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == lead && t->device() == oa.device(),
                "merge_attention_states: ", name, " must be float32 of shape ", lead, ", got ", t->sizes(), " ",
                t->scalar_type());
  }
}

template <typename T>
void merge_cpu_kernel(const at::Tensor& oa, const at::Tensor& la, const at::Tensor& ob, const at::Tensor& lb,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t rows = la.numel(), D = oa.size(-1);
  const T* pa = oa.const_data_ptr<T>();
  const T* pb = ob.const_data_ptr<T>();
  const float* qa = la.const_data_ptr<float>();
  const float* qb = lb.const_data_ptr<float>();
  T* po = out.data_ptr<T>();
  float* pl = lse.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float top = std::max(qa[r], qb[r]);
      if (top == kNegInf) top = 0.0f;
      const float wa = std::exp(qa[r] - top), wb = std::exp(qb[r] - top), total = wa + wb;
      const float denom = total == 0.0f ? 1.0f : total;
      for (int64_t d = 0; d < D; ++d) {
        po[r * D + d] = static_cast<T>((wa * static_cast<float>(pa[r * D + d]) +
                                        wb * static_cast<float>(pb[r * D + d])) / denom);
      }
      pl[r] = total == 0.0f ? kNegInf : top + std::log(total);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge(out_a, lse_a, out_b, lse_b);
  auto oa = out_a.contiguous(), ob = out_b.contiguous(), la = lse_a.contiguous(), lb = lse_b.contiguous();
  auto out = at::empty_like(oa);
  auto lse = at::empty_like(la);
  if (la.numel() == 0) return {out, lse};
  switch (oa.scalar_type()) {
    case at::kFloat: merge_cpu_kernel<float>(oa, la, ob, lb, out, lse); break;
    case at::kBFloat16: merge_cpu_kernel<c10::BFloat16>(oa, la, ob, lb, out, lse); break;
    case at::kHalf: merge_cpu_kernel<c10::Half>(oa, la, ob, lb, out, lse); break;
    default: TORCH_CHECK(false, "merge_attention_states: unsupported dtype ", oa.scalar_type());
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) {
  m.impl("memory_attention", &memory_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace mplus_fast
