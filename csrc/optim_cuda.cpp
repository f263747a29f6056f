// CUDA implementations of regfast_C::sgd_step_ and adamw_step_: one launch that steps params and state
// and applies the elastic-net prox (optim.cu); group lasso after it (optim_common.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "cuda_tables.h"
#include "elementwise.h"
#include "groups.h"
#include "optim_common.h"
#include "tensor_list.h"

namespace regfast {

namespace {

// Per-param state pointers of an optimizer step, in device memory (a cached device table, kept alive by `buffer`).
struct DeviceState {
  at::Tensor buffer;
  const cuda::OptimState* state = nullptr;
};

DeviceState upload_state(const std::vector<std::vector<at::Tensor>>& lists, size_t n, const at::Device& device) {
  static_assert(sizeof(cuda::OptimState) == 3 * sizeof(int64_t), "OptimState is packed into int64 words");
  std::vector<int64_t> words(3 * n, 0);
  auto* h = reinterpret_cast<cuda::OptimState*>(words.data());
  for (size_t i = 0; i < n; ++i) {
    void* ptrs[3] = {nullptr, nullptr, nullptr};
    for (size_t k = 0; k < lists.size() && k < 3; ++k) {
      if (!lists[k].empty()) ptrs[k] = lists[k][i].data_ptr();
    }
    h[i] = {ptrs[0], ptrs[1], ptrs[2]};
  }
  DeviceState ds;
  ds.buffer = device_table(words, device);
  ds.state = reinterpret_cast<const cuda::OptimState*>(ds.buffer.data_ptr<int64_t>());
  return ds;
}

void check_step_lists(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states) {
  check_cuda_group(params, "params");
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  const auto acc = acc_type(params[0].scalar_type());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].device() == params[i].device() && grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].sizes() == params[i].sizes(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
    for (const auto& state : states) {
      TORCH_CHECK(state.size() == params.size(), "a state list and params differ in length");
      TORCH_CHECK(state[i].device() == params[i].device() && state[i].scalar_type() == acc &&
                      state[i].sizes() == params[i].sizes(),
                  "state of params[", i, "] must be a ", acc, " tensor of its shape on its device");
    }
  }
}

// The scalars of the step that do not depend on the device lr (see cuda::OptimScalars).
cuda::OptimScalars step_scalars(const LrArg& lr_t, double lr, double l1, double l2, double weight_decay) {
  cuda::OptimScalars s{};
  s.lr_ptr = lr_t.ptr();
  s.tensor_lr = lr_t.tensor;
  s.lr = lr_t.tensor ? lr_t.value : lr;
  elastic_scalars(lr, l1, l2, s.threshold, s.shrink);
  s.decay = 1.0 - lr * weight_decay;
  s.l1 = l1;
  s.l2 = l2;
  s.weight_decay = weight_decay;
  return s;
}

// l1·Σ|w| + l2·Σw² from the per-item partials of the new params (or a zero without them).
at::Tensor penalty_from_partials(const at::Tensor& partials, int64_t nitems, double l1, double l2,
                                 const at::TensorOptions& opts) {
  at::Tensor value = at::zeros({}, opts);
  if (!partials.defined()) return value;
  if (l1 != 0) value = value + partials.slice(0, 0, nitems).sum() * l1;
  if (l2 != 0) value = value + partials.slice(0, nitems, 2 * nitems).sum() * l2;
  return value;
}

