// stm_update_, CUDA glue: the checks shared with the CPU kernel (one device->host sync for the
// index checks), then the kernels of csrc/kernels/insertion.cuh on the current stream.
// Per-operator ATen headers (not ATen/ATen.h): much faster to compile (see retrieval_cuda.cu).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/insertion.cuh"
#include "ops/insertion.h"

namespace mplus_fast {

namespace ik = insertion_kernels;

static void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": kernel launch failed: ", cudaGetErrorString(err));
}

void stm_update_cuda(at::Tensor& pool, at::Tensor& order, const at::Tensor& drop, const at::Tensor& new_rows) {
  auto sorted = stm_update_check_args(pool, order, drop, new_rows);
  c10::cuda::CUDAGuard guard(pool.device());
  const int64_t L = pool.size(0), N = pool.size(1), d = pool.size(2), T = drop.size(1);
  if (L == 0 || T == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto ord = order.contiguous();
  auto slots = at::empty({L, T}, order.options());
  auto next = at::empty({L, N}, order.options());
  check(ik::launch_stm_update(L, N, T, ord.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
                              next.data_ptr<int64_t>(), stream),
        "stm_update_");
  order.copy_(next);
  if (d == 0) return;
  if (pool.stride(2) != 1) {  // rare: strided rows, let ATen scatter them
    pool.index_put_({at::arange(L, order.options()).unsqueeze(1).expand({L, T}), slots}, new_rows);
    return;
  }
  auto src = unit_last_stride(new_rows);
  switch (pool.element_size()) {
    case 2:
      check(ik::launch_stm_write_rows<uint16_t>(static_cast<uint16_t*>(pool.data_ptr()), pool.stride(0), pool.stride(1),
                                                static_cast<const uint16_t*>(src.data_ptr()), src.stride(0),
                                                src.stride(1), slots.data_ptr<int64_t>(), L, T, d, stream),
            "stm_update_");
      break;
    case 4:
      check(ik::launch_stm_write_rows<uint32_t>(static_cast<uint32_t*>(pool.data_ptr()), pool.stride(0), pool.stride(1),
                                                static_cast<const uint32_t*>(src.data_ptr()), src.stride(0),
                                                src.stride(1), slots.data_ptr<int64_t>(), L, T, d, stream),
            "stm_update_");
      break;
    default: TORCH_CHECK(false, "stm_update_: unsupported element size ", pool.element_size());
  }
}

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) { m.impl("stm_update_", &stm_update_cuda); }

}  // namespace mplus_fast
