// CUDA implementations of regfast_C::penalty, penalty_backward and add_penalty_grad_: the value from
// per-tensor and group norms (norms.cu, group_norms.cu), the gradient in one launch (penalty.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "cuda_tables.h"
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {

namespace {

at::Tensor penalty_cuda(at::TensorList params, double l1, double l2, double gl, c10::string_view groups) {
  check_cuda_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor value = at::zeros({}, acc_options(params[0]));
  if (l1 != 0 || l2 != 0) {
    const auto [per_l1, per_l2sq] = per_tensor_norms(contiguous_all(params));
    if (l1 != 0) value = value + per_l1.sum() * l1;
    if (l2 != 0) value = value + per_l2sq.sum() * l2;
  }
  if (gl != 0) {
    const auto ws = contiguous_all(params);
    const DeviceList dl = build(ws, nullptr, grouping);
    const auto [norm, root] = group_norms(ws, dl, nullptr);
    value = value + ((root * norm).sum() * gl).to(value.scalar_type());
  }
  return value;
}

// The gradient pass into `outs` (accumulating or not), scaled by `mult` (0-dim, accumulation
// dtype) when given; returns the penalty value.
at::Tensor grad_pass(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& outs, bool accumulate,
                     double l1, double l2, double gl, Grouping grouping, const at::Tensor* mult) {
  at::Tensor value = at::zeros({}, acc_options(ws[0]));
  if (l1 == 0 && l2 == 0 && gl == 0) return value;
  const DeviceList dl = build(ws, &outs, gl != 0 ? std::optional<Grouping>(grouping) : std::nullopt);
  at::Tensor scale, pre;
  if (gl != 0) {
    const auto [norm, root] = group_norms(ws, dl, nullptr);
    auto [q, p] = split_coefficients(root * gl, norm);
    // (2·l2 + c)·w as (2·l2/p + q)·(w·p), summed in the accumulation dtype as the element loop would.
    scale = (2 * l2 / p).to(acc_options(ws[0])) + q.to(acc_options(ws[0]));
    pre = p.to(acc_options(ws[0]));
    value = value + ((root * norm).sum() * gl).to(value.scalar_type());
  }
  at::Tensor partials = at::empty({2 * dl.nitems}, acc_options(ws[0]));
  cuda::launch_grad(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, l1, l2,
                    gl != 0 ? scale.data_ptr() : nullptr, gl != 0 ? pre.data_ptr() : nullptr,
                    mult != nullptr ? mult->data_ptr() : nullptr, accumulate, partials.data_ptr(),
                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (l1 != 0) value = value + partials.slice(0, 0, dl.nitems).sum() * l1;
  if (l2 != 0) value = value + partials.slice(0, dl.nitems, 2 * dl.nitems).sum() * l2;
  return value;
}

std::vector<at::Tensor> penalty_backward_cuda(const at::Tensor& grad, at::TensorList params, double l1, double l2,
                                              double gl, c10::string_view groups) {
  check_cuda_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  std::vector<at::Tensor> outs;
  outs.reserve(ws.size());
  for (const auto& w : ws) outs.push_back(at::zeros_like(w, at::MemoryFormat::Contiguous));
  const at::Tensor mult = grad.to(acc_options(ws[0])).contiguous();
  grad_pass(ws, outs, false, l1, l2, gl, grouping, &mult);
  for (size_t i = 0; i < outs.size(); ++i) {
    if (!params[i].is_contiguous()) outs[i] = at::empty_like(params[i]).copy_(outs[i]);
  }
  return outs;
}

at::Tensor add_penalty_grad_cuda(at::TensorList params, at::TensorList grads, double l1, double l2, double gl,
                                 c10::string_view groups) {
  check_cuda_group(params, "params");
  check_cuda_group(grads, "grads");
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].device() == params[i].device(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
  }
  const Grouping grouping = parse_grouping(groups);
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  at::Tensor value = grad_pass(ws, gs, true, l1, l2, gl, grouping, nullptr);
  write_back(grads, gs);
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CUDA, m) {
  m.impl("penalty", &penalty_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("add_penalty_grad_", &add_penalty_grad_cuda);
}

}  // namespace regfast
