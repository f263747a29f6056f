// The host side of the CUDA launcher, shared by the ops' CUDA implementations (*_cuda.cpp): the
// per-call tables (tensor table, (tensor, chunk) work list, group list) built in one pinned host
// buffer and copied to the device with one asynchronous copy, the optimizer state pointers, and the
// group norms with their coefficients. Nothing here synchronizes with the host.
//
// Compiled only when the CUDA kernels are (REGFAST_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "groups.h"

namespace regfast {

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

// The tables of one call over `ws` (contiguous; `others`, when given, the second tensor of each entry:
// grads or outputs), with the group list of `grouping` when given.
DeviceList build(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>* others,
                 std::optional<Grouping> grouping);

// `ts` is one group: CUDA tensors of one device and dtype.
void check_cuda_group(at::TensorList ts, const char* name);

// The options of `like` in its accumulation dtype.
at::TensorOptions acc_options(const at::Tensor& like);

// A tensor lr as the kernels read it: on the params' device, in `opts` (their accumulation dtype), or
// undefined without one. A CPU lr is refused inside a CUDA graph capture: it would be copied once, at
// capture, and every replay would reuse that value.
at::Tensor device_lr(const std::optional<at::Tensor>& lr_tensor, const at::TensorOptions& opts);

// Per-group ‖u_g‖ and √|g|, both double (u = w, or the elastic-net step of w when `step` is set).
std::tuple<at::Tensor, at::Tensor> group_norms(const std::vector<at::Tensor>& ws, const DeviceList& dl,
                                               const cuda::Step* step);

// The group coefficient weight/norm (double, per group) as the pair (q, p): p a power of two, 1 unless the
// exponent of weight/norm is beyond ±60 (tiny or huge weights), where q and p each carry about half of it,
// so that q, p and w·p all stay within the accumulation dtype's range; q·(w·p) = weight·w/norm. A zero
// group gets q = 0, p = 1.
std::tuple<at::Tensor, at::Tensor> split_coefficients(const at::Tensor& weight, const at::Tensor& norm);

// A proximal step for the kernels: the device lr (`lr_dev`, accumulation dtype) when defined, else the
// float `lr` with its elastic-net scalars computed here in double.
cuda::Step make_step(const at::Tensor& lr_dev, double lr, double l1, double l2);

// Per-tensor Σ|w| and Σw² of `ws` (contiguous, one device and dtype), each 1-D in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> per_tensor_norms(const std::vector<at::Tensor>& ws);

}  // namespace regfast
