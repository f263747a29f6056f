// CUDA implementation of regfast_C::prox_: the group factors from the group norms of the elastic-net
// step (group_norms.cu), then one launch that steps and scales every element (prox.cu).
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

void prox_cuda(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
               double gl, c10::string_view groups) {
  check_cuda_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto ws = contiguous_all(params);
  const auto opts = acc_options(ws[0]);
  // A device lr is read by the kernels, never by the host; a CPU lr is read here (cuda_tables.h).
  const LrArg lr_t = lr_arg(lr_tensor, opts);
  const cuda::Step step = make_step(lr_t, lr, l1, l2);
  const DeviceList dl = build(ws, nullptr, gl != 0 ? std::optional<Grouping>(grouping) : std::nullopt);
  at::Tensor factor;
  if (gl != 0) {
    const auto [norm, root] = group_norms(ws, dl, &step);
    const at::Tensor lr_d = lr_t.tensor ? lr_t.on_device(opts) : at::scalar_tensor(lr, opts);
    at::Tensor c = lr_d.to(at::kDouble) * gl * root;
    if (l2 != 0) c = c / (lr_d * (2 * l2) + 1).to(at::kDouble);
    // In double: a tiny norm gives c/norm = inf and factor 0. clamp_min keeps NaN, so a NaN group stays NaN;
    // a zero group stays zero.
    factor = at::where(norm == 0, 0.0, (1 - c / at::where(norm == 0, 1.0, norm)).clamp_min(0)).to(opts);
  }
  cuda::launch_prox(dtype_of(ws[0].scalar_type()), dl.items, dl.nitems, dl.meta, step,
                    gl != 0 ? factor.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_back(params, ws);
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CUDA, m) {
  m.impl("prox_", &prox_cuda);
}

}  // namespace regfast
