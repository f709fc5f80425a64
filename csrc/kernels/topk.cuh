// Device code of topk_ascending (torch-free): one CUDA block per row runs the selection of
// topk_select.h, the block being the team (__syncthreads barriers, shared-memory atomics).
// Used by csrc/ops/topk_cuda.cu and, after its scoring kernel, by csrc/ops/retrieval_cuda.cu.
//
// Trade-off: one block per row keeps the passes (a histogram of one digit each, then the
// compaction) inside one kernel with block barriers, no grid-wide synchronisation and no
// launch per pass; a row of 153,600 scores (614 KB, L2-resident right after scoring) is read
// `passes` + 2 times by one SM: ~10-30 us. Many rows fill many SMs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/topk_select.h"

namespace mplus_fast::topk {

constexpr int kSelectThreads = 512;

struct BlockTeam {
  __device__ int rank() const { return int(threadIdx.x); }
  __device__ int size() const { return int(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ void add(uint64_t* at, uint64_t v) const {
    atomicAdd(reinterpret_cast<unsigned long long*>(at), static_cast<unsigned long long>(v));
  }
};

__global__ void __launch_bounds__(kSelectThreads)
select_topk_kernel(const float* __restrict__ scores, int64_t row_stride, int64_t n, int64_t k, int passes,
                   int64_t* __restrict__ out_index, float* __restrict__ out_value) {
  __shared__ uint64_t work[work_entries(kSelectThreads)];
  const BlockTeam team;
  const int64_t b = blockIdx.x;
  select_topk(team, scores + b * row_stride, n, k, passes, carve_work(work, team.size()), out_index + b * k,
              out_value + b * k);
}

// scores (B, n) float32 with unit stride along n; out_index / out_value (B, k) contiguous.
inline cudaError_t launch_select_topk(const float* scores, int64_t row_stride, int64_t B, int64_t n, int64_t k,
                                      int passes, int64_t* out_index, float* out_value, cudaStream_t stream) {
  if (B == 0 || k == 0) return cudaSuccess;
  select_topk_kernel<<<unsigned(B), kSelectThreads, 0, stream>>>(scores, row_stride, n, k, passes, out_index,
                                                                  out_value);
  return cudaGetLastError();
}

}  // namespace mplus_fast::topk
