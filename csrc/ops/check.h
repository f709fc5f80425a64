// Small helpers shared by the ops' argument checks (one definition for every op's glue).
#pragma once
#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace mplus_fast {

// "[2, 3] Float": the shape and dtype of a tensor, for error messages.
inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " " << t.scalar_type();
  return os.str();
}

inline bool is_float(const at::Tensor& t) {
  auto st = t.scalar_type();
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

}  // namespace mplus_fast
