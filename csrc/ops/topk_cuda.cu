// mplus_fast::topk_ascending, CUDA glue: checks (shared with the CPU kernel), one selection
// block per row (csrc/kernels/topk.cuh) on the current stream.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/topk.cuh"
#include "ops/topk.h"

namespace mplus_fast {

namespace {
std::tuple<at::Tensor, at::Tensor> topk_ascending_cuda(const at::Tensor& scores_in, int64_t k) {
  topk_check_args(scores_in, k);
  c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.stride(1) == 1 ? scores_in : scores_in.contiguous();
  const int64_t B = scores.size(0), n = scores.size(1);
  auto idx = at::empty({B, k}, scores.options().dtype(at::kLong));
  auto val = at::empty({B, k}, scores.options());
  auto err = topk::launch_select_topk(scores.const_data_ptr<float>(), scores.stride(0), B, n, k,
                                      topk::passes_for_mantissa(23), idx.data_ptr<int64_t>(), val.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "topk_ascending: kernel launch failed: ", cudaGetErrorString(err));
  return {idx, val};
}
}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) { m.impl("topk_ascending", &topk_ascending_cuda); }

}  // namespace mplus_fast
