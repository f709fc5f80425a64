// Shared argument checks of mplus_fast::gather_rows / gather_rows_out, used by the CPU kernel
// (gather.cpp) and the CUDA glue (gather_cuda.cu), so every check is written once.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mplus_fast::gather {

// dtype / dims checks (reads no data). Returns the output shape: index.shape + bank.shape[1:].
std::vector<int64_t> check_args(const at::Tensor& bank, const at::Tensor& index);
// `out` must have the bank's dtype and the output shape.
void check_out(const at::Tensor& out, const std::vector<int64_t>& shape, const at::Tensor& bank);
// Range check of a CPU int64 index: raises IndexError naming the first bad value and its position.
void check_range_cpu(const at::Tensor& index, const at::Tensor& bank);
// Bytes of one bank row (the flattened trailing dims).
int64_t row_bytes(const at::Tensor& bank);
// True when each bank row is contiguous (any stride between rows is fine).
bool rows_contiguous(const at::Tensor& bank);

}  // namespace mplus_fast::gather
