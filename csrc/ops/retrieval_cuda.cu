// retrieval_topk, CUDA glue: checks (shared with the CPU kernel), the fused scoring kernel
// (csrc/kernels/retrieval.cuh: tensor cores for bf16/fp16) then the top-k selection
// (csrc/kernels/topk.cuh: radix select + stable compaction, no sort; ties to the lower index,
// indices ascending), both on the current stream.
// Per-operator ATen headers (not ATen/ATen.h, nor ATen/cuda/CUDAContext.h with cuBLAS): ~4x faster
// to compile, which the nvcc check in CI pays for every .cu file.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/retrieval.cuh"
#include "kernels/topk.cuh"

namespace mplus_fast {

// csrc/ops/retrieval.cpp
void retrieval_check_args(const at::Tensor& queries, const at::Tensor& keys,
                          const std::optional<at::Tensor>& extra_keys, int64_t k,
                          const std::optional<at::Tensor>& query_mask);
std::tuple<at::Tensor, at::Tensor> retrieval_cyclic(int64_t batch, int64_t m, int64_t k,
                                                    const at::TensorOptions& opts);

namespace {
at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& extra, const at::Tensor& mask,
            const at::Tensor& count, at::Tensor& scores) {
  retrieval_kernels::ScoreArgs<T> a{};
  a.q = reinterpret_cast<const T*>(q.data_ptr());
  a.q_sb = q.stride(0);
  a.q_sn = q.stride(1);
  a.n = int(q.size(1));
  a.s = int(q.size(2));
  a.keys = reinterpret_cast<const T*>(keys.data_ptr());
  a.k_s0 = keys.stride(0);
  a.M = keys.size(0);
  if (extra.defined()) {
    a.extra = reinterpret_cast<const T*>(extra.data_ptr());
    a.e_s0 = extra.stride(0);
    a.E = extra.size(0);
  }
  if (mask.defined()) {
    a.mask = mask.data_ptr<bool>();
    a.m_sb = mask.stride(0);
    a.m_sn = mask.stride(1);
  }
  a.count = count.data_ptr<float>();
  a.out = scores.data_ptr<float>();
  auto err = retrieval_kernels::launch_retrieval_scores<T>(a, int(q.size(0)), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "retrieval_topk: kernel launch failed: ", cudaGetErrorString(err));
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> retrieval_topk_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                                       const std::optional<at::Tensor>& extra_keys, int64_t k,
                                                       const std::optional<at::Tensor>& query_mask) {
  retrieval_check_args(queries, keys, extra_keys, k, query_mask);
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), n = queries.size(1), M = keys.size(0);
  if (M < k) return retrieval_cyclic(B, M, k, queries.options());
  const int64_t E = extra_keys.has_value() ? extra_keys->size(0) : 0;
  auto q = unit_last(queries);
  auto kk = unit_last(keys);
  auto ex = E > 0 ? unit_last(*extra_keys) : at::Tensor();
  TORCH_CHECK(B <= 65535, "retrieval_topk: at most 65535 batch rows on CUDA, got queries ", queries.sizes());
  at::Tensor mask, count;
  auto fopts = queries.options().dtype(at::kFloat);
  if (query_mask.has_value()) {
    mask = *query_mask;
    count = mask.sum(1).to(at::kFloat).contiguous();
  } else {
    count = at::full({B}, double(n), fopts);
  }
  auto scores = at::empty({B, M + E}, fopts);
  int passes = topk::passes_for_mantissa(23);  // the radix passes that pin a score of this dtype
  switch (queries.scalar_type()) {
    case at::kFloat: launch<float>(q, kk, ex, mask, count, scores); break;
    case at::kHalf: launch<__half>(q, kk, ex, mask, count, scores); passes = topk::passes_for_mantissa(10); break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(q, kk, ex, mask, count, scores);
      passes = topk::passes_for_mantissa(7);
      break;
    default: TORCH_CHECK(false, "retrieval_topk: unsupported dtype ", queries.scalar_type());
  }
  auto indices = at::empty({B, k}, queries.options().dtype(at::kLong));
  auto values = at::empty({B, k}, fopts);
  auto err = topk::launch_select_topk(scores.const_data_ptr<float>(), M + E, B, M + E, k, passes,
                                      indices.data_ptr<int64_t>(), values.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "retrieval_topk: top-k kernel launch failed: ", cudaGetErrorString(err));
  return {indices, values};
}

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) { m.impl("retrieval_topk", &retrieval_topk_cuda); }

}  // namespace mplus_fast
