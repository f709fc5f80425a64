// stm_update_ and assemble_rows: CPU kernels and the argument checks shared with the CUDA glue.
// Schemas and docs: mplus_fast/ops/insertion.py.
//
// Design: both ops are data movement. stm_update_ does O(N) index work per layer (a merge of the
// sorted dropped positions with 0..N-1) and copies T rows into the freed physical slots: the pool
// is never copied. assemble_rows copies each output row once from its source (bos / bank row /
// STM slot / new row) with the positional embedding added on the fly (OpenMP over rows).
// The checks validate every index (range, duplicates) with ATen ops, device-agnostic, before any
// write; on CUDA that is one device->host sync per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

void assemble_rows_check_args(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                              const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                              const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                              const std::optional<at::Tensor>& pos_emb, int64_t pos_emb_rows, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 3 && is_float(out), "assemble_rows: out must be (B, 1 + R + N + m, d) float, got ",
              shape_of(out));
  TORCH_CHECK(out.size(2) == 0 || out.stride(2) == 1, "assemble_rows: out ", out.sizes(),
              " must have unit stride in its last dim, got strides ", out.strides());
  const int64_t B = out.size(0), rows = out.size(1), d = out.size(2);
  const auto dt = out.scalar_type();
  TORCH_CHECK(bos.scalar_type() == dt && bos.dim() == 1 && bos.size(0) == d, "assemble_rows: bos must be (d,)=(", d,
              ",) ", dt, ", got ", shape_of(bos));
  check_device(bos, "assemble_rows: bos", out);
  int64_t R = 0;
  std::vector<at::Tensor> flags;
  if (bank.has_value()) {
    TORCH_CHECK(bank->scalar_type() == dt && bank->dim() == 2 && bank->size(1) == d, "assemble_rows: bank must be (M, d=",
                d, ") ", dt, ", got ", shape_of(*bank));
    TORCH_CHECK(bank_index.has_value() && bank_index->scalar_type() == at::kLong && bank_index->dim() == 2 &&
                    bank_index->size(0) == B,
                "assemble_rows: bank_index must be (B=", B, ", R) int64 with bank, got ",
                bank_index.has_value() ? shape_of(*bank_index) : std::string("None"));
    check_device(*bank, "assemble_rows: bank", out);
    check_device(*bank_index, "assemble_rows: bank_index", out);
    R = bank_index->size(1);
    if (bank_index->numel() > 0)
      flags.push_back(at::logical_or(*bank_index < 0, *bank_index >= bank->size(0)).any());
  }
  TORCH_CHECK(stm.scalar_type() == dt && stm.dim() == 2 && stm.size(1) == d, "assemble_rows: stm must be (N, d=", d,
              ") ", dt, ", got ", shape_of(stm));
  check_device(stm, "assemble_rows: stm", out);
  const int64_t N = stm.size(0);
  if (stm_order.has_value()) {
    TORCH_CHECK(stm_order->scalar_type() == at::kLong && stm_order->dim() == 1 && stm_order->size(0) == N,
                "assemble_rows: stm_order must be (N,)=(", N, ",) int64, got ", shape_of(*stm_order));
    check_device(*stm_order, "assemble_rows: stm_order", out);
  }
  int64_t m = 0;
  if (new_.has_value()) {
    TORCH_CHECK(new_->scalar_type() == dt && new_->dim() == 3 && new_->size(0) == B && new_->size(2) == d,
                "assemble_rows: new must be (B=", B, ", m, d=", d, ") ", dt, ", got ", shape_of(*new_));
    check_device(*new_, "assemble_rows: new", out);
    m = new_->size(1);
  }
  TORCH_CHECK(rows == 1 + R + N + m, "assemble_rows: out ", out.sizes(), " must have 1 + R + N + m = ", 1 + R + N + m,
              " rows");
  TORCH_CHECK(pos_emb_rows >= 0 && pos_emb_rows <= rows && (pos_emb_rows == 0 || pos_emb.has_value()),
              "assemble_rows: pos_emb_rows=", pos_emb_rows, " must be in [0, ", rows, "] (and needs pos_emb)");
  if (pos_emb.has_value()) {
    TORCH_CHECK(pos_emb->scalar_type() == dt && pos_emb->dim() == 1 && pos_emb->size(0) == d,
                "assemble_rows: pos_emb must be (d,)=(", d, ",) ", dt, ", got ", shape_of(*pos_emb));
    check_device(*pos_emb, "assemble_rows: pos_emb", out);
  }
  // index ranges: bank_index first (flag 0 when present), then stm_order; one sync on CUDA
  const bool has_bank_flag = !flags.empty();
  if (stm_order.has_value() && N > 0) flags.push_back(at::logical_or(*stm_order < 0, *stm_order >= N).any());
  if (!flags.empty()) {
    auto f = at::stack(flags).cpu();
    size_t i = 0;
    if (has_bank_flag)
      TORCH_CHECK(!f[i++].item<bool>(), "assemble_rows: bank_index ", bank_index->sizes(), " has rows outside [0, ",
                  bank->size(0), ")");
    if (i < flags.size())
      TORCH_CHECK(!f[i].item<bool>(), "assemble_rows: stm_order ", stm_order->sizes(), " has slots outside [0, ", N, ")");
  }
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

