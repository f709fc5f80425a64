// Device code of retrieval_topk's scoring (torch-free: raw pointers, strides, cudaStream_t).
//
// out[b, j] = mean over the unmasked queries i of sigmoid(q[b, i] · key_j), key_j = keys[j] for
// j < M, extra[j - M] otherwise, rounded as SPEC §10 says for the input dtype T: float32 stays
// float32; bf16/fp16 round the float32 dot product to T, the sigmoid to T, and the float32 sum
// divided by the count to T (`score_term`, `score_mean`). The n x (M + E) matrix is never
// written and no atomics are used: a block owns a tile of keys, sweeps every query tile, and
// reduces its column sums once at the end. Two kernels:
//
//  * retrieval_scores_mma_kernel (bf16/fp16, s <= kMmaMaxS): tensor cores through WMMA
//    (16x16x16, float32 accumulation). A block of 8 warps owns 128 keys, loaded ONCE into
//    shared memory with the whole selector width, and streams the queries through in tiles of
//    64; each warp computes a 32 x 32 tile (2 x 2 fragments) per query tile, stages it in its
//    own shared-memory slab, and its lanes apply the epilogue column by column (lane = key), so
//    the fragment layout never matters. Shared memory at s = 256: 135 KB (one block per SM).
//    At the released geometry (512 x 153,600 x 256 per layer) that is 1,200 blocks, each
//    reading the 256 KB of queries from L2 (307 MB of L2 traffic, ~55 us at ~5.5 TB/s) for
//    40 GFLOP of MMA; see docs/fast_engine.md for the FLOP/byte model. Not tuned on hardware:
//    the query tiles are loaded synchronously (no cp.async double buffering, no wgmma).
//  * retrieval_scores_kernel (float32, and any dtype wider than kMmaMaxS): CUDA cores, inputs
//    converted to float32 on load, 64 keys x 64 queries per step in registers (4 x 4 per thread).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace mplus_fast::retrieval_kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T zero();
template <>
__device__ __forceinline__ __half zero<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// x rounded to T's precision (round to nearest even), as float; identity for float.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__float2half_rn(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(__float2bfloat16_rn(x));
  else return x;
}

// One query's contribution sigmoid(q · key) from the float32 dot product, rounded as in T.
// Low precision uses the accurate expf (torch's CUDA sigmoid for bf16/fp16 is 1 / (1 + expf(-x))
// in float32); float32 keeps the fast __expf of the previous kernel.
template <typename T>
__device__ __forceinline__ float score_term(float dot) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.f / (1.f + __expf(-dot));
  } else {
    const float x = round_to<T>(dot);
    return round_to<T>(1.f / (1.f + expf(-x)));
  }
}

// The mean from the float32 sum of the terms: divided by the count, rounded once (0 for no query).
template <typename T>
__device__ __forceinline__ float score_mean(float sum, float count) {
  return count > 0.f ? round_to<T>(sum / count) : 0.f;
}

// What both scoring kernels read and write. q: (B, n, s) with unit stride on s; keys (M, s),
// extra (E, s) likewise (extra may be null when E == 0); mask (B, n) bool or null; count (B):
// unmasked queries per row; out (B, M + E) float32, contiguous.
template <typename T>
struct ScoreArgs {
  const T* q;
  int64_t q_sb, q_sn;
  int n, s;
  const T* keys;
  int64_t k_s0, M;
  const T* extra;
  int64_t e_s0, E;
  const bool* mask;
  int64_t m_sb, m_sn;
  const float* count;
  float* out;
};

