// The group norms of penalty, add_penalty_grad_, penalty_backward and prox_: ‖u_g‖₂ of every group,
// u = w or the elastic-net step of w, and √|g|.
#include "cuda_launch.h"
#include "norm_parts.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {

// One block per group: ‖u_g‖₂ over the group's elements [o, g, k] in double, in a fixed thread order,
// without overflow or underflow (norm_parts.h: one part, or three for double), and √|g|.
template <typename T>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const int64_t* groups, int64_t total,
                                                              const TensorMeta* meta, Step step, bool elastic,
                                                              double* norm, double* root) {
  using A = acc_t<T>;
  constexpr int kParts = std::is_same<A, double>::value ? 3 : 1;
  __shared__ double shared[kThreads / 32];
  ElasticStep<A> u{};
  if (elastic) u = elastic_of<A>(step);
  for (int64_t q = blockIdx.x; q < total; q += gridDim.x) {
    const TensorMeta m = meta[groups[2 * q]];
    const int64_t g = groups[2 * q + 1];
    const T* w = static_cast<const T*>(m.data);
    const int64_t size = m.numel / m.ngroups, row = m.ngroups * m.inner;
    double parts[3] = {0, 0, 0};
    for (int64_t j = threadIdx.x; j < size; j += blockDim.x) {
      const int64_t i = (j / m.inner) * row + g * m.inner + j % m.inner;
      A x = to_acc<A>(w[i]);
      if (elastic) x = u(x);
      add_square<kParts>(parts, 1, static_cast<double>(x));
    }
    for (int p = 0; p < kParts; ++p) parts[p] = block_sum(parts[p], shared);
    if (threadIdx.x == 0) {
      norm[q] = norm_from_parts(parts[0], parts[1], parts[2], kParts);
      root[q] = sqrt(static_cast<double>(size));
    }
  }
}

void launch_group_norms(DType dtype, const int64_t* groups, int64_t total_groups, const TensorMeta* meta,
                        const Step* step, double* norm, double* root, cudaStream_t stream) {
  if (total_groups == 0) return;
  const int blocks = static_cast<int>(total_groups < kMaxBlocks ? total_groups : kMaxBlocks);
  REGFAST_DISPATCH(dtype, {
    group_norm_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        groups, total_groups, meta, step != nullptr ? *step : Step{}, step != nullptr, norm, root);
  });
}

}  // namespace cuda
}  // namespace regfast
