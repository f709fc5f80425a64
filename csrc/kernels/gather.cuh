// Row gather on the GPU: out[i, :] = bank[index[i], :] for rows of `row_bytes` opaque bytes.
//
// Torch-free device code (raw pointers, byte strides, cudaStream_t); the ATen glue is
// csrc/ops/gather_cuda.cu. The same kernel serves two sources:
//   * a device-resident bank (HBM -> HBM gather), and
//   * zero-copy: a bank in pinned host memory read through its mapped device pointer
//     (cudaHostGetDevicePointer / UVA), so rows cross PCIe once, straight into `out`, with no
//     staging buffer and no host thread. Each row is read with the widest aligned vector (16 B
//     when possible) so that many PCIe read requests are in flight per SM.
// Rows are treated as bytes, so every dtype shares one kernel (the vector width is chosen from
// the row size, the row stride and the pointers' alignment).
// Indices outside [0, M) are never dereferenced: their output row is zero-filled. The glue
// validates indices and raises before launching; this is only a second line of defence.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace mplus_fast {
namespace kernels {

struct alignas(16) GatherVec16 { uint4 v; };

template <typename Vec>
__global__ void gather_rows_kernel(const char* __restrict__ bank, int64_t bank_row_stride_bytes,
                                   int64_t num_bank_rows, const int64_t* __restrict__ index,
                                   int64_t num_rows, int64_t vecs_per_row, char* __restrict__ out) {
  // One block (or several, grid-stride) per output row; threads stride over the row's vectors.
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t src_row = index[r];
    Vec* dst = reinterpret_cast<Vec*>(out + r * vecs_per_row * static_cast<int64_t>(sizeof(Vec)));
    if (src_row < 0 || src_row >= num_bank_rows) {
      for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = Vec{};
      continue;
    }
    const Vec* src = reinterpret_cast<const Vec*>(bank + src_row * bank_row_stride_bytes);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = src[v];
  }
}

// Largest power-of-two byte width in {16, 8, 4, 2, 1} dividing every quantity given.
inline int gather_vector_width(int64_t row_bytes, int64_t bank_row_stride_bytes, const void* bank,
                               const void* out) {
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(bank_row_stride_bytes) |
                        reinterpret_cast<uintptr_t>(bank) | reinterpret_cast<uintptr_t>(out);
  for (int w = 16; w > 1; w /= 2)
    if ((bits & static_cast<uint64_t>(w - 1)) == 0) return w;
  return 1;
}

// Launch the gather on `stream`. `bank` must be device-accessible (device memory or the mapped
// device pointer of pinned host memory); `index` (num_rows int64) and `out` (num_rows * row_bytes,
// contiguous) are device memory. Returns the launch error, if any.
inline cudaError_t launch_gather_rows(const void* bank, int64_t bank_row_stride_bytes, int64_t num_bank_rows,
                                      const int64_t* index, int64_t num_rows, int64_t row_bytes, void* out,
                                      cudaStream_t stream) {
  if (num_rows == 0 || row_bytes == 0) return cudaSuccess;
  const int width = gather_vector_width(row_bytes, bank_row_stride_bytes, bank, out);
  const int64_t vecs = row_bytes / width;
  int threads = 32;
  while (threads < 256 && threads < vecs) threads *= 2;
  const int64_t max_blocks = 65535;  // grid-stride beyond this; plenty of rows per SM either way
  const unsigned blocks = static_cast<unsigned>(num_rows < max_blocks ? num_rows : max_blocks);
  const char* b = static_cast<const char*>(bank);
  char* o = static_cast<char*>(out);
  switch (width) {
    case 16: gather_rows_kernel<GatherVec16><<<blocks, threads, 0, stream>>>(b, bank_row_stride_bytes, num_bank_rows, index, num_rows, vecs, o); break;
    case 8: gather_rows_kernel<uint2><<<blocks, threads, 0, stream>>>(b, bank_row_stride_bytes, num_bank_rows, index, num_rows, vecs, o); break;
    case 4: gather_rows_kernel<uint32_t><<<blocks, threads, 0, stream>>>(b, bank_row_stride_bytes, num_bank_rows, index, num_rows, vecs, o); break;
    case 2: gather_rows_kernel<uint16_t><<<blocks, threads, 0, stream>>>(b, bank_row_stride_bytes, num_bank_rows, index, num_rows, vecs, o); break;
    default: gather_rows_kernel<uint8_t><<<blocks, threads, 0, stream>>>(b, bank_row_stride_bytes, num_bank_rows, index, num_rows, vecs, o); break;
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace mplus_fast
