// The CPU ops' work once their arguments are checked: what regfast_C::norms, penalty, penalty_backward,
// add_penalty_grad_ and prox_ run on the CPU after their checks (norms_cpu.cpp, penalty_cpu.cpp, prox_cpu.cpp), and
// what the host path runs straight from its walk (host_path.cpp), which has checked the same.
//
// Each takes one group: a non-empty list of CPU tensors of one floating dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "groups.h"

namespace regfast {
namespace cpu_ops {

// Per-tensor Σ|w| and Σw², in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> norms(at::TensorList params);
// The same of the CPU tensors of one dtype whose data pointers and numels the walk read: numels[t] contiguous
// elements at data[t].
std::tuple<at::Tensor, at::Tensor> norms_table(at::ScalarType dtype, const void* const* data,
                                               const std::vector<int64_t>& numels);

// The penalty l1·Σ|w| + l2·Σw² + gl·Σ_g √|g|·‖w_g‖₂, 0-dim, in the accumulation dtype.
at::Tensor penalty(at::TensorList params, double l1, double l2, double gl, Grouping grouping);
// Its gradient times the 0-dim `grad`: a fresh tensor per param, of its shape, dtype and layout.
std::vector<at::Tensor> penalty_backward(const at::Tensor& grad, at::TensorList params, double l1, double l2,
                                         double gl, Grouping grouping);

// grads += the penalty's gradient at params (grads: contiguous, each of its param's shape and dtype); returns the
// penalty's value, 0-dim, in the accumulation dtype.
at::Tensor add_penalty_grad(at::TensorList params, const std::vector<at::Tensor>& grads, double l1, double l2,
                            double gl, Grouping grouping);
// The same of params at wd[t] and grads at od[t], numels[t] contiguous elements each, as the walk read them, with
// group lasso gl over the groups shapes[t] (null without).
at::Tensor add_penalty_grad_table(at::ScalarType dtype, const void* const* wd, void* const* od,
                                  const std::vector<int64_t>& numels, double l1, double l2, double gl,
                                  const GroupShape* shapes);

// The prox of params in place, with step lr_tensor (read on the host) or lr.
void prox(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
          double gl, Grouping grouping);

// The same prox of the tensors of one dtype whose data pointers and numels the walk read: numels[t] contiguous
// elements at data[t] (written in place), with group lasso gl over the groups shapes[t] (null without).
void prox_table(at::ScalarType dtype, void* const* data, const std::vector<int64_t>& numels,
                const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2, double gl,
                const GroupShape* shapes);

}  // namespace cpu_ops
}  // namespace regfast
