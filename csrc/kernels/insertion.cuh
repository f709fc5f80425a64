// Device code of stm_update_ and assemble_rows (torch-free: raw pointers, strides, cudaStream_t).
//
// stm_new_order_kernel: one thread per (layer, logical position i). With the dropped positions
// sorted (T per layer), p = #dropped < i (binary search): a kept position moves to i - p, a
// dropped one (the p-th) hands its slot to new token p, which goes to N - T + p. O(N log T), no
// scan, no atomics; writes a fresh order (reading and writing one array in parallel would race).
// stm_write_rows_kernel / assemble_rows_kernel: one block per destination row, threads over d.
// Row copies are by element size only (dtype-agnostic); the positional-embedding add converts
// to float32 and rounds once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mplus_fast::insertion_kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

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

struct AssembleArgs {
  const void* bos;
  const void* bank; int64_t bank_s0; const int64_t* bank_index; int64_t R;  // bank_index (B, R) contiguous
  const void* stm; int64_t stm_s0; const int64_t* stm_order; int64_t N;     // stm_order may be null
  const void* new_rows; int64_t new_s0, new_s1;                              // may be null
  const void* pos_emb; int64_t first_pe;                                     // rows >= first_pe get pos_emb
  void* out; int64_t out_s0, out_s1, rows, d;
};

template <typename T>
__global__ void assemble_rows_kernel(AssembleArgs a) {
  const int64_t r = blockIdx.x, b = blockIdx.y;
  const T* src;
  if (r == 0) {
    src = static_cast<const T*>(a.bos);
  } else if (r <= a.R) {
    src = static_cast<const T*>(a.bank) + a.bank_index[b * a.R + (r - 1)] * a.bank_s0;
  } else if (r <= a.R + a.N) {
    const int64_t i = r - 1 - a.R;
    src = static_cast<const T*>(a.stm) + (a.stm_order ? a.stm_order[i] : i) * a.stm_s0;
  } else {
    src = static_cast<const T*>(a.new_rows) + b * a.new_s0 + (r - 1 - a.R - a.N) * a.new_s1;
  }
  T* dst = static_cast<T*>(a.out) + b * a.out_s0 + r * a.out_s1;
  const T* pe = static_cast<const T*>(a.pos_emb);
  if (r >= a.first_pe) {
    for (int64_t c = threadIdx.x; c < a.d; c += blockDim.x) dst[c] = from_float<T>(to_float(src[c]) + to_float(pe[c]));
  } else {
    for (int64_t c = threadIdx.x; c < a.d; c += blockDim.x) dst[c] = src[c];
  }
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

template <typename T>
inline cudaError_t launch_assemble_rows(const AssembleArgs& a, int64_t B, cudaStream_t stream) {
  if (B == 0 || a.rows == 0 || a.d == 0) return cudaSuccess;
  assemble_rows_kernel<T><<<dim3(unsigned(a.rows), unsigned(B)), row_threads(a.d), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mplus_fast::insertion_kernels
