// mplus_fast::rope_apply, CUDA glue: checks (shared with the CPU kernel), device guard, current
// stream, dtype dispatch to the torch-free kernel in csrc/kernels/rope.cuh.
#include "kernels/rope.cuh"
#include "ops/rope.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mplus_fast {
namespace {

template <typename T, typename A>
void launch(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& freq, double scaling,
            at::Tensor& out) {
  const int64_t spb = positions.dim() == 2 ? positions.stride(0) : 0;
  auto err = kernels::launch_rope_apply<T>(
      reinterpret_cast<const T*>(x.const_data_ptr<A>()), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
      positions.const_data_ptr<int64_t>(), spb, positions.stride(-1), freq.const_data_ptr<float>(),
      static_cast<float>(scaling), reinterpret_cast<T*>(out.data_ptr<A>()), x.size(0), x.size(1), x.size(2),
      x.size(3) / 2, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "rope_apply: CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor rope_apply_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                           double attention_scaling) {
  check_rope_args(x, positions, inv_freq);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  auto freq = inv_freq.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: launch<float, float>(x, positions, freq, attention_scaling, out); break;
    case at::kBFloat16: launch<__nv_bfloat16, at::BFloat16>(x, positions, freq, attention_scaling, out); break;
    case at::kHalf: launch<__half, at::Half>(x, positions, freq, attention_scaling, out); break;
    default: TORCH_CHECK(false, "rope_apply: unsupported x dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) { m.impl("rope_apply", &rope_apply_cuda); }

}  // namespace mplus_fast
