// CPU implementation of regfast_C::norms: per-tensor Σ|w| and Σw² in one pass (cpu_passes.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "cpu_passes.h"
#include "cpu_work_list.h"
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {

std::tuple<at::Tensor, at::Tensor> cpu_ops::norms_table(at::ScalarType dtype, const void* const* data,
                                                        const std::vector<int64_t>& numels) {
  const auto acc = acc_type(dtype);
  at::Tensor l1 = at::empty({static_cast<int64_t>(numels.size())}, at::TensorOptions().dtype(acc));
  at::Tensor l2sq = at::empty_like(l1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "regfast_norms_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> v1, v2;
    cpu::passes<scalar_t>().norms_table(data, numels, v1, v2);
    std::copy(v1.begin(), v1.end(), l1.data_ptr<A>());
    std::copy(v2.begin(), v2.end(), l2sq.data_ptr<A>());
  });
  return {l1, l2sq};
}

std::tuple<at::Tensor, at::Tensor> cpu_ops::norms(at::TensorList params) {
  const auto ws = contiguous_all(params);
  return norms_table(params[0].scalar_type(), cpu::const_data_of(ws).data(), cpu::numels_of(ws));
}

namespace {

std::tuple<at::Tensor, at::Tensor> norms_cpu(at::TensorList params) {
  check_group(params, "params", c10::kCPU);
  return cpu_ops::norms(params);
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) { m.impl("norms", &norms_cpu); }

}  // namespace regfast
