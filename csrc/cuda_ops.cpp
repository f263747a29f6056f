// CUDA implementations of the regfast_C ops: tensors in, work list built, kernels launched.
//
// Compiled only when the CUDA kernels are (REGFAST_WITH_CUDA). The kernels (norms.cu,
// penalty.cu, prox.cu, optim.cu) see plain pointers; this file builds the per-call metadata (tensor
// table, (tensor, chunk) work list, group list) in one pinned host buffer, copies it to the
// device with one asynchronous copy, and combines per-chunk partials with ATen ops. Nothing
// here synchronizes with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <optional>
#include <tuple>
#include <vector>

#include "groups.h"
#include "launch.h"
#include "optim_group.h"

namespace regfast {
namespace {

using cuda::DType;

static_assert(sizeof(cuda::TensorMeta) == 6 * sizeof(int64_t), "TensorMeta is packed into int64 words");
static_assert(sizeof(cuda::WorkItem) == 3 * sizeof(int64_t), "WorkItem is packed into int64 words");

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, "regfast_C: unsupported dtype ", t);
  }
}

// The device-side description of one call: every pointer points into `buffer`.
struct DeviceList {
  at::Tensor buffer;
  const cuda::TensorMeta* meta = nullptr;
  const cuda::WorkItem* items = nullptr;
  const int64_t* first = nullptr;
  const int64_t* groups = nullptr;
  int64_t nitems = 0;
  int64_t total_groups = 0;
};

DeviceList build(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>* others,
                 std::optional<Grouping> grouping) {
  const int64_t nt = static_cast<int64_t>(ws.size());
  std::vector<cuda::TensorMeta> meta(nt);
  std::vector<cuda::WorkItem> items;
  std::vector<int64_t> first(nt + 1), groups;
  int64_t group_offset = 0;
  for (int64_t t = 0; t < nt; ++t) {
    const at::Tensor& w = ws[t];
    const int64_t n = w.numel();
    GroupShape s{1, 1, n > 0 ? n : 1};
    if (grouping.has_value() && n > 0) s = group_shape(w, *grouping);
    meta[t] = {w.data_ptr(), others != nullptr ? (*others)[t].data_ptr() : nullptr, n, s.ngroups, s.inner,
               group_offset};
    first[t] = static_cast<int64_t>(items.size());
    for (int64_t b = 0; b < n; b += cuda::kChunk) items.push_back({t, b, std::min(n, b + cuda::kChunk)});
    if (grouping.has_value() && n > 0) {
      for (int64_t g = 0; g < s.ngroups; ++g) {
        groups.push_back(t);
        groups.push_back(g);
      }
      group_offset += s.ngroups;
    }
  }
  first[nt] = static_cast<int64_t>(items.size());

  const int64_t words = 6 * nt + 3 * static_cast<int64_t>(items.size()) + (nt + 1) + static_cast<int64_t>(groups.size());
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, meta.data(), sizeof(cuda::TensorMeta) * nt);
  std::memcpy(h + 6 * nt, items.data(), sizeof(cuda::WorkItem) * items.size());
  std::memcpy(h + 6 * nt + 3 * items.size(), first.data(), sizeof(int64_t) * (nt + 1));
  std::memcpy(h + 7 * nt + 1 + 3 * items.size(), groups.data(), sizeof(int64_t) * groups.size());

  DeviceList dl;
  dl.buffer = host.to(ws[0].device(), /*non_blocking=*/true);
  const int64_t* d = dl.buffer.data_ptr<int64_t>();
  dl.meta = reinterpret_cast<const cuda::TensorMeta*>(d);
  dl.items = reinterpret_cast<const cuda::WorkItem*>(d + 6 * nt);
  dl.first = d + 6 * nt + 3 * items.size();
  dl.groups = d + 7 * nt + 1 + 3 * items.size();
  dl.nitems = static_cast<int64_t>(items.size());
  dl.total_groups = static_cast<int64_t>(groups.size() / 2);
  return dl;
}

void check_group(at::TensorList ts, const char* name) {
  TORCH_CHECK(!ts.empty(), name, " must not be empty");
  const auto dtype = ts[0].scalar_type();
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.device() == ts[0].device() && t.scalar_type() == dtype, name,
                " must all be CUDA tensors of one device and dtype");
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

void write_back(at::TensorList originals, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < work.size(); ++i) {
    if (!originals[i].is_same(work[i])) originals[i].copy_(work[i]);
  }
}

at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_type(like.scalar_type()));
}

// Per-group ‖u_g‖ and √|g|, both double (u = w, or the elastic-net step of w when `step` is set).
std::tuple<at::Tensor, at::Tensor> group_norms(const std::vector<at::Tensor>& ws, const DeviceList& dl,
                                               const cuda::Step* step) {
  at::Tensor norm = at::empty({dl.total_groups}, ws[0].options().dtype(at::kDouble));
  at::Tensor root = at::empty_like(norm);
  cuda::launch_group_norms(dtype_of(ws[0].scalar_type()), dl.groups, dl.total_groups, dl.meta, step,
                           norm.data_ptr<double>(), root.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm, root};
}

