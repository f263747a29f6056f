// The device-generic host code of the fused optimizer steps (see optim_common.h). The group passes
// are the device's own regfast_C::prox_ and regfast_C::penalty, reached through the dispatcher.
#include "optim_common.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "groups.h"
#include "tensor_list.h"

namespace regfast {
namespace {

void call_prox(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
               double group_lasso, c10::string_view groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("regfast_C::prox_", "")
          .typed<void(at::TensorList, const std::optional<at::Tensor>&, double, double, double, double,
                      c10::string_view)>();
  op.call(params, lr_tensor, lr, l1, l2, group_lasso, groups);
}

// The penalty of the new params when asked, else a 0-dim zero, in the accumulation dtype.
at::Tensor finish(at::TensorList params, double l1, double l2, double group_lasso, c10::string_view groups,
                  bool compute_penalty) {
  if (compute_penalty) return call_penalty(params, l1, l2, group_lasso, groups);
  return at::zeros({}, params[0].options().dtype(acc_type(params[0].scalar_type())));
}

// Params and grads in the accumulation dtype: the tensors themselves when already there, else copies.
bool working_copies(at::TensorList params, at::TensorList grads, std::vector<at::Tensor>& work,
                    std::vector<at::Tensor>& g) {
  const auto acc = acc_type(params[0].scalar_type());
  const bool copies = params[0].scalar_type() != acc;
  for (size_t i = 0; i < params.size(); ++i) {
    work.push_back(copies ? params[i].to(acc) : params[i]);
    g.push_back(copies ? grads[i].to(acc) : grads[i]);
  }
  return copies;
}

// The float working copies narrowed back into their 16-bit params, every NaN first made the one whose narrowing is
// regfast's canonical NaN (float16: its sign | 0x7E00, bfloat16: 0x7FC0), as the kernels' own conversions give:
// torch's copy keeps part of a NaN's payload, and which NaN an operation on two NaNs returns is the order of its
// operands, which the kernels' vector and tail code need not share.
void narrow_back(at::TensorList params, const std::vector<at::Tensor>& work) {
  if (params.empty()) return;
  const at::Tensor quiet = at::full({}, std::numeric_limits<float>::quiet_NaN(), work[0].options());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor nan = params[i].scalar_type() == at::kHalf ? at::copysign(quiet, work[i]) : quiet;
    params[i].copy_(at::where(at::isnan(work[i]), nan, work[i]));
  }
}

// Dims reduced to form the groups of t (empty: the whole tensor is one group), as _common.group_dims.
std::vector<int64_t> group_dims(const at::Tensor& t, Grouping grouping) {
  std::vector<int64_t> dims;
  if (grouping == Grouping::kTensor || t.dim() < 2) return dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d != (grouping == Grouping::kRow ? 0 : 1)) dims.push_back(d);
  }
  return dims;
}

at::Tensor group_sum(const at::Tensor& x, const std::vector<int64_t>& dims) {
  return dims.empty() ? x.sum() : x.sum(dims, /*keepdim=*/true);
}

at::Tensor group_max(const at::Tensor& x, const std::vector<int64_t>& dims) {
  return dims.empty() ? x.amax() : x.amax(dims, /*keepdim=*/true);
}

int64_t group_size(const at::Tensor& t, const std::vector<int64_t>& dims) {
  if (dims.empty()) return t.numel();
  int64_t n = 1;
  for (int64_t d : dims) n *= t.size(d);
  return n;
}

// ‖w_g‖₂ in float64, shaped to broadcast against w; each group scaled by its largest magnitude
// so that no norm of finite weights overflows or underflows.
at::Tensor group_norms(const at::Tensor& w, const std::vector<int64_t>& dims) {
  const at::Tensor w64 = w.to(at::kDouble);
  const at::Tensor amax = group_max(w64.abs(), dims);
  const at::Tensor scale = at::where(amax > 0, amax, at::ones_like(amax));
  return group_sum((w64 / scale).square(), dims).sqrt() * scale;
}

// Per element, l1 + 2·l2·|w| + group_lasso·√|g|·|w|/‖w_g‖ (reference: penalty_gradient_scales).
std::vector<at::Tensor> penalty_gradient_scales(const std::vector<at::Tensor>& params, double l1, double l2,
                                                double group_lasso, Grouping grouping) {
  std::vector<at::Tensor> out;
  for (const auto& w : params) {
    at::Tensor scale = l2 == 0 ? at::zeros_like(w) : w.abs().mul_(2 * l2);
    if (l1 != 0) scale.add_(l1);
    if (group_lasso != 0 && w.numel() != 0) {
      const auto dims = group_dims(w, grouping);
      const at::Tensor norm = group_norms(w, dims);
      const double size = std::sqrt(static_cast<double>(group_size(w, dims)));
      const at::Tensor safe = at::where(norm == 0, at::ones_like(norm), norm);
      scale.add_((w.abs().to(at::kDouble) / safe * (group_lasso * size)).to(w.scalar_type()));
    }
    out.push_back(scale);
  }
  return out;
}

