// The CPU optimizer steps over a table of tensors: what the ops run after their checks
// (optim_cpu.cpp), and what the host path runs straight from its walk (host_path.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "optim_cpu.h"

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

}  // namespace optim_cpu
}  // namespace regfast
