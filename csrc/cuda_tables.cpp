// The host side of the CUDA launcher (see cuda_tables.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
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
#include "tensor_list.h"

namespace regfast {

static_assert(sizeof(cuda::TensorMeta) == 6 * sizeof(int64_t), "TensorMeta is packed into int64 words");
static_assert(sizeof(cuda::WorkItem) == 3 * sizeof(int64_t), "WorkItem is packed into int64 words");

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

void check_cuda_group(at::TensorList ts, const char* name) { check_group(ts, name, c10::kCUDA); }

at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_type(like.scalar_type()));
}

at::Tensor device_lr(const std::optional<at::Tensor>& lr_tensor, const at::TensorOptions& opts) {
  if (!lr_tensor.has_value()) return at::Tensor();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  TORCH_CHECK(!lr_tensor->is_cpu() || !capturing,
              "lr is a CPU tensor, whose value at capture a CUDA graph would replay forever: put lr on the "
              "params' device to change it between replays");
  return lr_tensor->to(opts).contiguous();
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

cuda::Step make_step(const at::Tensor& lr_dev, double lr, double l1, double l2) {
  cuda::Step step{lr_dev.defined() ? lr_dev.data_ptr() : nullptr, lr, l1, l2, 0.0, 1.0};
  elastic_scalars(lr, l1, l2, step.threshold, step.shrink);
  return step;
}

}  // namespace regfast
