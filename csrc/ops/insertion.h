// stm_update_ / assemble_rows: what the CPU glue (insertion.cpp) shares with the CUDA glue
// (insertion_cuda.cu): the one set of argument checks and the preparation of the inputs.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace mplus_fast {

// Checks every argument (shapes, dtypes, devices, index ranges) before anything is written;
// returns drop sorted per layer.
at::Tensor stm_update_check_args(const at::Tensor& pool, const at::Tensor& order, const at::Tensor& drop,
                                 const at::Tensor& new_rows);
void assemble_rows_check_args(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                              const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                              const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                              const std::optional<at::Tensor>& pos_emb, int64_t pos_emb_rows, const at::Tensor& out);

// Rows of a 2-D/3-D tensor must be contiguous for the raw copies; copy only if they are not.
at::Tensor unit_last_stride(const at::Tensor& t);

// assemble_rows' inputs ready for a kernel: contiguous small tensors, unit-stride rows; an absent
// optional input is an undefined tensor.
struct AssembleInputs {
  at::Tensor bos, bank, bank_index, stm, stm_order, new_rows, pos_emb;
};
AssembleInputs assemble_inputs(const at::Tensor& bos, const std::optional<at::Tensor>& bank,
                               const std::optional<at::Tensor>& bank_index, const at::Tensor& stm,
                               const std::optional<at::Tensor>& stm_order, const std::optional<at::Tensor>& new_,
                               const std::optional<at::Tensor>& pos_emb);

}  // namespace mplus_fast