AssembleInputs assemble_inputs(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                               const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                               const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                               const std::optional<at::Tensor>& pos_emb) {
  AssembleInputs in;
  in.bos = bos.contiguous();
  if (bank.has_value()) {
    in.bank = unit_last_stride(*bank);
    in.bank_index = bank_index->contiguous();
  }
  in.stm = unit_last_stride(stm);
  if (stm_order.has_value()) in.stm_order = stm_order->contiguous();
  if (new_.has_value()) in.new_rows = unit_last_stride(*new_);
  if (pos_emb.has_value()) in.pos_emb = pos_emb->contiguous();
  return in;
}

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

void assemble_rows_cpu(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                       const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                       const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                       const std::optional<at::Tensor>& pos_emb, int64_t pos_emb_rows, at::Tensor& out) {
  assemble_rows_check_args(bos, bank, bank_index, stm, stm_order, new_, pos_emb, pos_emb_rows, out);
  const int64_t B = out.size(0), rows = out.size(1), d = out.size(2);
  if (B == 0 || rows == 0 || d == 0) return;
  const int64_t R = bank.has_value() ? bank_index->size(1) : 0, N = stm.size(0);
  const auto in = assemble_inputs(bos, bank, bank_index, stm, stm_order, new_, pos_emb);
  const auto &bank_c = in.bank, &stm_c = in.stm, &new_c = in.new_rows;
  const int64_t first_pe = rows - pos_emb_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "assemble_rows_cpu", [&] {
    const scalar_t* bos_p = in.bos.data_ptr<scalar_t>();
    const scalar_t* bank_p = bank.has_value() ? bank_c.data_ptr<scalar_t>() : nullptr;
    const int64_t* bidx_p = bank.has_value() ? in.bank_index.data_ptr<int64_t>() : nullptr;
    const scalar_t* stm_p = stm_c.data_ptr<scalar_t>();
    const int64_t* sord_p = stm_order.has_value() ? in.stm_order.data_ptr<int64_t>() : nullptr;
    const scalar_t* new_p = new_.has_value() ? new_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pe_p = pos_emb.has_value() ? in.pos_emb.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (d * int64_t(sizeof(scalar_t))));
    at::parallel_for(0, B * rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / rows, r = t % rows;
        const scalar_t* src;
        if (r == 0) {
          src = bos_p;
        } else if (r <= R) {
          src = bank_p + bidx_p[b * R + (r - 1)] * bank_c.stride(0);
        } else if (r <= R + N) {
          const int64_t i = r - 1 - R;
          src = stm_p + (sord_p ? sord_p[i] : i) * stm_c.stride(0);
        } else {
          src = new_p + b * new_c.stride(0) + (r - 1 - R - N) * new_c.stride(1);
        }
        scalar_t* dst = out_p + b * out.stride(0) + r * out.stride(1);
        if (r >= first_pe) {
          for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(float(src[c]) + float(pe_p[c]));
        } else {
          std::memcpy(dst, src, sizeof(scalar_t) * d);
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(mplus_fast, CPU, m) {
  m.impl("stm_update_", &stm_update_cpu);
  m.impl("assemble_rows", &assemble_rows_cpu);
}

}  // namespace mplus_fast
