// The host side of the CUDA launcher (see cuda_tables.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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
#include "table_cache.h"
#include "tensor_list.h"

namespace regfast {

static_assert(sizeof(cuda::TensorMeta) == 6 * sizeof(int64_t), "TensorMeta is packed into int64 words");
static_assert(sizeof(cuda::WorkItem) == 3 * sizeof(int64_t), "WorkItem is packed into int64 words");
static_assert(sizeof(cuda::GroupPiece) == 4 * sizeof(int64_t), "GroupPiece is packed into int64 words");

namespace {

// A device table of the cache (table_cache.h): the words on the device, and the pinned host copy they were
// copied from when that copy was made during a capture (the graph copies from it again at every replay, so
// it lives as long as the entry: forever).
struct DeviceTable {
  at::Tensor device;
  at::Tensor staging;
  c10::StreamId home = 0;            // the stream the device memory was allocated on
  std::vector<c10::StreamId> users;  // other streams that read it (recorded with the allocator)
};

// 64 tables or 2^25 words (256 MiB) on the devices, beyond those read by captured graphs.
TableCache<DeviceTable>& table_cache() {
  static TableCache<DeviceTable> cache(64, size_t{1} << 25);
  return cache;
}

void copy_words(const DeviceTable& t, int64_t words, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemcpyAsync(t.device.data_ptr(), t.staging.data_ptr(), sizeof(int64_t) * words,
                                 cudaMemcpyHostToDevice, stream));
}

}  // namespace

at::Tensor device_table(const std::vector<int64_t>& words, const at::Device& device) {
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const int64_t n = static_cast<int64_t>(words.size());
  const auto pinned = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  auto upload = [&](const std::vector<int64_t>& w, bool in_capture) {
    DeviceTable t;
    t.home = stream.id();
    if (!in_capture) {  // an ordinary asynchronous copy: the host allocator keeps the pinned block until it is done
      at::Tensor host = at::empty({n}, pinned);
      std::memcpy(host.data_ptr<int64_t>(), w.data(), sizeof(int64_t) * n);
      t.device = host.to(device, /*non_blocking=*/true);
      return t;
    }
    {  // the host allocator may query events, which a capture in global mode forbids this thread
      c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      t.staging = at::empty({n}, pinned);
    }
    std::memcpy(t.staging.data_ptr<int64_t>(), w.data(), sizeof(int64_t) * n);
    t.device = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
    copy_words(t, n, stream);
    return t;
  };
  auto refill = [&](DeviceTable& t, const std::vector<int64_t>&) { copy_words(t, n, stream); };
  auto use = [&](DeviceTable& t) {
    if (stream.id() != t.home && std::find(t.users.begin(), t.users.end(), stream.id()) == t.users.end()) {
      t.device.record_stream(stream);
      t.users.push_back(stream.id());
    }
    return t.device;
  };
  return table_cache().get(device.index(), words, capturing, upload, refill, use);
}

std::array<size_t, 4> table_cache_stats() {
  const auto& cache = table_cache();
  return {cache.entries(), cache.kept(), cache.hits(), cache.misses()};
}

