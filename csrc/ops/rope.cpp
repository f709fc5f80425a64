// mplus_fast::rope_apply, CPU kernel (+ the argument checks shared with the CUDA glue).
//
// Design: one task per (batch, row); the row's cos/sin are computed once in float32 (HF: angle =
// float(pos) * inv_freq, then cos * attention_scaling) and rounded to x's dtype, then applied to
// every head. Each product and the sum are rounded to x's dtype exactly as eager PyTorch does
// (x * cos + rotate_half(x) * sin), so the result is bit-equal to the reference except where
// glibc's cosf/sinf and torch's vectorised ones differ by one float32 ulp.
#include "ops/rope.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace mplus_fast {

void check_rope_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  TORCH_CHECK(x.dim() == 4, "rope_apply: x must be (B, H, S, D), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "rope_apply: x must be float32/bfloat16/float16, got ", x.scalar_type(), " ", x.sizes());
  const int64_t B = x.size(0), S = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope_apply: x head dim D must be even, got x ", x.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong &&
                  ((positions.dim() == 1 && positions.size(0) == S) ||
                   (positions.dim() == 2 && positions.size(0) == B && positions.size(1) == S)),
              "rope_apply: positions must be int64 of shape (", S, ",) or (", B, ", ", S, "), got ",
              positions.sizes(), " ", positions.scalar_type());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) == D / 2,
              "rope_apply: inv_freq must be float32 of shape (", D / 2, ",), got ", inv_freq.sizes(), " ",
              inv_freq.scalar_type());
  TORCH_CHECK(positions.device() == x.device() && inv_freq.device() == x.device(), "rope_apply: x (", x.device(),
              "), positions (", positions.device(), ") and inv_freq (", inv_freq.device(), ") must share a device");
}

namespace {

template <typename T>
void rope_cpu_kernel(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, double scaling,
                     at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = D / 2;
  const int64_t sxb = x.stride(0), sxh = x.stride(1), sxs = x.stride(2), sxd = x.stride(3);
  const int64_t spb = positions.dim() == 2 ? positions.stride(0) : 0;
  const int64_t sps = positions.stride(-1);
  const T* xp = x.const_data_ptr<T>();
  const int64_t* pp = positions.const_data_ptr<int64_t>();
  auto freq = inv_freq.contiguous();
  const float* fp = freq.const_data_ptr<float>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scaling);
  at::parallel_for(0, B * S, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, H * D)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * half + D);
    float* c = buf.data();
    float* s = c + half;
    float* rot = s + half;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / S, t = r % S;
      rope_cos_sin_row<T>(static_cast<float>(pp[b * spb + t * sps]), fp, sc, half, c, s);
      for (int64_t h = 0; h < H; ++h) {
        rope_rotate_row<T>(xp + b * sxb + h * sxh + t * sxs, sxd, c, s, half, rot);
        T* orow = op + ((b * H + h) * S + t) * D;
        for (int64_t j = 0; j < D; ++j) orow[j] = static_cast<T>(rot[j]);  // exact: rot holds T values
      }
    }
  });
}

at::Tensor rope_apply_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                          double attention_scaling) {
  check_rope_args(x, positions, inv_freq);
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: rope_cpu_kernel<float>(x, positions, inv_freq, attention_scaling, out); break;
    case at::kBFloat16: rope_cpu_kernel<c10::BFloat16>(x, positions, inv_freq, attention_scaling, out); break;
    case at::kHalf: rope_cpu_kernel<c10::Half>(x, positions, inv_freq, attention_scaling, out); break;
    default: TORCH_CHECK(false, "rope_apply: unsupported x dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) { m.impl("rope_apply", &rope_apply_cpu); }

}  // namespace mplus_fast
