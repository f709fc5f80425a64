// Device code of retrieval_topk (torch-free: raw pointers, strides, cudaStream_t).
//
// retrieval_scores_kernel: out[b, j] = inv_count[b] * sum_i w[b, i] * sigmoid(q[b, i] · key_j),
// with key_j = keys[j] for j < M, extra[j - M] otherwise; w = mask (1 when no mask).
// One block owns a tile of 64 keys and sweeps all queries in tiles of 64, so the score tile lives
// only in registers (4 x 4 per thread) and each column sum is reduced in shared memory once at
// the end: the n x (M + E) matrix is never written, no atomics. Inputs are converted to float32
// on load and accumulated in float32 (CUDA cores, not tensor cores: simple and exact to the
// reference's float32 GEMM; a tensor-core (bf16 MMA) variant is the known next step).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mplus_fast::retrieval_kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

constexpr int kTileKeys = 64, kTileQueries = 64, kTileS = 32, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
retrieval_scores_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sn, int n, int s,
                        const T* __restrict__ keys, int64_t k_s0, int64_t M,
                        const T* __restrict__ extra, int64_t e_s0, int64_t E,
                        const bool* __restrict__ mask, int64_t m_sb, int64_t m_sn,
                        const float* __restrict__ inv_count, float* __restrict__ out) {
  __shared__ float qs[kTileS][kTileQueries + 1];  // transposed tiles, padded against bank conflicts
  __shared__ float ks[kTileS][kTileKeys + 1];
  __shared__ float wq[kTileQueries];
  __shared__ float red[kThreads / 16][kTileKeys];
  const int b = blockIdx.y;
  const int64_t total = M + E, j0 = int64_t(blockIdx.x) * kTileKeys;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float colsum[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i0 = 0; i0 < n; i0 += kTileQueries) {
    if (threadIdx.x < kTileQueries) {
      const int i = i0 + threadIdx.x;
      float w = 0.f;
      if (i < n) w = mask == nullptr ? 1.f : (mask[b * m_sb + i * m_sn] ? 1.f : 0.f);
      wq[threadIdx.x] = w;
    }
    float acc[4][4] = {};
    for (int c0 = 0; c0 < s; c0 += kTileS) {
      for (int e = threadIdx.x; e < kTileQueries * kTileS; e += kThreads) {
        const int r = e / kTileS, c = e % kTileS, i = i0 + r, cc = c0 + c;
        qs[c][r] = (i < n && cc < s) ? to_float(q[b * q_sb + int64_t(i) * q_sn + cc]) : 0.f;
      }
      for (int e = threadIdx.x; e < kTileKeys * kTileS; e += kThreads) {
        const int r = e / kTileS, c = e % kTileS, cc = c0 + c;
        const int64_t j = j0 + r;
        const T* row = j < M ? keys + j * k_s0 : (j < total ? extra + (j - M) * e_s0 : nullptr);
        ks[c][r] = (row != nullptr && cc < s) ? to_float(row[cc]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kTileS; ++c) {
        float a[4], k4[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          a[t] = qs[c][ty * 4 + t];
          k4[t] = ks[c][tx * 4 + t];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(a[u], k4[v], acc[u][v]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w = wq[ty * 4 + u];
#pragma unroll
      for (int v = 0; v < 4; ++v) colsum[v] += w / (1.f + __expf(-acc[u][v]));
    }
    __syncthreads();  // wq is rewritten by the next query tile
  }
#pragma unroll
  for (int v = 0; v < 4; ++v) red[ty][tx * 4 + v] = colsum[v];
  __syncthreads();
  if (threadIdx.x < kTileKeys) {
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < kThreads / 16; ++t) sum += red[t][threadIdx.x];
    const int64_t j = j0 + threadIdx.x;
    if (j < total) out[b * total + j] = sum * inv_count[b];
  }
}

// q: (B, n, s) with unit stride on s; keys (M, s), extra (E, s) likewise (extra may be null when
// E == 0); mask (B, n) bool or null; inv_count (B): 1 / #unmasked queries (0 when none);
// out (B, M + E) float32, contiguous.
template <typename T>
inline cudaError_t launch_retrieval_scores(const T* q, int64_t q_sb, int64_t q_sn, int B, int n, int s,
                                           const T* keys, int64_t k_s0, int64_t M, const T* extra, int64_t e_s0,
                                           int64_t E, const bool* mask, int64_t m_sb, int64_t m_sn,
                                           const float* inv_count, float* out, cudaStream_t stream) {
  const int64_t total = M + E;
  if (B == 0 || total == 0) return cudaSuccess;
  dim3 grid(unsigned((total + kTileKeys - 1) / kTileKeys), unsigned(B));
  retrieval_scores_kernel<T><<<grid, kThreads, 0, stream>>>(q, q_sb, q_sn, n, s, keys, k_s0, M, extra, e_s0, E,
                                                             mask, m_sb, m_sn, inv_count, out);
  return cudaGetLastError();
}

}  // namespace mplus_fast::retrieval_kernels
