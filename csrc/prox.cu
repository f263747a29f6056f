// The proximal step: elastic-net shrink of every element, then the group factor.
#include "cuda_launch.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {

template <typename T, bool kT, bool kShrink, bool kGroup>
struct ProxFunctor {
  using A = acc_t<T>;
  Step step;
  const A* group_factor;

  __device__ void operator()(int64_t, const WorkItem& item, const TensorMeta& m) const {
    T* w = static_cast<T*>(m.data);
    const ElasticStep<A> u = elastic_of<A>(step);
    const A* factor = kGroup ? group_factor + m.group_offset : nullptr;
    auto one = [&](A x, int64_t group) {
      x = elastic_step(x, kT, u.threshold, kShrink, u.shrink);
      if (kGroup) x = x * factor[group];
      return x;
    };
    for_grouped_elements<T>(
        item.begin, item.end, vec_ok<T>(w, nullptr, item.begin), kGroup, m,
        [&](int64_t i, GroupCursor at) {
          Vec<T> v = *reinterpret_cast<const Vec<T>*>(w + i);
#pragma unroll
          for (int e = 0; e < kVec<T>; ++e) {
            v.v[e] = from_acc<T>(one(to_acc<A>(v.v[e]), at.group));
            if (kGroup) at.next(m);
          }
          *reinterpret_cast<Vec<T>*>(w + i) = v;
        },
        [&](int64_t i, const GroupCursor& at) { w[i] = from_acc<T>(one(to_acc<A>(w[i]), at.group)); });
  }
};

template <typename T, bool kT, bool kShrink, bool kGroup>
void prox_apply(const WorkItem* items, int64_t nitems, const TensorMeta* meta, Step step, const void* group_factor,
                cudaStream_t stream) {
  ProxFunctor<T, kT, kShrink, kGroup> f{step, static_cast<const acc_t<T>*>(group_factor)};
  multi_tensor_apply(items, nitems, meta, f, stream);
}

template <typename T, bool kGroup>
void prox_terms(const WorkItem* items, int64_t nitems, const TensorMeta* meta, Step step, const void* group_factor,
                cudaStream_t stream) {
  const bool has_t = step.l1 != 0, has_shrink = step.l2 != 0;
  if (has_t && has_shrink) {
    prox_apply<T, true, true, kGroup>(items, nitems, meta, step, group_factor, stream);
  } else if (has_t) {
    prox_apply<T, true, false, kGroup>(items, nitems, meta, step, group_factor, stream);
  } else if (has_shrink) {
    prox_apply<T, false, true, kGroup>(items, nitems, meta, step, group_factor, stream);
  } else if constexpr (kGroup) {  // without a term or a group there is nothing to launch (or compile)
    prox_apply<T, false, false, kGroup>(items, nitems, meta, step, group_factor, stream);
  }
}

void launch_prox(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, Step step,
                 const void* group_factor, cudaStream_t stream) {
  REGFAST_DISPATCH(dtype, {
    if (group_factor != nullptr) {
      prox_terms<scalar_t, true>(items, nitems, meta, step, group_factor, stream);
    } else {
      prox_terms<scalar_t, false>(items, nitems, meta, step, group_factor, stream);
    }
  });
}

}  // namespace cuda
}  // namespace regfast
