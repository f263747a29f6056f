// The CPU optimizer steps over a table of tensors: what the ops run after their checks
// (optim_cpu.cpp), and what the host path runs straight from its walk (host_path.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "optim_cpu.h"
#include "tensor_list.h"

namespace regfast {
namespace optim_cpu {

// The scalars of one step, prepared as the reference prepares them. `step` is the lr: the float lr,
// or the lr tensor's value in the accumulation dtype (`lr_is_tensor`).
SgdArgs sgd_args(at::ScalarType dtype, double step, bool lr_is_tensor, double momentum, double dampening,
                 bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                 bool compute_penalty);
AdamWArgs adamw_args(at::ScalarType dtype, double step, bool lr_is_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool amsgrad, bool maximize, double l1, double l2, bool prox_lr,
                     bool compute_penalty);

// The step over contiguous tensors ts[i] of numels[i] elements, chunked over threads; returns
// l1·Σ|w| + l2·Σw² of the new params (computed in `acc`) when args.penalty, else 0.
double run_sgd(const SgdArgs& args, const std::vector<SgdTensor>& ts, const std::vector<int64_t>& numels,
               at::ScalarType acc, double l1, double l2);
double run_adamw(const AdamWArgs& args, const std::vector<AdamWTensor>& ts, const std::vector<int64_t>& numels,
                 at::ScalarType acc, double l1, double l2);

// The steps with group lasso over one (dtype) group of contiguous CPU tensors `params` with their grads, from their
// pointers ts (with their states' and, for AdamW, each param's bias corrections): the op's steps after its checks,
// with a float lr. `args`: sgd_args / adamw_args for the step with the elementwise prox and no penalty. Returns the
// penalty of the new params where compute_penalty; otherwise a value that the walk does not read (the block steps
// make none: an undefined tensor, where a zero made for nothing was about 2% of a `ProxSGD` step with group lasso
// at 2,000 one-element tensors in a perf profile).
at::Tensor sgd_group_step(const SgdArgs& args, const TensorRefs& params, const TensorRefs& grads,
                          const std::vector<SgdTensor>& ts, double lr, double l1, double l2, double group_lasso,
                          c10::string_view groups, bool compute_penalty);
at::Tensor adamw_group_step(const AdamWArgs& args, const TensorRefs& params, const TensorRefs& grads,
                            std::vector<AdamWTensor>& ts, bool prox_lr, double lr, double l1, double l2,
                            double group_lasso, c10::string_view groups, bool compute_penalty);

}  // namespace optim_cpu
}  // namespace regfast
