// stm_update_: CPU kernel and the argument checks shared with the CUDA glue.
// Schema and docs: mplus_fast/ops/insertion.py.
//
// Design: data movement. O(N) index work per layer (a merge of the sorted dropped positions with
// 0..N-1) and T rows copied into the freed physical slots: the pool is never copied. The checks
// validate every index (range, duplicates) with ATen ops, device-agnostic, before any write; on
// CUDA that is one device->host sync per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/check.h"
#include "ops/insertion.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <sstream>
#include <vector>

namespace mplus_fast {

static void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device());
}

// Checks all arguments of stm_update_; returns drop sorted ascending per layer (L, T).
at::Tensor stm_update_check_args(const at::Tensor& pool, const at::Tensor& order, const at::Tensor& drop,
                                 const at::Tensor& new_rows) {
  TORCH_CHECK(pool.dim() == 3 && is_float(pool), "stm_update_: pool must be (L, N, d) float, got ", shape_of(pool));
  const int64_t L = pool.size(0), N = pool.size(1), d = pool.size(2);
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 2 && order.size(0) == L && order.size(1) == N,
              "stm_update_: order must be (L, N)=(", L, ", ", N, ") int64, got ", shape_of(order));
  TORCH_CHECK(drop.scalar_type() == at::kLong && drop.dim() == 2 && drop.size(0) == L && drop.size(1) <= N,
              "stm_update_: drop must be (L=", L, ", T<=", N, ") int64, got ", shape_of(drop));
  const int64_t T = drop.size(1);
  TORCH_CHECK(new_rows.scalar_type() == pool.scalar_type() && new_rows.dim() == 3 && new_rows.size(0) == L &&
                  new_rows.size(1) == T && new_rows.size(2) == d,
              "stm_update_: new_rows must be (L, T, d)=(", L, ", ", T, ", ", d, ") ", pool.scalar_type(), ", got ",
              shape_of(new_rows));
  check_device(order, "stm_update_: order", pool);
  check_device(drop, "stm_update_: drop", pool);
  check_device(new_rows, "stm_update_: new_rows", pool);
  auto sorted = std::get<0>(drop.sort(1)).contiguous();
  if (drop.numel() > 0) {
    auto bad_range = at::logical_or(sorted.select(1, 0) < 0, sorted.select(1, T - 1) >= N).any();
    auto dup = T > 1 ? (sorted.slice(1, 1) == sorted.slice(1, 0, T - 1)).any() : at::zeros({}, bad_range.options());
    auto flags = at::stack({bad_range, dup}).cpu();  // one sync on CUDA
    TORCH_CHECK(!flags[0].item<bool>(), "stm_update_: drop ", drop.sizes(), " has positions outside [0, ", N, ")");
    TORCH_CHECK(!flags[1].item<bool>(), "stm_update_: drop ", drop.sizes(), " has duplicate positions in a layer");
  }
  return sorted;
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// ------------------------------------------------------------------------------------------ CPU
void stm_update_cpu(at::Tensor& pool, at::Tensor& order, const at::Tensor& drop, const at::Tensor& new_rows) {
  auto sorted = stm_update_check_args(pool, order, drop, new_rows);
  const int64_t L = pool.size(0), N = pool.size(1), d = pool.size(2), T = drop.size(1);
  if (T == 0 || L == 0) return;
  auto slots = at::empty({L, T}, order.options());
  auto ord = order.accessor<int64_t, 2>();
  auto srt = sorted.accessor<int64_t, 2>();
  auto slt = slots.accessor<int64_t, 2>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> next(N);
    for (int64_t l = begin; l < end; ++l) {
      int64_t w = 0, p = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (p < T && srt[l][p] == i) {
          slt[l][p++] = ord[l][i];
        } else {
          next[w++] = ord[l][i];
        }
      }
      for (int64_t j = 0; j < T; ++j) next[w++] = slt[l][j];
      for (int64_t i = 0; i < N; ++i) ord[l][i] = next[i];
    }
  });
  if (d == 0) return;
  if (pool.stride(2) != 1) {  // rare: strided rows, let ATen copy them
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < T; ++j) pool[l][slt[l][j]].copy_(new_rows[l][j]);
    return;
  }
  auto src = unit_last_stride(new_rows);
  const size_t bytes = size_t(d) * pool.element_size();
  char* dst_base = static_cast<char*>(pool.data_ptr());
  const char* src_base = static_cast<const char*>(src.data_ptr());
  const int64_t es = pool.element_size();
  // >= 1 MiB per task: a memory-bound copy gains little from more threads, and a parallel region
  // costs a wake-up (and a barrier that a busy machine can stretch to milliseconds)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / int64_t(bytes));
  at::parallel_for(0, L * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = r / T, j = r % T;
      std::memcpy(dst_base + (l * pool.stride(0) + slt[l][j] * pool.stride(1)) * es,
                  src_base + (l * src.stride(0) + j * src.stride(1)) * es, bytes);
    }
  });
}

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) { m.impl("stm_update_", &stm_update_cpu); }

}  // namespace mplus_fast