DeviceList build(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>* others,
                 std::optional<Grouping> grouping) {
  const int64_t nt = static_cast<int64_t>(ws.size());
  std::vector<cuda::TensorMeta> meta(nt);
  std::vector<cuda::WorkItem> items;
  std::vector<cuda::GroupPiece> pieces;
  std::vector<int64_t> first(nt + 1), piece_first;
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
      const int64_t size = n / s.ngroups;
      for (int64_t g = 0; g < s.ngroups; ++g) {
        piece_first.push_back(static_cast<int64_t>(pieces.size()));
        for (int64_t b = 0; b < size; b += cuda::kChunk) pieces.push_back({t, g, b, std::min(size, b + cuda::kChunk)});
      }
      group_offset += s.ngroups;
    }
  }
  first[nt] = static_cast<int64_t>(items.size());
  const int64_t ngroups = static_cast<int64_t>(piece_first.size());
  if (grouping.has_value()) piece_first.push_back(static_cast<int64_t>(pieces.size()));

  // Words: meta (6 per tensor), items (3 each), first (nt + 1), pieces (4 each), piece_first (groups + 1).
  const int64_t ni = static_cast<int64_t>(items.size()), np = static_cast<int64_t>(pieces.size());
  const int64_t at_items = 6 * nt, at_first = at_items + 3 * ni, at_pieces = at_first + nt + 1,
                at_piece_first = at_pieces + 4 * np;
  std::vector<int64_t> words(at_piece_first + static_cast<int64_t>(piece_first.size()));
  int64_t* h = words.data();
  std::memcpy(h, meta.data(), sizeof(cuda::TensorMeta) * nt);
  std::memcpy(h + at_items, items.data(), sizeof(cuda::WorkItem) * ni);
  std::memcpy(h + at_first, first.data(), sizeof(int64_t) * (nt + 1));
  std::memcpy(h + at_pieces, pieces.data(), sizeof(cuda::GroupPiece) * np);
  std::memcpy(h + at_piece_first, piece_first.data(), sizeof(int64_t) * piece_first.size());

  DeviceList dl;
  dl.buffer = device_table(words, ws[0].device());
  const int64_t* d = dl.buffer.data_ptr<int64_t>();
  dl.meta = reinterpret_cast<const cuda::TensorMeta*>(d);
  dl.items = reinterpret_cast<const cuda::WorkItem*>(d + at_items);
  dl.first = d + at_first;
  dl.pieces = reinterpret_cast<const cuda::GroupPiece*>(d + at_pieces);
  dl.piece_first = d + at_piece_first;
  dl.nitems = ni;
  dl.npieces = np;
  dl.total_groups = ngroups;
  return dl;
}

void check_cuda_group(at::TensorList ts, const char* name) { check_group(ts, name, c10::kCUDA); }

at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_type(like.scalar_type()));
}

LrArg lr_arg(const std::optional<at::Tensor>& lr_tensor, const at::TensorOptions& opts) {
  LrArg out;
  if (!lr_tensor.has_value()) return out;
  out.tensor = true;
  if (!lr_tensor->is_cpu()) {
    out.device = lr_tensor->to(opts).contiguous();
    return out;
  }
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  TORCH_CHECK(!capturing,
              "lr is a CPU tensor, whose value at capture a CUDA graph would replay forever: put lr on the "
              "params' device to change it between replays");
  out.value = lr_tensor->to(opts.dtype()).item<double>();
  return out;
}

// Per-group ‖u_g‖ and √|g|, both double (u = w, or the elastic-net step of w when `step` is set).
std::tuple<at::Tensor, at::Tensor> group_norms(const std::vector<at::Tensor>& ws, const DeviceList& dl,
                                               const cuda::Step* step) {
  const auto doubles = ws[0].options().dtype(at::kDouble);
  at::Tensor norm = at::empty({dl.total_groups}, doubles);
  at::Tensor root = at::empty_like(norm);
  at::Tensor scratch = at::empty({3 * (dl.npieces + dl.total_groups)}, doubles);
  double* piece_parts = scratch.data_ptr<double>();
  cuda::launch_group_norms(dtype_of(ws[0].scalar_type()), dl.pieces, dl.npieces, dl.piece_first, dl.total_groups,
                           dl.meta, step, piece_parts, piece_parts + 3 * dl.npieces, norm.data_ptr<double>(),
                           root.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
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

cuda::Step make_step(const LrArg& lr_t, double lr, double l1, double l2) {
  cuda::Step step{lr_t.ptr(), lr_t.tensor ? lr_t.value : lr, l1, l2, 0.0, 1.0, lr_t.tensor};
  elastic_scalars(lr, l1, l2, step.threshold, step.shrink);
  return step;
}

}  // namespace regfast
