// Torch-free CUDA device code of mplus_fast::rope_apply (raw pointers, strides, cudaStream_t).
//
// Design: one thread block per (batch, row). The row's cos/sin (HF semantics: float32 angle,
// cos * scaling, rounded to the element type) go to shared memory once, then the block's threads
// sweep every (head, pair) of that row. Products and sums use __fmul_rn/__fadd_rn (no FMA
// contraction) and are rounded to the element type like eager PyTorch's separate mul/add kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mplus_fast::kernels {

template <typename T> struct RopeElem;
template <> struct RopeElem<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct RopeElem<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct RopeElem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float rope_round(float v) {
  return RopeElem<T>::to_f(RopeElem<T>::from_f(v));
}

template <typename T>
__global__ void rope_apply_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxh, int64_t sxs, int64_t sxd,
                                  const int64_t* __restrict__ pos, int64_t spb, int64_t sps,
                                  const float* __restrict__ inv_freq, float scaling, T* __restrict__ out,
                                  int64_t H, int64_t S, int64_t half) {
  extern __shared__ float cs[];  // [cos(half) | sin(half)]
  const int64_t row = blockIdx.x;
  const int64_t b = row / S, t = row % S;
  const float p = static_cast<float>(pos[b * spb + t * sps]);
  for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
    const float a = __fmul_rn(p, inv_freq[j]);
    cs[j] = rope_round<T>(__fmul_rn(cosf(a), scaling));
    cs[half + j] = rope_round<T>(__fmul_rn(sinf(a), scaling));
  }
  __syncthreads();
  const int64_t D = 2 * half;
  for (int64_t k = threadIdx.x; k < H * half; k += blockDim.x) {
    const int64_t h = k / half, j = k % half;
    const T* xr = x + b * sxb + h * sxh + t * sxs;
    const float x1 = RopeElem<T>::to_f(xr[j * sxd]);
    const float x2 = RopeElem<T>::to_f(xr[(j + half) * sxd]);
    const float c = cs[j], s = cs[half + j];
    T* o = out + ((b * H + h) * S + t) * D;
    o[j] = RopeElem<T>::from_f(__fadd_rn(rope_round<T>(__fmul_rn(x1, c)), rope_round<T>(__fmul_rn(-x2, s))));
    o[j + half] = RopeElem<T>::from_f(__fadd_rn(rope_round<T>(__fmul_rn(x2, c)), rope_round<T>(__fmul_rn(x1, s))));
  }
}

// out: contiguous (B, H, S, 2*half). Launches on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t launch_rope_apply(const T* x, int64_t sxb, int64_t sxh, int64_t sxs, int64_t sxd, const int64_t* pos,
                              int64_t spb, int64_t sps, const float* inv_freq, float scaling, T* out, int64_t B,
                              int64_t H, int64_t S, int64_t half, cudaStream_t stream) {
  if (B * S == 0 || H * half == 0) return cudaSuccess;
  int threads = 128;
  while (threads < 512 && threads < H * half) threads *= 2;
  const size_t smem = 2 * half * sizeof(float);
  rope_apply_kernel<T><<<static_cast<unsigned>(B * S), threads, smem, stream>>>(
      x, sxb, sxh, sxs, sxd, pos, spb, sps, inv_freq, scaling, out, H, S, half);
  return cudaGetLastError();
}

}  // namespace mplus_fast::kernels
