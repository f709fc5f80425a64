// Shared argument checks of mplus_fast::rope_apply (CPU kernel in rope.cpp, CUDA glue in rope_cuda.cu).
#pragma once
#include <ATen/ATen.h>

namespace mplus_fast {

// Checks x (B, H, S, D) float, positions int64 (S,) or (B, S), inv_freq float32 (D/2,), same device.
void check_rope_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);

}  // namespace mplus_fast