// ----------------------------------------------------------------------------------- CUDA cores
constexpr int kTileKeys = 64, kTileQueries = 64, kTileS = 32, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
retrieval_scores_kernel(const ScoreArgs<T> a) {
  __shared__ float qs[kTileS][kTileQueries + 1];  // transposed tiles, padded against bank conflicts
  __shared__ float ks[kTileS][kTileKeys + 1];
  __shared__ float wq[kTileQueries];
  __shared__ float red[kThreads / 16][kTileKeys];
  const int b = blockIdx.y;
  const int64_t total = a.M + a.E, j0 = int64_t(blockIdx.x) * kTileKeys;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float colsum[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i0 = 0; i0 < a.n; i0 += kTileQueries) {
    if (threadIdx.x < kTileQueries) {
      const int i = i0 + threadIdx.x;
      float w = 0.f;
      if (i < a.n) w = a.mask == nullptr ? 1.f : (a.mask[b * a.m_sb + i * a.m_sn] ? 1.f : 0.f);
      wq[threadIdx.x] = w;
    }
    float acc[4][4] = {};
    for (int c0 = 0; c0 < a.s; c0 += kTileS) {
      for (int e = threadIdx.x; e < kTileQueries * kTileS; e += kThreads) {
        const int r = e / kTileS, c = e % kTileS, i = i0 + r, cc = c0 + c;
        qs[c][r] = (i < a.n && cc < a.s) ? to_float(a.q[b * a.q_sb + int64_t(i) * a.q_sn + cc]) : 0.f;
      }
      for (int e = threadIdx.x; e < kTileKeys * kTileS; e += kThreads) {
        const int r = e / kTileS, c = e % kTileS, cc = c0 + c;
        const int64_t j = j0 + r;
        const T* row = j < a.M ? a.keys + j * a.k_s0 : (j < total ? a.extra + (j - a.M) * a.e_s0 : nullptr);
        ks[c][r] = (row != nullptr && cc < a.s) ? to_float(row[cc]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kTileS; ++c) {
        float qv[4], k4[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          qv[t] = qs[c][ty * 4 + t];
          k4[t] = ks[c][tx * 4 + t];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(qv[u], k4[v], acc[u][v]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (wq[ty * 4 + u] == 0.f) continue;
#pragma unroll
      for (int v = 0; v < 4; ++v) colsum[v] += score_term<T>(acc[u][v]);
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
    if (j < total) a.out[b * total + j] = score_mean<T>(sum, a.count[b]);
  }
}

// --------------------------------------------------------------------------------- tensor cores
constexpr int kMmaKeys = 128, kMmaQueries = 64, kMmaWarps = 8, kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaWarpCols = kMmaKeys / 32;  // warps per row of the block tile (4 x 2 warps of 32 x 32)
constexpr int kStageLd = 32 + 4;             // floats per staged row (a multiple of 4, as WMMA needs)
constexpr int kMmaMaxS = 496;                // the widest selector whose tiles fit in 227 KB

// Elements per shared-memory row of a tile: s rounded up to the MMA depth (16), + 8 (16 bytes)
// so that rows do not start on the same bank; a multiple of 8 as WMMA needs for 16-bit types.
__host__ __device__ constexpr int mma_ld(int s) { return (s + 15) / 16 * 16 + 8; }
__host__ __device__ constexpr int64_t mma_smem_bytes(int s) {
  return int64_t(kMmaKeys + kMmaQueries) * mma_ld(s) * 2 + int64_t(kMmaWarps) * 32 * kStageLd * 4 +
         kMmaQueries * 4;
}

// rows x round_up(s, 16) elements into dst (row stride ld), zero beyond s and for rows whose
// source is null. vec: 16-byte loads (s % 8 == 0, every source row 16-byte aligned).
template <typename T, typename RowFn>
__device__ __forceinline__ void load_tile(T* dst, int ld, int rows, int s, bool vec, RowFn row_of) {
  const int sp = (s + 15) / 16 * 16;
  if (vec) {
    const int per_row = sp / 8;
    for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
      const int r = e / per_row, c = (e % per_row) * 8;
      const T* src = row_of(r);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (src != nullptr && c < s) v = *reinterpret_cast<const uint4*>(src + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int e = threadIdx.x; e < rows * sp; e += blockDim.x) {
      const int r = e / sp, c = e % sp;
      const T* src = row_of(r);
      dst[r * ld + c] = (src != nullptr && c < s) ? src[c] : zero<T>();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
retrieval_scores_mma_kernel(const ScoreArgs<T> a, bool vec_q, bool vec_k) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ld = mma_ld(a.s), sp = (a.s + 15) / 16 * 16;
  T* ks = reinterpret_cast<T*>(smem);                           // [kMmaKeys][ld]: the block's keys
  T* qs = ks + kMmaKeys * ld;                                   // [kMmaQueries][ld]: one query tile
  float* stage = reinterpret_cast<float*>(qs + kMmaQueries * ld);  // [warps][32][kStageLd]
  float* wq = stage + kMmaWarps * 32 * kStageLd;                 // [kMmaQueries]: 1 = counted query
  const int b = blockIdx.y;
  const int64_t total = a.M + a.E, j0 = int64_t(blockIdx.x) * kMmaKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / kMmaWarpCols, wc = warp % kMmaWarpCols;  // queries wr*32.., keys wc*32..
  float* st = stage + warp * 32 * kStageLd;

  load_tile<T>(ks, ld, kMmaKeys, a.s, vec_k, [&](int r) -> const T* {
    const int64_t j = j0 + r;
    return j < a.M ? a.keys + j * a.k_s0 : (j < total ? a.extra + (j - a.M) * a.e_s0 : nullptr);
  });
  float colsum = 0.f;  // this lane's key column (wc*32 + lane), over the warp's query rows
  for (int i0 = 0; i0 < a.n; i0 += kMmaQueries) {
    __syncthreads();  // nobody reads the previous query tile any more (the first: keys are in)
    load_tile<T>(qs, ld, kMmaQueries, a.s, vec_q, [&](int r) -> const T* {
      const int i = i0 + r;
      return i < a.n ? a.q + b * a.q_sb + int64_t(i) * a.q_sn : nullptr;
    });
    if (threadIdx.x < kMmaQueries) {
      const int i = i0 + threadIdx.x;
      wq[threadIdx.x] = (i < a.n && (a.mask == nullptr || a.mask[b * a.m_sb + int64_t(i) * a.m_sn])) ? 1.f : 0.f;
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int v = 0; v < 2; ++v) wmma::fill_fragment(acc[u][v], 0.f);
    for (int k0 = 0; k0 < sp; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk[2];  // B[k][j] = key_j[k]
#pragma unroll
      for (int u = 0; u < 2; ++u) wmma::load_matrix_sync(qf[u], qs + (wr * 32 + 16 * u) * ld + k0, ld);
#pragma unroll
      for (int v = 0; v < 2; ++v) wmma::load_matrix_sync(bk[v], ks + (wc * 32 + 16 * v) * ld + k0, ld);
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int v = 0; v < 2; ++v) wmma::mma_sync(acc[u][v], qf[u], bk[v], acc[u][v]);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int v = 0; v < 2; ++v)
        wmma::store_matrix_sync(st + 16 * u * kStageLd + 16 * v, acc[u][v], kStageLd, wmma::mem_row_major);
    __syncwarp();
    for (int r = 0; r < 32; ++r)
      if (wq[wr * 32 + r] != 0.f) colsum += score_term<T>(st[r * kStageLd + lane]);
    __syncwarp();  // the slab is rewritten by the next query tile
  }
  __syncthreads();
  float* red = stage;  // [2 row groups][kMmaKeys]; every warp is past its epilogue
  red[wr * kMmaKeys + wc * 32 + lane] = colsum;
  __syncthreads();
  if (threadIdx.x < kMmaKeys) {
    const int64_t j = j0 + threadIdx.x;
    if (j < total) a.out[b * total + j] = score_mean<T>(red[threadIdx.x] + red[kMmaKeys + threadIdx.x], a.count[b]);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// B <= 65535 rows (the grid's y).
template <typename T>
inline cudaError_t launch_retrieval_scores(const ScoreArgs<T>& a, int B, cudaStream_t stream) {
  const int64_t total = a.M + a.E;
  if (B == 0 || total == 0) return cudaSuccess;
  if constexpr (!std::is_same_v<T, float>) {
    if (a.s >= 1 && a.s <= kMmaMaxS) {
      const bool vec_q = a.s % 8 == 0 && a.q_sn % 8 == 0 && a.q_sb % 8 == 0 && aligned16(a.q);
      const bool vec_k = a.s % 8 == 0 && a.k_s0 % 8 == 0 && aligned16(a.keys) &&
                         (a.E == 0 || (a.e_s0 % 8 == 0 && aligned16(a.extra)));
      const int64_t smem = mma_smem_bytes(a.s);
      auto kernel = retrieval_scores_mma_kernel<T>;
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      dim3 grid(unsigned((total + kMmaKeys - 1) / kMmaKeys), unsigned(B));
      kernel<<<grid, kMmaThreads, size_t(smem), stream>>>(a, vec_q, vec_k);
      return cudaGetLastError();
    }
  }
  dim3 grid(unsigned((total + kTileKeys - 1) / kTileKeys), unsigned(B));
  retrieval_scores_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mplus_fast::retrieval_kernels
