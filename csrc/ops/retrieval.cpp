// retrieval_topk, CPU kernel and the argument checks shared with the CUDA glue.
// Schema and docs: mplus_fast/ops/retrieval.py.
//
// Design: the (n x (M+E)) score matrix is never materialised. Keys are cut into chunks; chunks
// (of every batch row) run in parallel (at::parallel_for, OpenMP); each does one small float32
// GEMM (its queries x its keys), a vectorised sigmoid in place, and a column sum over the
// unmasked queries (summed in double). Peak temporary memory: threads x (n x C + C x s) floats, C ~ 2 MiB / (4 n).
// Top-k: per batch row, nth_element with the total order (score desc, index asc), so ties at
// the k-th place go to the lower index; then the k indices are sorted ascending.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/check.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <sstream>
#include <vector>

namespace mplus_fast {

// The one set of argument checks for the native kernels (CPU and CUDA).
void retrieval_check_args(const at::Tensor& queries, const at::Tensor& keys,
                          const std::optional<at::Tensor>& extra_keys, int64_t k,
                          const std::optional<at::Tensor>& query_mask) {
  TORCH_CHECK(queries.dim() == 3 && is_float(queries),
              "retrieval_topk: queries must be (B, n, s) float, got ", shape_of(queries));
  TORCH_CHECK(keys.dim() == 2 && keys.scalar_type() == queries.scalar_type() && keys.size(1) == queries.size(2),
              "retrieval_topk: keys must be (M, s=", queries.size(2), ") ", queries.scalar_type(), ", got ",
              shape_of(keys));
  TORCH_CHECK(keys.size(0) > 0, "retrieval_topk: keys is empty (shape ", keys.sizes(), "); M must be >= 1");
  if (extra_keys.has_value()) {
    const auto& e = *extra_keys;
    TORCH_CHECK(e.dim() == 2 && e.scalar_type() == keys.scalar_type() && e.size(1) == keys.size(1),
                "retrieval_topk: extra_keys must be (E, s=", keys.size(1), ") ", keys.scalar_type(), ", got ",
                shape_of(e));
    TORCH_CHECK(e.device() == queries.device(), "retrieval_topk: extra_keys is on ", e.device(),
                ", queries on ", queries.device());
  }
  if (query_mask.has_value()) {
    const auto& mk = *query_mask;
    TORCH_CHECK(mk.scalar_type() == at::kBool && mk.dim() == 2 && mk.size(0) == queries.size(0) &&
                    mk.size(1) == queries.size(1),
                "retrieval_topk: query_mask must be (B, n)=(", queries.size(0), ", ", queries.size(1),
                ") bool, got ", shape_of(mk));
    TORCH_CHECK(mk.device() == queries.device(), "retrieval_topk: query_mask is on ", mk.device(),
                ", queries on ", queries.device());
  }
  TORCH_CHECK(keys.device() == queries.device(), "retrieval_topk: keys is on ", keys.device(), ", queries on ",
              queries.device());
  TORCH_CHECK(k >= 0, "retrieval_topk: k=", k, " must be >= 0 (keys ", keys.sizes(), ")");
}

// SPEC §3, M < k: arange(M) repeated end to end, the last k entries: entry i = (i - k) mod M.
std::tuple<at::Tensor, at::Tensor> retrieval_cyclic(int64_t batch, int64_t m, int64_t k,
                                                    const at::TensorOptions& opts) {
  auto row = at::remainder(at::arange(k, opts.dtype(at::kLong)) - k, m);
  return {row.expand({batch, k}).contiguous(), at::zeros({batch, k}, opts.dtype(at::kFloat))};
}

static at::Tensor scores_cpu(const at::Tensor& queries, const at::Tensor& keys,
                             const std::optional<at::Tensor>& extra_keys,
                             const std::optional<at::Tensor>& query_mask) {
  const int64_t B = queries.size(0), n = queries.size(1), s = queries.size(2);
  const int64_t M = keys.size(0), E = extra_keys.has_value() ? extra_keys->size(0) : 0, total = M + E;
  auto scores = at::zeros({B, total}, queries.options().dtype(at::kFloat));
  if (total == 0 || B == 0) return scores;
  // Per batch row: its unmasked queries in float32 (small: n x s).
  std::vector<at::Tensor> q(B);
  for (int64_t b = 0; b < B; ++b) {
    auto qb = queries[b];
    if (query_mask.has_value()) qb = qb.index_select(0, at::nonzero((*query_mask)[b]).squeeze(1));
    q[b] = qb.to(at::kFloat).contiguous();
  }
  const int64_t chunk = std::clamp<int64_t>(((int64_t(1) << 19) / std::max<int64_t>(n, 1)) / 16 * 16, 64, 4096);
  const int64_t nchunks = (total + chunk - 1) / chunk;
  float* out = scores.data_ptr<float>();
  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc;  // column sums in double: n adds per column are cheap next to the GEMM
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, j0 = (task % nchunks) * chunk, j1 = std::min(total, j0 + chunk);
      const int64_t cnt = q[b].size(0), width = j1 - j0;
      if (cnt == 0) continue;  // every query masked: scores stay 0
      at::Tensor kc;  // (width, s) keys of this chunk, float32
      if (j1 <= M) {
        kc = keys.slice(0, j0, j1);
      } else if (j0 >= M) {
        kc = extra_keys->slice(0, j0 - M, j1 - M);
      } else {
        kc = at::cat({keys.slice(0, j0, M), extra_keys->slice(0, 0, j1 - M)});
      }
      auto sc = at::mm(q[b], kc.to(at::kFloat).t());  // (cnt, width) float32
      sc.sigmoid_();
      acc.assign(width, 0.0);
      const float* p = sc.data_ptr<float>();
      for (int64_t i = 0; i < cnt; ++i, p += width)
        for (int64_t j = 0; j < width; ++j) acc[j] += p[j];
      const double inv = 1.0 / double(cnt);
      for (int64_t j = 0; j < width; ++j) out[b * total + j0 + j] = float(acc[j] * inv);
    }
  });
  (void)s;
  return scores;
}