// The one-pass step with the elementwise prox (no group lasso); params and state are checked.
at::Tensor sgd_fused(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                     bool compute_penalty) {
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  const auto bs = contiguous_all(momentum != 0 ? momentum_buffers : at::TensorList());
  const auto opts = acc_options(ws[0]);
  // A device lr stays on the device: the kernel reads it, the host never does (a CPU lr is read here).
  const LrArg lr_t = lr_arg(lr_tensor, opts);
  cuda::OptimScalars s = step_scalars(lr_t, lr, l1, l2, weight_decay);
  s.momentum = momentum;
  s.keep = 1.0 - dampening;
  s.momentum_mode = momentum == 0 ? Momentum::kNone : (init_buffers ? Momentum::kInit : Momentum::kUpdate);
  s.nesterov = nesterov;
  s.maximize = maximize;
  const DeviceList dl = build(ws, &static_cast<const std::vector<at::Tensor>&>(gs), std::nullopt);
  const DeviceState ds = upload_state({bs}, ws.size(), ws[0].device());
  const bool penalty = compute_penalty && (l1 != 0 || l2 != 0);
  const at::Tensor partials = penalty ? at::empty({2 * dl.nitems}, opts) : at::Tensor();
  cuda::launch_sgd_step(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, ds.state, s,
                        penalty ? partials.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_back(params, ws);
  if (!bs.empty()) write_back(momentum_buffers, bs);
  return penalty_from_partials(partials, dl.nitems, l1, l2, opts);
}

// AdamW's bias corrections (optim_common.h), (−lr/(1 − β1ᵗ), √(1 − β2ᵗ)) per param: in `s` when the counts are on
// the host and all equal (the usual case: no table), else one device tensor in the accumulation dtype (host
// values through one pinned buffer, device ones stay on the device).
at::Tensor bias_correction_table(at::TensorList steps, const LrArg& lr_t, double lr, double beta1, double beta2,
                                 const at::TensorOptions& opts, cuda::OptimScalars& s) {
  const std::optional<at::Tensor> lr_d = lr_t.tensor ? std::optional<at::Tensor>(lr_t.on_device(opts)) : std::nullopt;
  const BiasCorrections bc = bias_corrections(steps, lr_d, lr, beta1, beta2, opts.device());
  const int64_t n = static_cast<int64_t>(steps.size());
  if (!bc.on_host()) {
    return at::stack({at::stack(bc.bc1), at::stack(bc.bc2)}, 1).reshape({2 * n}).to(opts.dtype());
  }
  const auto differs = [&](const std::vector<double>& v) {
    return std::any_of(v.begin(), v.end(), [&](const double& x) { return std::memcmp(&x, v.data(), sizeof x) != 0; });
  };
  if (!differs(bc.step_size) && !differs(bc.bc2_sqrt)) {
    s.step_size = bc.step_size[0];
    s.bc2_sqrt = bc.bc2_sqrt[0];
    return at::Tensor();
  }
  at::Tensor host = at::empty({2 * n}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
  double* h = host.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    h[2 * i] = bc.step_size[i];
    h[2 * i + 1] = bc.bc2_sqrt[i];
  }
  return host.to(opts.device(), /*non_blocking=*/true).to(opts.dtype());
}

// The one-pass step with the elementwise prox (no group lasso); params and state are checked.
at::Tensor adamw_fused(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                       double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                       c10::string_view prox, bool compute_penalty) {
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  const auto m1 = contiguous_all(exp_avgs);
  const auto m2 = contiguous_all(exp_avg_sqs);
  const auto mx = contiguous_all(amsgrad ? max_exp_avg_sqs : at::TensorList());
  const auto opts = acc_options(ws[0]);
  const LrArg lr_t = lr_arg(lr_tensor, opts);
  cuda::OptimScalars s = step_scalars(lr_t, lr, l1, l2, weight_decay);
  s.beta1_weight = 1.0 - beta1;
  s.beta2 = beta2;
  s.beta2_weight = 1.0 - beta2;
  s.eps = eps;
  s.prox = l1 == 0 && l2 == 0 ? ProxMode::kNone : (prox == "lr" ? ProxMode::kLr : ProxMode::kPreconditioned);
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  const at::Tensor corrections = bias_correction_table(steps, lr_t, lr, beta1, beta2, opts, s);
  const DeviceList dl = build(ws, &static_cast<const std::vector<at::Tensor>&>(gs), std::nullopt);
  const DeviceState ds = upload_state({m1, m2, mx}, ws.size(), ws[0].device());
  const bool penalty = compute_penalty && (l1 != 0 || l2 != 0);
  const at::Tensor partials = penalty ? at::empty({2 * dl.nitems}, opts) : at::Tensor();
  cuda::launch_adamw_step(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, ds.state, s,
                          corrections.defined() ? corrections.data_ptr() : nullptr,
                          penalty ? partials.data_ptr() : nullptr,
                          c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_back(params, ws);
  write_back(exp_avgs, m1);
  write_back(exp_avg_sqs, m2);
  if (amsgrad) write_back(max_exp_avg_sqs, mx);
  return penalty_from_partials(partials, dl.nitems, l1, l2, opts);
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const std::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                         bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                         double group_lasso, c10::string_view groups, bool compute_penalty) {
  if (momentum != 0) {
    check_step_lists(params, grads, {momentum_buffers});
  } else {
    check_step_lists(params, grads, {});
  }
  if (group_lasso == 0) {
    return sgd_fused(params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov, weight_decay,
                     maximize, init_buffers, l1, l2, compute_penalty);
  }
  return step_then_group_shrink(
      params, grads,
      [&](at::TensorList ps, at::TensorList gs) {
        sgd_fused(ps, gs, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov, weight_decay, maximize,
                  init_buffers, l1, l2, false);
      },
      lr_tensor, lr, l1, l2, group_lasso, groups, compute_penalty);
}

at::Tensor adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                           const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                           double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                           double group_lasso, c10::string_view groups, c10::string_view prox,
                           bool compute_penalty) {
  if (amsgrad) {
    check_step_lists(params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  } else {
    check_step_lists(params, grads, {exp_avgs, exp_avg_sqs});
  }
  TORCH_CHECK(steps.size() == params.size(), "steps and params differ in length");
  TORCH_CHECK(prox == "lr" || prox == "preconditioned", "prox must be 'lr' or 'preconditioned', got '",
              std::string(prox), "'");
  if (group_lasso == 0) {
    return adamw_fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                       weight_decay, amsgrad, maximize, l1, l2, prox, compute_penalty);
  }
  if (prox == "preconditioned") {
    return adamw_metric_group_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1,
                                   beta2, eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups,
                                   compute_penalty);
  }
  return step_then_group_shrink(
      params, grads,
      [&](at::TensorList ps, at::TensorList gs) {
        adamw_fused(ps, gs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                    weight_decay, amsgrad, maximize, l1, l2, prox, false);
      },
      lr_tensor, lr, l1, l2, group_lasso, groups, compute_penalty);
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
}

}  // namespace regfast
