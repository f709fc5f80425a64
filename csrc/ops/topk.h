// Top-k rows on the CPU (csrc/ops/topk.cpp), shared by mplus_fast::topk_ascending and the
// retrieval_topk CPU kernel: both select with the one algorithm of csrc/kernels/topk_select.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mplus_fast {

// Argument checks of topk_ascending (CPU and CUDA glue): scores (B, n) float32, 0 <= k <= n.
void topk_check_args(const at::Tensor& scores, int64_t k);

// indices (B, k) int64 ascending and values (B, k) float32 of the k largest of each row of
// `scores` (B, n) float32 contiguous CPU (ties: lower index; NaN as -inf). `passes`: radix
// passes (topk::passes_for_mantissa of the dtype the scores were rounded to; 4 for float32).
std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& scores, int64_t k, int passes);

}  // namespace mplus_fast
