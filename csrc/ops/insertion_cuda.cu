// stm_update_ and assemble_rows, CUDA glue: the checks shared with the CPU kernels (one
// device->host sync for the index checks), then the kernels of csrc/kernels/insertion.cuh on the
// current stream.
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

void assemble_rows_cuda(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                        const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                        const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                        const std::optional<at::Tensor>& pos_emb, int64_t pos_emb_rows, at::Tensor& out) {
  assemble_rows_check_args(bos, bank, bank_index, stm, stm_order, new_, pos_emb, pos_emb_rows, out);
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t B = out.size(0), rows = out.size(1), d = out.size(2);
  const auto in = assemble_inputs(bos, bank, bank_index, stm, stm_order, new_, pos_emb);
  ik::AssembleArgs a{};
  a.bos = in.bos.data_ptr();
  if (bank.has_value()) {
    a.bank = in.bank.data_ptr(); a.bank_s0 = in.bank.stride(0);
    a.bank_index = in.bank_index.data_ptr<int64_t>(); a.R = in.bank_index.size(1);
  }
  a.stm = in.stm.data_ptr(); a.stm_s0 = in.stm.size(0) > 0 ? in.stm.stride(0) : 0; a.N = in.stm.size(0);
  a.stm_order = stm_order.has_value() ? in.stm_order.data_ptr<int64_t>() : nullptr;
  if (new_.has_value()) { a.new_rows = in.new_rows.data_ptr(); a.new_s0 = in.new_rows.stride(0); a.new_s1 = in.new_rows.stride(1); }
  a.pos_emb = pos_emb.has_value() ? in.pos_emb.data_ptr() : nullptr;
  a.first_pe = rows - pos_emb_rows;
  a.out = out.data_ptr(); a.out_s0 = out.stride(0); a.out_s1 = out.stride(1); a.rows = rows; a.d = d;
  auto stream = c10::cuda::getCurrentCUDAStream();
  switch (out.scalar_type()) {
    case at::kFloat: check(ik::launch_assemble_rows<float>(a, B, stream), "assemble_rows"); break;
    case at::kHalf: check(ik::launch_assemble_rows<__half>(a, B, stream), "assemble_rows"); break;
    case at::kBFloat16: check(ik::launch_assemble_rows<__nv_bfloat16>(a, B, stream), "assemble_rows"); break;
    default: TORCH_CHECK(false, "assemble_rows: unsupported dtype ", out.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) {
  m.impl("stm_update_", &stm_update_cuda);
  m.impl("assemble_rows", &assemble_rows_cuda);
}

}  // namespace mplus_fast
