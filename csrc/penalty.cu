// The gradient pass of add_penalty_grad_ and penalty_backward (the group norms it scales by: group_norms.cu).
#include "cuda_launch.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {

template <typename T, bool kL1, bool kLin, bool kAccumulate>
struct GradFunctor {
  using A = acc_t<T>;
  A l1;
  A lin;
  const A* group_scale;  // per group 2·l2/p + q, applied as scale·(w·p) (see grad_pass in penalty_cuda.cpp)
  const A* group_pre;    // per group the power of two p
  const A* mult;
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& m) const {
    __shared__ A shared[kThreads / 32];
    const T* w = static_cast<const T*>(m.data);
    T* out = static_cast<T*>(m.other);
    const A k = mult != nullptr ? *mult : A(1);
    const A* scale = group_scale != nullptr ? group_scale + m.group_offset : nullptr;
    const A* pre = group_pre != nullptr ? group_pre + m.group_offset : nullptr;
    A s1 = 0, s2 = 0;
    auto one = [&](A x, A o, int64_t group) {
      s1 += fabs(x);
      s2 += x * x;
      A inc = 0;
      if (kL1) inc += l1 * sign_of(x);
      // With group lasso, x·p + x·0 (one fma; a select in its place spilled a register on sm_90): the group term
      // c·x/‖w_g‖₂ of an infinite x is inf/inf, NaN (its group's norm is inf or NaN), which (2·l2/p + q)·(x·p)
      // alone leaves ±inf wherever l2 ≠ 0; for a finite x, x·0 is a zero of x·p's sign and leaves it as it is.
      if (kLin) inc += scale != nullptr ? scale[group] * fma(x, A(0), x * pre[group]) : lin * x;
      return kAccumulate ? o + k * inc : k * inc;
    };
    const bool grouped = kLin && scale != nullptr;
    for_grouped_elements<T>(
        item.begin, item.end, vec_ok<T>(w, out, item.begin), grouped, m,
        [&](int64_t i, GroupCursor at) {
          const Vec<T> v = *reinterpret_cast<const Vec<T>*>(w + i);
          Vec<T> g = *reinterpret_cast<const Vec<T>*>(out + i);
#pragma unroll
          for (int e = 0; e < kVec<T>; ++e) {
            g.v[e] = from_acc<T>(one(to_acc<A>(v.v[e]), to_acc<A>(g.v[e]), at.group));
            if (grouped) at.next(m);
          }
          *reinterpret_cast<Vec<T>*>(out + i) = g;
        },
        [&](int64_t i, const GroupCursor& at) {
          out[i] = from_acc<T>(one(to_acc<A>(w[i]), to_acc<A>(out[i]), at.group));
        });
    store_partial_pair(s1, s2, shared, partials, c, nitems);
  }
};

template <typename T, bool kL1, bool kLin, bool kAccumulate>
void grad_apply(const WorkItem* items, int64_t nitems, const TensorMeta* meta, double l1, double l2,
                const void* group_scale, const void* group_pre, const void* mult, void* partials,
                cudaStream_t stream) {
  using A = acc_t<T>;
  GradFunctor<T, kL1, kLin, kAccumulate> f{static_cast<A>(l1),
                                           static_cast<A>(2 * l2),
                                           static_cast<const A*>(group_scale),
                                           static_cast<const A*>(group_pre),
                                           static_cast<const A*>(mult),
                                           static_cast<A*>(partials),
                                           nitems};
  multi_tensor_apply(items, nitems, meta, f, stream);
}

template <typename T, bool kAccumulate>
void grad_terms(const WorkItem* items, int64_t nitems, const TensorMeta* meta, double l1, double l2,
                const void* group_scale, const void* group_pre, const void* mult, void* partials,
                cudaStream_t stream) {
  const bool has_l1 = l1 != 0, has_lin = l2 != 0 || group_scale != nullptr;
  if (has_l1 && has_lin) {
    grad_apply<T, true, true, kAccumulate>(items, nitems, meta, l1, l2, group_scale, group_pre, mult, partials, stream);
  } else if (has_l1) {
    grad_apply<T, true, false, kAccumulate>(items, nitems, meta, l1, l2, group_scale, group_pre, mult, partials, stream);
  } else {
    grad_apply<T, false, true, kAccumulate>(items, nitems, meta, l1, l2, group_scale, group_pre, mult, partials, stream);
  }
}

void launch_grad(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, double l1, double l2,
                 const void* group_scale, const void* group_pre, const void* mult, bool accumulate, void* partials,
                 cudaStream_t stream) {
  REGFAST_DISPATCH(dtype, {
    if (accumulate) {
      grad_terms<scalar_t, true>(items, nitems, meta, l1, l2, group_scale, group_pre, mult, partials, stream);
    } else {
      grad_terms<scalar_t, false>(items, nitems, meta, l1, l2, group_scale, group_pre, mult, partials, stream);
    }
  });
}

}  // namespace cuda
}  // namespace regfast
