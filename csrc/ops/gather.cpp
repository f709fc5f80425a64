// mplus_fast::gather_rows / gather_rows_out on CPU: out[i] = bank[index[i]] for rows of any
// dtype and shape (a row is the flattened trailing dims, copied as opaque bytes).
//
// Design: the index is validated completely (dtype, dims, range) before a single byte is copied;
// then rows are copied with memcpy, split over the intra-op thread pool (at::parallel_for,
// OpenMP) in chunks of ~256 KiB so small gathers stay on one thread. A gather is memory-bound:
// a few threads saturate DRAM bandwidth, and no per-element indexing arithmetic is done (that
// is what makes it faster than index_select's generic path). Called through torch.ops, the
// kernel runs with the GIL released, so the prefetch engine's worker thread overlaps with Python.
// The argument checks below are shared with the CUDA glue (gather_cuda.cu).
#include "ops/gather.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mplus_fast::gather {

std::vector<int64_t> check_args(const at::Tensor& bank, const at::Tensor& index) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "gather_rows: index must be int64, got ",
                   index.scalar_type(), " (index shape ", index.sizes(), ")");
  TORCH_CHECK_VALUE(index.dim() == 1 || index.dim() == 2,
                    "gather_rows: index must be 1-D (R,) or 2-D (B, R), got shape ", index.sizes());
  TORCH_CHECK_VALUE(bank.dim() >= 1, "gather_rows: bank must be (M, ...) with at least one dim, got shape ",
                    bank.sizes());
  std::vector<int64_t> shape(index.sizes().begin(), index.sizes().end());
  shape.insert(shape.end(), bank.sizes().begin() + 1, bank.sizes().end());
  return shape;
}

void check_out(const at::Tensor& out, const std::vector<int64_t>& shape, const at::Tensor& bank) {
  TORCH_CHECK_VALUE(out.scalar_type() == bank.scalar_type(), "gather_rows_out: out has dtype ",
                    out.scalar_type(), " but bank has dtype ", bank.scalar_type(), " (out shape ", out.sizes(),
                    ")");
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), "gather_rows_out: out must have shape ",
                    at::IntArrayRef(shape), " (index.shape + bank.shape[1:]), got ", out.sizes());
}

void check_range_cpu(const at::Tensor& index, const at::Tensor& bank) {
  const at::Tensor idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel(), m = bank.size(0);
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] >= m) {
      TORCH_CHECK_INDEX(false, "gather_rows: index (shape ", index.sizes(), ") holds ", p[i],
                        " at flat position ", i, ", outside [0, ", m, ") for bank of shape ", bank.sizes());
    }
  }
}

int64_t row_bytes(const at::Tensor& bank) {
  int64_t n = bank.element_size();
  for (int64_t d = 1; d < bank.dim(); ++d) n *= bank.size(d);
  return n;
}

bool rows_contiguous(const at::Tensor& bank) {
  int64_t expected = 1;
  for (int64_t d = bank.dim() - 1; d >= 1; --d) {
    if (bank.size(d) != 1 && bank.stride(d) != expected) return false;
    expected *= bank.size(d);
  }
  return true;
}

namespace {

// Gathers larger than this write with non-temporal (streaming) stores: the destination is not
// read back by this core soon (a staging buffer is read by the DMA engine; a large result would
// not stay in cache anyway), so skipping the read-for-ownership of each destination line saves
// a third of the memory traffic. Smaller gathers use memcpy and leave the rows in cache.
// MPLUS_FAST_GATHER_STREAMING=0 turns them off (=1: always when aligned), for A/B measurements.
int64_t streaming_threshold() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MPLUS_FAST_GATHER_STREAMING");
    if (env != nullptr && env[0] == '0') return INT64_MAX;
    if (env != nullptr && env[0] == '1') return int64_t{0};
    return int64_t{4} << 20;
  }();
  return bytes;
}

void copy_row_streaming(char* dst, const char* src, int64_t nbytes) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i + 64 <= nbytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  if (i < nbytes) std::memcpy(dst + i, src + i, nbytes - i);
#else
  std::memcpy(dst, src, nbytes);
#endif
}

// Copy rows; `out` contiguous, `index` contiguous and already validated.
void copy_rows(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& out) {
  const int64_t n = index.numel(), rb = row_bytes(bank);
  if (n == 0 || rb == 0) return;
  const char* src = static_cast<const char*>(bank.const_data_ptr());
  const int64_t stride = bank.stride(0) * bank.element_size();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / rb);
  // Streaming stores need 16-byte aligned destination rows.
  const bool streaming = n * rb >= streaming_threshold() && rb >= 64 && rb % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (streaming) {
      for (int64_t r = begin; r < end; ++r) copy_row_streaming(dst + r * rb, src + idx[r] * stride, rb);
#if defined(__SSE2__)
      _mm_sfence();  // order the streaming stores before the caller (or a DMA) reads `out`
#endif
    } else {
      for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * rb, src + idx[r] * stride, rb);
    }
  });
}

void gather_into(const at::Tensor& bank_in, const at::Tensor& index_in, const at::Tensor& out) {
  const at::Tensor bank = rows_contiguous(bank_in) ? bank_in : bank_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  if (out.is_contiguous()) {
    copy_rows(bank, index, out);
  } else {
    at::Tensor tmp = at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::Contiguous));
    copy_rows(bank, index, tmp);
    out.copy_(tmp);
  }
}

// A fresh multi-MB output is mostly page faults on first touch (on the VM we measure, 4 KiB faults
// cost ~4x the copy itself). Ask for transparent huge pages on its 2 MiB-aligned interior before
// anything touches it (torch's THP_MEM_ALLOC_ENABLE=1 does the same for every allocation).
void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes < static_cast<int64_t>(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint only
#else
  (void)data;
  (void)nbytes;
#endif
}

at::Tensor gather_rows_cpu(const at::Tensor& bank, const at::Tensor& index) {
  const auto shape = check_args(bank, index);
  check_range_cpu(index, bank);
  at::Tensor out = at::empty(shape, bank.options());
  advise_huge_pages(out.data_ptr(), out.nbytes());
  gather_into(bank, index, out);
  return out;
}

void gather_rows_out_cpu(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& out) {
  const auto shape = check_args(bank, index);
  check_out(out, shape, bank);
  check_range_cpu(index, bank);
  gather_into(bank, index, out);
}

}  // namespace
}  // namespace mplus_fast::gather

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) {
  m.impl("gather_rows", &mplus_fast::gather::gather_rows_cpu);
  m.impl("gather_rows_out", &mplus_fast::gather::gather_rows_out_cpu);
}