// The group coefficient weight/norm (double, per group) as the pair (q, p): p a power of two, 1 unless the
// exponent of weight/norm is beyond ±60 (tiny or huge weights), where q and p each carry about half of it,
// so that q, p and w·p all stay within the accumulation dtype's range; q·(w·p) = weight·w/norm. A zero
// group gets q = 0, p = 1.
std::tuple<at::Tensor, at::Tensor> split_coefficients(const at::Tensor& weight, const at::Tensor& norm) {
  const at::Tensor usable = (weight > 0) & at::isfinite(weight) & (norm > 0) & at::isfinite(norm);
  const at::Tensor ew = std::get<1>(at::frexp(at::where(usable, weight, 1.0)));
  const at::Tensor en = std::get<1>(at::frexp(at::where(usable, norm, 1.0)));
  const at::Tensor e = ew - en;
  const at::Tensor half = at::where(usable & ((e <= -60) | (e >= 60)), at::floor_divide(e, 2), 0);
  const at::Tensor p = at::ldexp(at::ones_like(norm), half);
  const at::Tensor q = at::where(norm == 0, 0.0, weight / (at::where(norm == 0, 1.0, norm) * p));
  return {q, p};
}

std::tuple<at::Tensor, at::Tensor> norms_cuda(at::TensorList params) {
  check_group(params, "params");
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const DeviceList dl = build(ws, nullptr, std::nullopt);
  const int64_t nt = static_cast<int64_t>(ws.size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = dtype_of(ws[0].scalar_type());
  at::Tensor partials = at::empty({2 * dl.nitems}, acc_options(ws[0]));
  cuda::launch_norms(dt, dl.items, dl.nitems, dl.meta, partials.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out = at::empty({2 * nt}, acc_options(ws[0]));
  cuda::launch_sum_partials(dt, partials.data_ptr(), dl.nitems, dl.first, nt, out.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out.slice(0, 0, nt), out.slice(0, nt, 2 * nt)};
}

at::Tensor penalty_cuda(at::TensorList params, double l1, double l2, double gl, c10::string_view groups) {
  check_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor value = at::zeros({}, acc_options(params[0]));
  if (l1 != 0 || l2 != 0) {
    const auto [per_l1, per_l2sq] = norms_cuda(params);
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
  check_group(params, "params");
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
  check_group(params, "params");
  check_group(grads, "grads");
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type(),
                "grads[", i, "] does not match params[", i, "] in shape or dtype");
  }
  const Grouping grouping = parse_grouping(groups);
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  at::Tensor value = grad_pass(ws, gs, true, l1, l2, gl, grouping, nullptr);
  write_back(grads, gs);
  return value;
}

void prox_cuda(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
               double gl, c10::string_view groups) {
  check_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto opts = acc_options(ws[0]);
  // The step stays on the device: a tensor lr is read by the kernels, never by the host.
  const at::Tensor lr_dev = lr_tensor.has_value() ? lr_tensor->to(opts).contiguous() : at::Tensor();
  const cuda::Step step{lr_dev.defined() ? lr_dev.data_ptr() : nullptr, lr, l1, l2};
  const DeviceList dl = build(ws, nullptr, gl != 0 ? std::optional<Grouping>(grouping) : std::nullopt);
  at::Tensor factor;
  if (gl != 0) {
    const auto [norm, root] = group_norms(ws, dl, &step);
    const at::Tensor lr_t = lr_dev.defined() ? lr_dev : at::scalar_tensor(lr, opts);
    at::Tensor c = lr_t.to(at::kDouble) * gl * root;
    if (l2 != 0) c = c / (lr_t * (2 * l2) + 1).to(at::kDouble);
    // In double: a tiny norm gives c/norm = inf and factor 0. clamp_min keeps NaN, so a NaN group stays NaN;
    // a zero group stays zero.
    factor = at::where(norm == 0, 0.0, (1 - c / at::where(norm == 0, 1.0, norm)).clamp_min(0)).to(opts);
  }
  cuda::launch_prox(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, step,
                    gl != 0 ? factor.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_back(params, ws);
}


// Per-param state pointers of an optimizer step, in device memory (kept alive by `buffer`).
struct DeviceState {
  at::Tensor buffer;
  const cuda::OptimState* state = nullptr;
};

DeviceState upload_state(const std::vector<std::vector<at::Tensor>>& lists, size_t n, const at::Device& device) {
  static_assert(sizeof(cuda::OptimState) == 3 * sizeof(int64_t), "OptimState is packed into int64 words");
  at::Tensor host = at::zeros({static_cast<int64_t>(3 * n)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* h = reinterpret_cast<cuda::OptimState*>(host.data_ptr<int64_t>());
  for (size_t i = 0; i < n; ++i) {
    void* ptrs[3] = {nullptr, nullptr, nullptr};
    for (size_t k = 0; k < lists.size() && k < 3; ++k) {
      if (!lists[k].empty()) ptrs[k] = lists[k][i].data_ptr();
    }
    h[i] = {ptrs[0], ptrs[1], ptrs[2]};
  }
  DeviceState ds;
  ds.buffer = host.to(device, /*non_blocking=*/true);
  ds.state = reinterpret_cast<const cuda::OptimState*>(ds.buffer.data_ptr<int64_t>());
  return ds;
}

void check_step_lists(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states) {
  check_group(params, "params");
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
cuda::OptimScalars step_scalars(const at::Tensor& lr_dev, double lr, double l1, double l2, double weight_decay) {
  cuda::OptimScalars s{};
  s.lr_ptr = lr_dev.defined() ? lr_dev.data_ptr() : nullptr;
  s.lr = lr;
  s.threshold = lr * l1;
  s.shrink = l2 != 0 ? 1.0 / (1.0 + 2.0 * lr * l2) : 1.0;
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
  const auto bs = momentum != 0 ? contiguous_all(momentum_buffers) : std::vector<at::Tensor>();
  const auto opts = acc_options(ws[0]);
  // A tensor lr stays on the device: the kernel reads it, the host never does.
  const at::Tensor lr_dev = lr_tensor.has_value() ? lr_tensor->to(opts).contiguous() : at::Tensor();
  cuda::OptimScalars s = step_scalars(lr_dev, lr, l1, l2, weight_decay);
  s.momentum = momentum;
  s.keep = 1.0 - dampening;
  s.momentum_mode = momentum == 0 ? cuda::kMomentumNone : (init_buffers ? cuda::kMomentumInit : cuda::kMomentumUpdate);
  s.nesterov = nesterov;
  s.maximize = maximize;
  const DeviceList dl = build(ws, &gs, std::nullopt);
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

// Per param (−lr/(1 − β1ᵗ), √(1 − β2ᵗ)) on the device, after incrementing the step counts; as
// the reference computes them: in double from CPU counts and a float lr, else with foreach ops on
// the count tensors (on the device, no host sync).
at::Tensor bias_corrections(at::TensorList steps, const at::Tensor& lr_dev, double lr, double beta1, double beta2,
                            const at::TensorOptions& opts) {
  at::_foreach_add_(steps, 1);
  const int64_t n = static_cast<int64_t>(steps.size());
  const bool host_counts = std::all_of(steps.begin(), steps.end(), [](const at::Tensor& t) { return t.is_cpu(); });
  if (host_counts && !lr_dev.defined()) {
    at::Tensor host = at::empty({2 * n}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
    double* h = host.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) {
      const double t = steps[i].item<double>();
      h[2 * i] = (lr / (1.0 - std::pow(beta1, t))) * -1.0;
      h[2 * i + 1] = std::pow(1.0 - std::pow(beta2, t), 0.5);
    }
    return host.to(opts.device(), /*non_blocking=*/true).to(opts.dtype());
  }
  std::vector<at::Tensor> counts;
  counts.reserve(n);
  for (const auto& t : steps) counts.push_back(t.to(opts.device()));
  auto bc1 = at::_foreach_pow(beta1, counts);
  auto bc2 = at::_foreach_pow(beta2, counts);
  at::_foreach_sub_(bc1, 1);
  at::_foreach_sub_(bc2, 1);
  at::_foreach_neg_(bc2);
  if (lr_dev.defined()) {
    at::_foreach_div_(bc1, lr_dev);
  } else {
    at::_foreach_div_(bc1, lr);
  }
  at::_foreach_reciprocal_(bc1);
  at::_foreach_sqrt_(bc2);
  return at::stack({at::stack(bc1), at::stack(bc2)}, 1).reshape({2 * n}).to(opts.dtype());
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
  const auto mx = amsgrad ? contiguous_all(max_exp_avg_sqs) : std::vector<at::Tensor>();
  const auto opts = acc_options(ws[0]);
  const at::Tensor lr_dev = lr_tensor.has_value() ? lr_tensor->to(opts).contiguous() : at::Tensor();
  cuda::OptimScalars s = step_scalars(lr_dev, lr, l1, l2, weight_decay);
  s.beta1_weight = 1.0 - beta1;
  s.beta2 = beta2;
  s.beta2_weight = 1.0 - beta2;
  s.eps = eps;
  s.prox = l1 == 0 && l2 == 0 ? cuda::kProxNone : (prox == "lr" ? cuda::kProxLr : cuda::kProxPreconditioned);
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  const at::Tensor corrections = bias_corrections(steps, lr_dev, lr, beta1, beta2, opts);
  const DeviceList dl = build(ws, &gs, std::nullopt);
  const DeviceState ds = upload_state({m1, m2, mx}, ws.size(), ws[0].device());
  const bool penalty = compute_penalty && (l1 != 0 || l2 != 0);
  const at::Tensor partials = penalty ? at::empty({2 * dl.nitems}, opts) : at::Tensor();
  cuda::launch_adamw_step(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, ds.state, s,
                          corrections.data_ptr(), penalty ? partials.data_ptr() : nullptr,
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
  m.impl("norms", &norms_cuda);
  m.impl("penalty", &penalty_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("add_penalty_grad_", &add_penalty_grad_cuda);
  m.impl("prox_", &prox_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
}

}  // namespace regfast
