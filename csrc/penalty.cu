// The gradient pass (add_penalty_grad_, penalty_backward) and the group sums of squares.
#include "launch.h"
#include "norm_parts.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {

// The elastic-net step u(w) = (w − clamp(w, −t, t))·shrink; an absent term is skipped.
template <typename A>
struct Elastic {
  A t;
  A shrink;
  bool has_t;
  bool has_shrink;

  __device__ static Elastic make(const Step& s) {
    const A lr = s.lr_ptr != nullptr ? *static_cast<const A*>(s.lr_ptr) : static_cast<A>(s.lr);
    return {lr * static_cast<A>(s.l1), A(1) / (A(1) + A(2) * lr * static_cast<A>(s.l2)), s.l1 != 0, s.l2 != 0};
  }

  __device__ __forceinline__ A operator()(A x) const {
    if (has_t) x = x - (fmax(x, -t) <= t ? fmax(x, -t) : t);  // a NaN t gives NaN
    if (has_shrink) x = x * shrink;
    return x;
  }
};

// One block per group: ‖u_g‖₂ over the group's elements [o, g, k] in double, in a fixed thread order,
// without overflow or underflow (norm_parts.h: one part, or three for double), and √|g|.
template <typename T>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const int64_t* groups, int64_t total,
                                                              const TensorMeta* meta, Step step, bool elastic,
                                                              double* norm, double* root) {
  using A = acc_t<T>;
  constexpr int kParts = std::is_same<A, double>::value ? 3 : 1;
  __shared__ double shared[kThreads / 32];
  Elastic<A> u{};
  if (elastic) u = Elastic<A>::make(step);
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

template <typename T, bool kL1, bool kLin, bool kAccumulate>
struct GradFunctor {
  using A = acc_t<T>;
  A l1;
  A lin;
  const A* group_scale;  // per group 2·l2/p + q, applied as scale·(w·p) (see grad_pass in cuda_ops.cpp)
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
    auto one = [&](A x, A o, int64_t i) {
      s1 += fabs(x);
      s2 += x * x;
      A inc = 0;
      if (kL1) inc += l1 * sign_of(x);
      if (kLin) {
        if (scale != nullptr) {
          const int64_t g = (i / m.inner) % m.ngroups;
          inc += scale[g] * (x * pre[g]);
        } else {
          inc += lin * x;
        }
      }
      return kAccumulate ? o + k * inc : k * inc;
    };
    for_elements<T>(
        item.begin, item.end, vec_ok<T>(w, out, item.begin),
        [&](int64_t i) {
          const Vec<T> v = *reinterpret_cast<const Vec<T>*>(w + i);
          Vec<T> g = *reinterpret_cast<const Vec<T>*>(out + i);
#pragma unroll
          for (int e = 0; e < kVec<T>; ++e) {
            g.v[e] = from_acc<T>(one(to_acc<A>(v.v[e]), to_acc<A>(g.v[e]), i + e));
          }
          *reinterpret_cast<Vec<T>*>(out + i) = g;
        },
        [&](int64_t i) { out[i] = from_acc<T>(one(to_acc<A>(w[i]), to_acc<A>(out[i]), i)); });
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
