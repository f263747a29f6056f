// The host code the fused optimizer steps share across devices: AdamW's bias corrections, and group
// lasso.
//
// A fused step applies the elementwise prox (l1, l2) in its one pass over the params; the group
// shrink needs every group's norm after the update, so it runs after that pass, through the
// device's own regfast_C::prox_ group passes. The two cases where the step's rounding or metric
// forbids that split have their own path here, composed of ATen ops (see optim_common.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <vector>

namespace regfast {

// AdamW's per-param −lr/(1 − β1ᵗ) and √(1 − β2ᵗ), after incrementing the step counts, computed as
// the reference computes them: in double (C pow) from CPU counts and a float lr (`step_size`,
// `bc2_sqrt`), else with foreach ops on the counts taken to `device` (`bc1`, `bc2`: 0-dim tensors, no
// host sync). `lr_tensor`, when given, is already on `device` in the accumulation dtype.
struct BiasCorrections {
  std::vector<double> step_size, bc2_sqrt;
  std::vector<at::Tensor> bc1, bc2;
  bool on_host() const { return bc1.empty(); }
};

// −lr/(1 − β1ᵗ) and √(1 − β2ᵗ) of the count t, in double (C pow), as the reference computes them.
inline void host_bias_corrections(double t, double lr, double beta1, double beta2, double& step_size,
                                  double& bc2_sqrt) {
  step_size = (lr / (1.0 - std::pow(beta1, t))) * -1.0;
  bc2_sqrt = std::pow(1.0 - std::pow(beta2, t), 0.5);
}

// The host counts of a step, one at a time: `at(t)` sets `step_size` and `bc2_sqrt` to the corrections of the count
// t, computed only when it differs from the last one (the counts of a model are mostly one value); `next(count)`
// first adds 1 to a float32 count in place (t + 1 rounded to float32, as add_(1) rounds it).
struct HostCounts {
  double lr, beta1, beta2;
  double last_t = -1, step_size = 0, bc2_sqrt = 0;

  void at(double t) {
    if (t != last_t) {
      last_t = t;
      host_bias_corrections(t, lr, beta1, beta2, step_size, bc2_sqrt);
    }
  }

  void next(float& count) {
    count = count + 1.0f;
    at(count);
  }
};

BiasCorrections bias_corrections(at::TensorList steps, const std::optional<at::Tensor>& lr_tensor, double lr,
                                 double beta1, double beta2, const at::Device& device);

// The device's regfast_C::penalty of params, reached through the dispatcher.
at::Tensor call_penalty(at::TensorList params, double l1, double l2, double group_lasso, c10::string_view groups);

// The device's fused step on (params, grads), without group lasso and without the penalty.
using FusedStep = c10::function_ref<void(at::TensorList params, at::TensorList grads)>;

// `fused`, then the group part of the prox with the scalar step lr (SGD, AdamW with prox="lr"):
// u_g ← max(0, 1 − lr·group_lasso·√|g| / ((1 + 2·lr·l2)·‖u_g‖₂))·u_g. Float16 / bfloat16 params
// are stepped and shrunk in float32 copies and rounded once, as the reference does. Returns the
// penalty of the new params when compute_penalty, else a 0-dim zero (accumulation dtype).
at::Tensor step_then_group_shrink(at::TensorList params, at::TensorList grads, FusedStep fused,
                                  const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
                                  double group_lasso, c10::string_view groups, bool compute_penalty);

// AdamW with prox="preconditioned" and group lasso: the step of regfast/reference/optim.py
// (Adam's denominator floored by the penalty's gradient size, then the exact group prox in that
// diagonal metric, found by Newton's method per group), op for op in ATen: the CUDA backend's step.
// The CPU's runs the group passes of optim_cpu_groups.h around its one-pass step (optim_cpu.cpp).
at::Tensor adamw_metric_group_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                                   double group_lasso, c10::string_view groups, bool compute_penalty);

}  // namespace regfast
