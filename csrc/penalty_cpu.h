// The CPU gradient pass of add_penalty_grad_ over a table of tensors: what the op runs after its checks
// (penalty_cpu.cpp), and what the host path runs straight from its walk (host_path.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace regfast {
namespace penalty_table {

// Contiguous tensors of one dtype: w[t] (read) and out[t] (written) of numels[t] elements each.
struct GradTable {
  std::vector<const void*> w;
  std::vector<void*> out;
  std::vector<int64_t> numels;
};

// out[t] += l1·sign(w[t]) + 2·l2·w[t] for every tensor of `table` (params of `dtype`, no group lasso);
// returns l1·Σ|w| + l2·Σw², computed in the accumulation dtype, as regfast_C::add_penalty_grad_ does.
double add_penalty_grad(at::ScalarType dtype, const GradTable& table, double l1, double l2);

}  // namespace penalty_table
}  // namespace regfast
