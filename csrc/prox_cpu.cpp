// CPU implementation of regfast_C::prox_: the elastic-net step of every element, and with group
// lasso the group factors from the group norms of that step, applied in the same pass.
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
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {

namespace {

// The elastic-net step of a prox with step lr_tensor or lr, in A: as the reference, the scalars in A from a tensor
// lr, in double from a float one.
template <typename A>
ElasticStep<A> elastic_of(const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
                          at::ScalarType acc) {
  if (lr_tensor.has_value()) return ElasticStep<A>::from_acc(lr_tensor->to(at::kCPU, acc).item<A>(), l1, l2);
  double threshold = 0, shrink = 1;
  elastic_scalars(lr, l1, l2, threshold, shrink);
  return ElasticStep<A>::from_double(threshold, shrink, l1 != 0, l2 != 0);
}

}  // namespace

void cpu_ops::prox(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
                   double gl, Grouping grouping) {
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  const double step = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const auto acc = acc_type(params[0].scalar_type());
  const auto ws = contiguous_all(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_prox_cpu", [&] {
    cpu::passes<scalar_t>().prox(ws, step, elastic_of<acc_t<scalar_t>>(lr_tensor, lr, l1, l2, acc), l2, gl, grouping);
  });
  write_back(params, ws);
}

void cpu_ops::prox_table(at::ScalarType dtype, void* const* data, const std::vector<int64_t>& numels,
                         const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2, double gl,
                         const GroupShape* shapes) {
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  const double step = lr_tensor.has_value() && gl != 0 ? lr_tensor->item<double>() : lr;  // (as prox)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "regfast_prox_cpu", [&] {
    cpu::passes<scalar_t>().prox_table(data, numels, step, elastic_of<acc_t<scalar_t>>(lr_tensor, lr, l1, l2,
                                                                                         acc_type(dtype)),
                                       l2, gl, shapes);
  });
}

namespace {

void prox_cpu(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
              double gl, c10::string_view groups) {
  check_group(params, "params", c10::kCPU);
  cpu_ops::prox(params, lr_tensor, lr, l1, l2, gl, parse_grouping(groups));
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) { m.impl("prox_", &prox_cpu); }

}  // namespace regfast
