// The host side of the CUDA launcher, shared by the ops' CUDA implementations (*_cuda.cpp): the
// per-call tables (tensor table, (tensor, chunk) work list, group list, optimizer state pointers) as
// device tables cached on their contents (table_cache.h: a list seen before costs no host-to-device
// copy, and a table a captured CUDA graph reads stays valid for its replays), and the group norms with
// their coefficients. Nothing here synchronizes with the host.
//
// Compiled only when the CUDA kernels are (REGFAST_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <array>
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
  const cuda::GroupPiece* pieces = nullptr;  // every group in pieces of at most kChunk elements
  const int64_t* piece_first = nullptr;      // group q's pieces: [piece_first[q], piece_first[q + 1])
  int64_t nitems = 0;
  int64_t npieces = 0;
  int64_t total_groups = 0;
};

// The device copy of `words` (int64) on `device`, from the table cache: copied (asynchronously, from pinned
// memory) only the first time these words are asked for on this device.
at::Tensor device_table(const std::vector<int64_t>& words, const at::Device& device);

// The table cache's (entries, entries kept for captured graphs, hits, misses).
std::array<size_t, 4> table_cache_stats();

// The tables of one call over `ws` (contiguous; `others`, when given, the second tensor of each entry:
// grads or outputs), with the group list of `grouping` when given.
DeviceList build(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>* others,
                 std::optional<Grouping> grouping);

// `ts` is one group: CUDA tensors of one device and dtype.
void check_cuda_group(at::TensorList ts, const char* name);

// The options of `like` in its accumulation dtype.
at::TensorOptions acc_options(const at::Tensor& like);

// A tensor lr as the kernels read it: a device lr moved to the params' device in `opts` (their accumulation
// dtype); a CPU lr read here, on the host where it lives (no copy, no sync), rounded to that dtype. A CPU lr is
// refused inside a CUDA graph capture: every replay would reuse its value at capture.
struct LrArg {
  bool tensor = false;  // a tensor lr was given
  at::Tensor device;    // a device lr in the accumulation dtype
  double value = 0;     // a CPU lr's value, exact in the accumulation dtype
  const void* ptr() const { return device.defined() ? device.data_ptr() : nullptr; }
  // The tensor lr as a 0-dim device tensor in `opts` (a CPU lr's: filled on the device, no copy).
  at::Tensor on_device(const at::TensorOptions& opts) const {
    return device.defined() ? device : at::scalar_tensor(value, opts);
  }
};
LrArg lr_arg(const std::optional<at::Tensor>& lr_tensor, const at::TensorOptions& opts);

// Per-group ‖u_g‖ and √|g|, both double (u = w, or the elastic-net step of w when `step` is set).
std::tuple<at::Tensor, at::Tensor> group_norms(const std::vector<at::Tensor>& ws, const DeviceList& dl,
                                               const cuda::Step* step);

// The group coefficient weight/norm (double, per group) as the pair (q, p): p a power of two, 1 unless the
// exponent of weight/norm is beyond ±60 (tiny or huge weights), where q and p each carry about half of it,
// so that q, p and w·p all stay within the accumulation dtype's range; q·(w·p) = weight·w/norm. A zero
// group gets q = 0, p = 1.
std::tuple<at::Tensor, at::Tensor> split_coefficients(const at::Tensor& weight, const at::Tensor& norm);

// A proximal step for the kernels: the tensor lr when given, else the float `lr` with its elastic-net
// scalars computed here in double.
cuda::Step make_step(const LrArg& lr_t, double lr, double l1, double l2);

// Per-tensor Σ|w| and Σw² of `ws` (contiguous, one device and dtype), each 1-D in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> per_tensor_norms(const std::vector<at::Tensor>& ws);

}  // namespace regfast
