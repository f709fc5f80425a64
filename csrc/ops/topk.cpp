// mplus_fast::topk_ascending, CPU kernel, and the CPU top-k used by retrieval_topk.
//
// Design: the selection of csrc/kernels/topk_select.h (radix select + stable compaction, no
// sort). By default each row is selected by one thread (rows in parallel): ~2-3 ms for a
// 153,600-score row, against ~20-40 ms for the reference's sort. MPLUS_FAST_TOPK_RANKS=<r>
// (read per call) runs each row by an OpenMP team of r ranks standing in for the CUDA block:
// the same barriers, atomics and team scans as the GPU, with real concurrency; the tests use it
// to exercise the GPU's team logic on the CPU. (It is not the default: ~40 barriers per row,
// and on an oversubscribed machine a barrier waits for a descheduled thread, milliseconds.)
// A rank needs at least kMinPerRank scores. Versus std::nth_element (the previous kernel): the
// same O(n); ties and the ascending output come out of the compaction instead of a sort.
#include "ops/topk.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include "kernels/topk_select.h"
#include "ops/check.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

namespace mplus_fast {
namespace {

constexpr int64_t kMinPerRank = 1024;

// Ranks per row asked for with MPLUS_FAST_TOPK_RANKS (1 = one thread per row, the default).
int ranks_requested() {
  const char* env = std::getenv("MPLUS_FAST_TOPK_RANKS");
  const int r = env != nullptr ? std::atoi(env) : 1;
  return std::clamp(r, 1, 1024);
}

// The whole team of the enclosing `omp parallel` region.
struct OmpTeam {
  int r, p;
  int rank() const { return r; }
  int size() const { return p; }
  void sync() const {
#pragma omp barrier
  }
  void add(uint64_t* at, uint64_t v) const { std::atomic_ref<uint64_t>(*at).fetch_add(v, std::memory_order_relaxed); }
};

// A team of one (rows selected in parallel, one per thread).
struct SoloTeam {
  int rank() const { return 0; }
  int size() const { return 1; }
  void sync() const {}
  void add(uint64_t* at, uint64_t v) const { *at += v; }
};

void select_row_team(const float* row, int64_t n, int64_t k, int passes, int ranks, int64_t* idx, float* val) {
  std::vector<uint64_t> work(topk::work_entries(ranks));
#pragma omp parallel num_threads(ranks)
  {
    // The team may be smaller than asked (nested parallelism): carve for the real size.
    const OmpTeam team{omp_get_thread_num(), omp_get_num_threads()};
    topk::select_topk(team, row, n, k, passes, topk::carve_work(work.data(), team.size()), idx, val);
  }
}

}  // namespace

void topk_check_args(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat,
              "topk_ascending: scores must be (B, n) float32, got ", shape_of(scores));
  TORCH_CHECK(k >= 0 && k <= scores.size(1), "topk_ascending: k=", k, " must be in [0, n=", scores.size(1),
              "] (scores ", scores.sizes(), ")");
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& scores_in, int64_t k, int passes) {
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), n = scores.size(1);
  auto idx = at::empty({B, k}, scores.options().dtype(at::kLong));
  auto val = at::empty({B, k}, scores.options());
  if (B == 0 || k == 0) return {idx, val};
  const float* sp = scores.const_data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* vp = val.data_ptr<float>();
  const int ranks = int(std::min<int64_t>(ranks_requested(), n / kMinPerRank));
  if (ranks <= 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint64_t> work(topk::work_entries(1));
      const auto w = topk::carve_work(work.data(), 1);
      for (int64_t b = b0; b < b1; ++b) topk::select_topk(SoloTeam{}, sp + b * n, n, k, passes, w, ip + b * k, vp + b * k);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) select_row_team(sp + b * n, n, k, passes, ranks, ip + b * k, vp + b * k);
  }
  return {idx, val};
}

namespace {
std::tuple<at::Tensor, at::Tensor> topk_ascending_cpu(const at::Tensor& scores, int64_t k) {
  topk_check_args(scores, k);
  return topk_rows_cpu(scores, k, topk::passes_for_mantissa(23));
}
}  // namespace

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) { m.impl("topk_ascending", &topk_ascending_cpu); }

}  // namespace mplus_fast
