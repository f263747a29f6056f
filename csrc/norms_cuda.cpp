// CUDA implementation of regfast_C::norms: one launch for the per-item partials, one for their
// per-tensor sums in item order (norms.cu).
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

std::tuple<at::Tensor, at::Tensor> per_tensor_norms(const std::vector<at::Tensor>& ws) {
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

namespace {

std::tuple<at::Tensor, at::Tensor> norms_cuda(at::TensorList params) {
  check_cuda_group(params, "params");
  c10::cuda::CUDAGuard guard(params[0].device());
  return per_tensor_norms(contiguous_all(params));
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CUDA, m) {
  m.impl("norms", &norms_cuda);
}

}  // namespace regfast
