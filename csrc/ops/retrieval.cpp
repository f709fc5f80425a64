// retrieval_topk, CPU kernel and the argument checks shared with the CUDA glue.
// Schema and docs: mplus_fast/ops/retrieval.py.
//
// Design: the (n x (M+E)) score matrix is never materialised. Keys are cut into chunks; chunks
// (of every batch row) run in parallel (at::parallel_for, OpenMP); each does one small float32
// GEMM (its queries x its keys), a vectorised sigmoid in place, and a column sum over the
// unmasked queries. Peak temporary memory: threads x (n x C + C x s) floats, C ~ 2 MiB / (4 n).
// Precision (SPEC §10): float32 inputs score in float32 (column sums in double). bf16/fp16
// inputs score as the authors' code does in that dtype: each product (exact in float32: a
// product of two bf16/fp16 values) summed in float32 and rounded once to the dtype, torch's
// sigmoid in the dtype, the column sum in float32, divided by the count and rounded once.
// Scores are those rounded values.
// Top-k: csrc/ops/topk.cpp (radix select + stable compaction: ties at the k-th place go to the
// lower index, indices ascending), with the radix passes the rounded dtype needs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/topk_select.h"
#include "ops/check.h"
#include "ops/topk.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
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

namespace {

// Column sums over the queries (rows) of one chunk's dot products (rows x width, float32), the
// mean into out[0, width). T = float: sigmoid in float32, float64 sums. Otherwise SPEC §10 in
// ATen's own vectorised kernels: the dot products rounded to T (`.to(T)`, round to nearest
// even), torch's sigmoid in T (the reference's very operation), float32 sums, the mean rounded
// to T.
template <typename T>
void chunk_scores(at::Tensor& sc, int64_t rows, int64_t width, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    sc.sigmoid_();
    const float* p = sc.const_data_ptr<float>();
    std::vector<double> acc(width, 0.0);
    for (int64_t i = 0; i < rows; ++i, p += width)
      for (int64_t j = 0; j < width; ++j) acc[j] += p[j];
    for (int64_t j = 0; j < width; ++j) out[j] = float(acc[j] / double(rows));
  } else {
    const auto dtype = std::is_same_v<T, c10::BFloat16> ? at::kBFloat16 : at::kHalf;
    const at::Tensor sig = at::sigmoid(sc.to(dtype)).to(at::kFloat);
    const float* p = sig.const_data_ptr<float>();
    std::vector<float> acc(width, 0.0f);
    for (int64_t i = 0; i < rows; ++i, p += width)
      for (int64_t j = 0; j < width; ++j) acc[j] += p[j];
    const float cnt = float(rows);
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<float>(static_cast<T>(acc[j] / cnt));
  }
}

template <typename T>
at::Tensor scores_cpu(const at::Tensor& queries, const at::Tensor& keys, const std::optional<at::Tensor>& extra_keys,
                      const std::optional<at::Tensor>& query_mask) {
  const int64_t B = queries.size(0), n = queries.size(1);
  const int64_t M = keys.size(0), E = extra_keys.has_value() ? extra_keys->size(0) : 0, total = M + E;
  auto scores = at::zeros({B, total}, queries.options().dtype(at::kFloat));
  if (total == 0 || B == 0) return scores;
  // Per batch row: its unmasked queries in float32 (small: n x s; bf16/fp16 convert exactly).
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
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, j0 = (task % nchunks) * chunk, j1 = std::min(total, j0 + chunk);
      const int64_t cnt = q[b].size(0);
      if (cnt == 0) continue;  // every query masked: scores stay 0
      at::Tensor kc;  // (width, s) keys of this chunk
      if (j1 <= M) {
        kc = keys.slice(0, j0, j1);
      } else if (j0 >= M) {
        kc = extra_keys->slice(0, j0 - M, j1 - M);
      } else {
        kc = at::cat({keys.slice(0, j0, M), extra_keys->slice(0, 0, j1 - M)});
      }
      auto sc = at::mm(q[b], kc.to(at::kFloat).t());  // (cnt, width) float32
      chunk_scores<T>(sc, cnt, j1 - j0, out + b * total + j0);
    }
  });
  return scores;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> retrieval_topk_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                      const std::optional<at::Tensor>& extra_keys, int64_t k,
                                                      const std::optional<at::Tensor>& query_mask) {
  retrieval_check_args(queries, keys, extra_keys, k, query_mask);
  const int64_t B = queries.size(0), M = keys.size(0);
  if (M < k) return retrieval_cyclic(B, M, k, queries.options());
  switch (queries.scalar_type()) {
    case at::kBFloat16:
      return topk_rows_cpu(scores_cpu<c10::BFloat16>(queries, keys, extra_keys, query_mask), k,
                           topk::passes_for_mantissa(7));
    case at::kHalf:
      return topk_rows_cpu(scores_cpu<c10::Half>(queries, keys, extra_keys, query_mask), k,
                           topk::passes_for_mantissa(10));
    default:
      return topk_rows_cpu(scores_cpu<float>(queries, keys, extra_keys, query_mask), k, topk::passes_for_mantissa(23));
  }
}

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) { m.impl("retrieval_topk", &retrieval_topk_cpu); }

}  // namespace mplus_fast