// Newton steps of the group shrink in a diagonal metric (reference: METRIC_NEWTON_STEPS).
constexpr int kMetricNewtonSteps = 8;

// u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂ for every group (reference: _metric_group_shrink_): the test
// and Newton's steps in float64, the factor from t rounded to u's dtype.
void metric_group_shrink_(at::Tensor& u, const at::Tensor& a, const std::vector<int64_t>& dims) {
  if (u.numel() == 0) return;
  const at::Tensor u64 = u.to(at::kDouble), a64 = a.to(at::kDouble);
  const at::Tensor nonzero = u64 != 0;
  const at::Tensor vanishes = group_sum(at::where(nonzero, u64 / a64, 0).square(), dims) <= 1;
  const double tiny =
      u.scalar_type() == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  at::Tensor t = at::clamp_min(group_sum(u64.square(), dims).sqrt() - group_max(a64, dims), 0);
  for (int k = 0; k < kMetricNewtonSteps; ++k) {
    const at::Tensor x = (t + a64).clamp_min(tiny);
    const at::Tensor q2 = at::where(nonzero, u64 / x, 0).square();
    const at::Tensor r2 = group_sum(q2, dims);
    const at::Tensor slope = group_sum(q2 / x, dims).clamp_min(tiny);
    t = t + (r2.sqrt() - 1) * r2 / slope;
  }
  t = t.to(u.scalar_type());
  const at::Tensor factor = t / (t + a).clamp_min(tiny);
  u.mul_(at::where(vanishes, 0, factor));
}

// The prox in the metric of per-element steps `step` (reference: metric_prox_), in place.
void metric_prox_(at::Tensor& w, at::Tensor step, double l1, double l2, double group_lasso, Grouping grouping) {
  if (l1 != 0) {
    const at::Tensor threshold = step * l1;
    w.sub_(at::clamp(w, -threshold, threshold));
  }
  if (l2 != 0) {
    // Python's 1 / x multiplies by the reciprocal.
    const at::Tensor shrink = (step * (2 * l2)).add(1).reciprocal().mul(1);
    w.mul_(shrink);
    step = step * shrink;
  }
  if (group_lasso != 0) {
    const auto dims = group_dims(w, grouping);
    const double size = std::sqrt(static_cast<double>(group_size(w, dims)));
    metric_group_shrink_(w, step * (group_lasso * size), dims);
  }
}

}  // namespace

at::Tensor call_penalty(at::TensorList params, double l1, double l2, double group_lasso, c10::string_view groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("regfast_C::penalty", "")
                             .typed<at::Tensor(at::TensorList, double, double, double, c10::string_view)>();
  return op.call(params, l1, l2, group_lasso, groups);
}

BiasCorrections bias_corrections(at::TensorList steps, const std::optional<at::Tensor>& lr_tensor, double lr,
                                 double beta1, double beta2, const at::Device& device) {
  BiasCorrections out;
  const bool host_counts = std::all_of(steps.begin(), steps.end(), [](const at::Tensor& t) { return t.is_cpu(); });
  if (host_counts && !lr_tensor.has_value()) {
    out.step_size.reserve(steps.size());
    out.bc2_sqrt.reserve(steps.size());
    HostCounts host{lr, beta1, beta2};
    for (const auto& s : steps) {
      // A float32 count is incremented in place as _foreach_add_(steps, 1) would, without a dispatch per tensor.
      if (s.scalar_type() == at::kFloat && s.numel() == 1 && s.is_non_overlapping_and_dense()) {
        host.next(*s.data_ptr<float>());
        torch::autograd::impl::bump_version(s);
      } else {
        s.add_(1);
        host.at(s.item<double>());
      }
      out.step_size.push_back(host.step_size);
      out.bc2_sqrt.push_back(host.bc2_sqrt);
    }
    return out;
  }
  at::_foreach_add_(steps, 1);
  std::vector<at::Tensor> counts;
  counts.reserve(steps.size());
  for (const auto& t : steps) counts.push_back(t.to(device));
  out.bc1 = at::_foreach_pow(beta1, counts);
  out.bc2 = at::_foreach_pow(beta2, counts);
  at::_foreach_sub_(out.bc1, 1);
  at::_foreach_sub_(out.bc2, 1);
  at::_foreach_neg_(out.bc2);
  if (lr_tensor.has_value()) {
    at::_foreach_div_(out.bc1, *lr_tensor);
  } else {
    at::_foreach_div_(out.bc1, lr);
  }
  at::_foreach_reciprocal_(out.bc1);
  at::_foreach_sqrt_(out.bc2);
  return out;
}

