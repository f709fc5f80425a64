// mplus_fast::gather_rows / gather_rows_out on CUDA: thin ATen glue over csrc/kernels/gather.cuh.
//
// Dispatched here whenever one argument is a CUDA tensor. Sources:
//   * bank on the device                 -> HBM gather kernel;
//   * bank in pinned host memory (zero-copy) -> the same kernel reads the rows through the bank's
//     mapped device pointer, over PCIe, straight into the device output: no staging buffer and no
//     host thread, but every byte crosses PCIe as small reads issued by the SMs (good for a few
//     MB, loses to one bulk cudaMemcpyAsync for large gathers; see mplus_fast/prefetch.py);
//   * a pageable CPU bank is refused (it cannot be read by the device).
// Index validation must precede any copy: a CPU index is checked on the host; a CUDA index is
// checked with one aminmax reduction and a synchronisation of the current stream (only the bad
// case copies the index back to name the offending value). Launches go on the current stream,
// under a guard for the output's device. The H2D copy path of the prefetch engine (pinned staging
// buffer -> device on a dedicated stream) is torch's cudaMemcpyAsync, driven from prefetch.py.
#include "kernels/gather.cuh"
#include "ops/gather.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mplus_fast::gather {
namespace {

at::Device target_device(const at::Tensor& bank, const at::Tensor& index) {
  return index.is_cuda() ? index.device() : bank.device();
}

// Validate the range, then return the index as a contiguous int64 tensor on `device`.
at::Tensor checked_index_on(const at::Tensor& index, const at::Tensor& bank, at::Device device) {
  if (!index.is_cuda()) {
    check_range_cpu(index, bank);
    // A pinned host index (the prefetch engine's) goes up asynchronously on the current stream.
    return index.contiguous().to(device, /*non_blocking=*/index.is_pinned());
  }
  TORCH_CHECK_VALUE(index.device() == device, "gather_rows: index is on ", index.device(),
                    " but the gather runs on ", device, " (index shape ", index.sizes(), ")");
  if (index.numel() > 0) {
    auto [lo, hi] = at::aminmax(index);  // one small reduction + one sync of the current stream
    const at::Tensor range = at::stack({lo, hi}).cpu();
    const int64_t* r = range.const_data_ptr<int64_t>();
    if (r[0] < 0 || r[1] >= bank.size(0)) check_range_cpu(index.cpu(), bank);
  }
  return index.contiguous();
}

// Device-accessible address of the bank's first row.
const void* bank_device_ptr(const at::Tensor& bank, at::Device device) {
  if (bank.is_cuda()) {
    TORCH_CHECK_VALUE(bank.device() == device, "gather_rows: bank is on ", bank.device(), " but the gather runs on ",
                      device, " (bank shape ", bank.sizes(), ")");
    return bank.const_data_ptr();
  }
  TORCH_CHECK_VALUE(bank.is_pinned(), "gather_rows: a CPU bank read from CUDA (zero-copy) must be in pinned memory; "
                    "bank of shape ", bank.sizes(), " is pageable (use bank.pin_memory(), or gather on the CPU)");
  // Map the start of the allocation, then offset: works for views into a pinned allocation.
  void* base = bank.storage().mutable_data();
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, base, 0));
  const auto offset = static_cast<const char*>(bank.const_data_ptr()) - static_cast<const char*>(base);
  return static_cast<const char*>(mapped) + offset;
}

void gather_into(const at::Tensor& bank_in, const at::Tensor& index_in, const at::Tensor& out) {
  const at::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor index = checked_index_on(index_in, bank_in, device);
  // A device bank with strided rows is compacted; a host bank cannot be (it would lose pinning).
  TORCH_CHECK_VALUE(bank_in.is_cuda() || rows_contiguous(bank_in),
                    "gather_rows: a pinned CPU bank read zero-copy must have contiguous rows, got strides ",
                    bank_in.strides(), " for bank of shape ", bank_in.sizes());
  const at::Tensor bank = rows_contiguous(bank_in) ? bank_in : bank_in.contiguous();
  const void* src = bank_device_ptr(bank, device);
  const bool direct = out.is_contiguous();
  at::Tensor dst = direct ? out : at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(kernels::launch_gather_rows(src, bank.stride(0) * bank.element_size(), bank.size(0),
                                             index.const_data_ptr<int64_t>(), index.numel(), row_bytes(bank),
                                             dst.data_ptr(), stream));
  if (!direct) out.copy_(dst);
}

at::Tensor gather_rows_cuda(const at::Tensor& bank, const at::Tensor& index) {
  const auto shape = check_args(bank, index);
  at::Tensor out = at::empty(shape, bank.options().device(target_device(bank, index)).pinned_memory(false));
  gather_into(bank, index, out);
  return out;
}

void gather_rows_out_cuda(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& out) {
  const auto shape = check_args(bank, index);
  check_out(out, shape, bank);
  TORCH_CHECK_VALUE(out.is_cuda(), "gather_rows_out (CUDA): out must be a CUDA tensor, got ", out.device(),
                    " (out shape ", out.sizes(), "); gather into host buffers on the CPU");
  gather_into(bank, index, out);
}

}  // namespace
}  // namespace mplus_fast::gather

TORCH_LIBRARY_IMPL(mplus_fast, CUDA, m) {
  m.impl("gather_rows", &mplus_fast::gather::gather_rows_cuda);
  m.impl("gather_rows_out", &mplus_fast::gather::gather_rows_out_cuda);
}