// Top-k of each row of scores (B, total) float32 (contiguous, CPU): indices ascending.
static std::tuple<at::Tensor, at::Tensor> topk_sorted_cpu(const at::Tensor& scores, int64_t k) {
  const int64_t B = scores.size(0), total = scores.size(1);
  auto idx = at::empty({B, k}, scores.options().dtype(at::kLong));
  auto val = at::empty({B, k}, scores.options());
  const float* sp = scores.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* vp = val.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(total);
    for (int64_t b = begin; b < end; ++b) {
      const float* row = sp + b * total;
      auto key = [&](int64_t j) { return std::isnan(row[j]) ? -INFINITY : row[j]; };
      auto better = [&](int64_t a, int64_t c) { return key(a) > key(c) || (key(a) == key(c) && a < c); };
      std::iota(order.begin(), order.end(), int64_t(0));
      if (k < total) std::nth_element(order.begin(), order.begin() + k, order.end(), better);
      std::sort(order.begin(), order.begin() + k);
      for (int64_t i = 0; i < k; ++i) {
        ip[b * k + i] = order[i];
        vp[b * k + i] = row[order[i]];
      }
    }
  });
  return {idx, val};
}

std::tuple<at::Tensor, at::Tensor> retrieval_topk_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                      const std::optional<at::Tensor>& extra_keys, int64_t k,
                                                      const std::optional<at::Tensor>& query_mask) {
  retrieval_check_args(queries, keys, extra_keys, k, query_mask);
  const int64_t B = queries.size(0), M = keys.size(0);
  if (M < k) return retrieval_cyclic(B, M, k, queries.options());
  auto scores = scores_cpu(queries, keys, extra_keys, query_mask);
  return topk_sorted_cpu(scores, k);
}

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) { m.impl("retrieval_topk", &retrieval_topk_cpu); }

}  // namespace mplus_fast
