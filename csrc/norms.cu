// Per-tensor Σ|w| and Σw² in one pass, and the per-tensor combination of per-chunk partials.
#include "cuda_launch.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {

template <typename T>
struct NormsFunctor {
  using A = acc_t<T>;
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& m) const {
    __shared__ A shared[kThreads / 32];
    const T* w = static_cast<const T*>(m.data);
    A s1 = 0, s2 = 0;
    auto one = [&](A x) {
      s1 += fabs(x);
      s2 += x * x;
    };
    for_elements<T>(
        item.begin, item.end, vec_ok<T>(w, nullptr, item.begin),
        [&](int64_t i) {
          const Vec<T> v = *reinterpret_cast<const Vec<T>*>(w + i);
#pragma unroll
          for (int k = 0; k < kVec<T>; ++k) one(to_acc<A>(v.v[k]));
        },
        [&](int64_t i) { one(to_acc<A>(w[i])); });
    store_partial_pair(s1, s2, shared, partials, c, nitems);
  }
};

void launch_norms(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, void* partials,
                  cudaStream_t stream) {
  REGFAST_DISPATCH(dtype, {
    NormsFunctor<scalar_t> f{static_cast<acc_t<scalar_t>*>(partials), nitems};
    multi_tensor_apply(items, nitems, meta, f, stream);
  });
}

void launch_sum_partials(DType dtype, const void* partials, int64_t nitems, const int64_t* first, int64_t ntensors,
                         void* out, cudaStream_t stream) {
  if (ntensors == 0) return;
  const int blocks = static_cast<int>(ntensors < kMaxBlocks ? ntensors : kMaxBlocks);
  if (dtype == DType::kDouble) {
    sum_partials_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(partials), nitems, first,
                                                                 ntensors, static_cast<double*>(out), ntensors, 2);
  } else {
    sum_partials_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(partials), nitems, first,
                                                                ntensors, static_cast<float*>(out), ntensors, 2);
  }
}

}  // namespace cuda
}  // namespace regfast