at::Tensor step_then_group_shrink(at::TensorList params, at::TensorList grads, FusedStep fused,
                                  const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
                                  double group_lasso, c10::string_view groups, bool compute_penalty) {
  parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  std::vector<at::Tensor> work, g;
  const bool copies = working_copies(params, grads, work, g);
  fused(work, g);
  // prox_ with step lr/(1 + 2·lr·l2) and only the group term shrinks u_g by the factor above.
  const auto acc = acc_type(params[0].scalar_type());
  if (lr_tensor.has_value()) {
    at::Tensor step = lr_tensor->to(params[0].device(), acc);
    if (l2 != 0) step = step / step.mul(2).mul(l2).add(1);
    call_prox(work, step, 0.0, 0.0, 0.0, group_lasso, groups);
  } else {
    const double step = l2 != 0 ? lr / (1 + 2 * lr * l2) : lr;
    call_prox(work, std::nullopt, step, 0.0, 0.0, group_lasso, groups);
  }
  if (copies) narrow_back(params, work);
  return finish(params, l1, l2, group_lasso, groups, compute_penalty);
}

at::Tensor adamw_metric_group_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                                   double group_lasso, c10::string_view groups, bool compute_penalty) {
  const Grouping grouping = parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc = acc_type(params[0].scalar_type());
  const auto device = params[0].device();
  const std::optional<at::Tensor> lr_t =
      lr_tensor.has_value() ? std::optional<at::Tensor>(lr_tensor->to(device, acc)) : std::nullopt;
  std::vector<at::Tensor> work, g;
  const bool copies = working_copies(params, grads, work, g);
  if (maximize) g = at::_foreach_neg(g);
  // The floors read the weights before the step; the step counts are incremented with the bias corrections.
  const std::vector<at::Tensor> floors = penalty_gradient_scales(work, l1, l2, group_lasso, grouping);
  if (weight_decay != 0) {
    if (lr_t.has_value()) {
      at::_foreach_mul_(work, at::rsub(*lr_t * weight_decay, 1));
    } else {
      at::_foreach_mul_(work, 1 - lr * weight_decay);
    }
  }
  at::_foreach_lerp_(exp_avgs, g, 1 - beta1);
  at::_foreach_mul_(exp_avg_sqs, beta2);
  at::_foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2);
  g.clear();
  at::TensorList second = exp_avg_sqs;
  if (amsgrad) {
    at::_foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs);
    second = max_exp_avg_sqs;
  }
  std::vector<at::Tensor> denom = at::_foreach_sqrt(second);
  const BiasCorrections bc = bias_corrections(steps, lr_t, lr, beta1, beta2, device);
  if (bc.on_host()) {
    const std::vector<at::Scalar> step_size(bc.step_size.begin(), bc.step_size.end());
    const std::vector<at::Scalar> bc2_sqrt(bc.bc2_sqrt.begin(), bc.bc2_sqrt.end());
    at::_foreach_div_(denom, bc2_sqrt);
    at::_foreach_add_(denom, eps);
    at::_foreach_maximum_(denom, floors);
    at::_foreach_addcdiv_(work, exp_avgs, denom, step_size);
  } else {
    at::_foreach_div_(denom, bc.bc2);
    at::_foreach_add_(denom, eps);
    at::_foreach_maximum_(denom, floors);
    at::_foreach_addcdiv_(work, exp_avgs, at::_foreach_div(denom, bc.bc1));
  }
  for (size_t i = 0; i < work.size(); ++i) {
    // Python's lr / d: a tensor lr divides, a float one multiplies d's reciprocal.
    at::Tensor step = lr_t.has_value() ? *lr_t / denom[i] : denom[i].reciprocal() * lr;
    metric_prox_(work[i], step, l1, l2, group_lasso, grouping);
  }
  if (copies) narrow_back(params, work);
  return finish(params, l1, l2, group_lasso, groups, compute_penalty);
}

}  // namespace regfast
