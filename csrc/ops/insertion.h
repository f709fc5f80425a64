// stm_update_: what the CPU glue (insertion.cpp) shares with the CUDA glue (insertion_cuda.cu):
// the one set of argument checks and the preparation of the inputs.
#pragma once
#include <ATen/core/Tensor.h>

namespace mplus_fast {

// Checks every argument (shapes, dtypes, devices, index ranges) before anything is written;
// returns drop sorted per layer.
at::Tensor stm_update_check_args(const at::Tensor& pool, const at::Tensor& order, const at::Tensor& drop,
                                 const at::Tensor& new_rows);

// Rows of a 2-D/3-D tensor must be contiguous for the raw copies; copy only if they are not.
at::Tensor unit_last_stride(const at::Tensor& t);

}  // namespace mplus_fast
