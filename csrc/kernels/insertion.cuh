// Device code of stm_update_ (torch-free: raw pointers, strides, cudaStream_t).
//
// stm_new_order_kernel: one thread per (layer, logical position i). With the dropped positions
// sorted (T per layer), p = #dropped < i (binary search): a kept position moves to i - p, a
// dropped one (the p-th) hands its slot to new token p, which goes to N - T + p. O(N log T), no
// scan, no atomics; writes a fresh order (reading and writing one array in parallel would race).
// stm_write_rows_kernel: one block per destination row, threads over d; row copies are by
// element size only (dtype-agnostic).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace mplus_fast::insertion_kernels {

// order, sorted_drop, slots, next: contiguous (L, N), (L, T), (L, T), (L, N).
__global__ void stm_new_order_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ sorted_drop,
                                     int64_t* __restrict__ slots, int64_t* __restrict__ next, int64_t N, int64_t T) {
  const int64_t l = blockIdx.y, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t* sd = sorted_drop + l * T;
  int64_t lo = 0, hi = T;  // lower_bound(sd, i)
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sd[mid] < i) lo = mid + 1; else hi = mid;
  }
  const int64_t slot = order[l * N + i];
  if (lo < T && sd[lo] == i) {
    slots[l * T + lo] = slot;
    next[l * N + (N - T) + lo] = slot;
  } else {
    next[l * N + (i - lo)] = slot;
  }
}

// pool[l, slots[l, j], :] = rows[l, j, :]; V is any type of the element's size.
template <typename V>
__global__ void stm_write_rows_kernel(V* __restrict__ pool, int64_t p_s0, int64_t p_s1, const V* __restrict__ rows,
                                      int64_t r_s0, int64_t r_s1, const int64_t* __restrict__ slots, int64_t T,
                                      int64_t d) {
  const int64_t row = blockIdx.x, l = row / T, j = row % T;
  V* dst = pool + l * p_s0 + slots[row] * p_s1;
  const V* src = rows + l * r_s0 + j * r_s1;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

inline int row_threads(int64_t d) { return d >= 1024 ? 256 : (d >= 256 ? 128 : 64); }

inline cudaError_t launch_stm_update(int64_t L, int64_t N, int64_t T, const int64_t* order, const int64_t* sorted_drop,
                                     int64_t* slots, int64_t* next, cudaStream_t stream) {
  if (L == 0 || N == 0 || T == 0) return cudaSuccess;
  dim3 grid(unsigned((N + 255) / 256), unsigned(L));
  stm_new_order_kernel<<<grid, 256, 0, stream>>>(order, sorted_drop, slots, next, N, T);
  return cudaGetLastError();
}

template <typename V>
inline cudaError_t launch_stm_write_rows(V* pool, int64_t p_s0, int64_t p_s1, const V* rows, int64_t r_s0,
                                         int64_t r_s1, const int64_t* slots, int64_t L, int64_t T, int64_t d,
                                         cudaStream_t stream) {
  if (L * T == 0 || d == 0) return cudaSuccess;
  stm_write_rows_kernel<V><<<unsigned(L * T), row_threads(d), 0, stream>>>(pool, p_s0, p_s1, rows, r_s0, r_s1, slots,
                                                                           T, d);
  return cudaGetLastError();
}

}  // namespace mplus_fast::insertion_kernels
