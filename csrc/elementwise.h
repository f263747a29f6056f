// The elementwise math of the penalty's gradient and of the proximal step, for the CPU and CUDA
// kernels alike (compiled for the host too, so the CPU tests exercise the very functions the GPU
// runs). Each keeps NaN: a NaN weight or a NaN step gives NaN, never 0. Written as independent
// selects, no branches, so that CPU loops vectorize into compares and blends.
#pragma once

#include <type_traits>

#include "kernel_types.h"

namespace regfast {

// sign(w), with NaN kept as NaN (so a NaN weight gets a NaN l1 gradient).
template <typename A>
REGFAST_HOST_DEVICE inline A sign_of(A w) {
  const A pos = w > A(0) ? A(1) : A(0);
  const A neg = w < A(0) ? A(1) : A(0);
  return w != w ? w : pos - neg;
}

// x − clamp(x, −t, t): the soft threshold, exactly 0 where |x| ≤ t. clamp as ATen's: a NaN x
// stays NaN, a NaN threshold (a NaN step) gives NaN.
template <typename A>
REGFAST_HOST_DEVICE inline A soft_threshold(A x, A t) {
  const A lower = x < -t ? -t : x;
  const A clamped = lower <= t ? lower : t;
  return x - clamped;
}

// The elastic-net step: soft threshold by `threshold` (lr·l1) when has_l1, then the l2 shrink
// (times 1/(1 + 2·lr·l2)) when has_l2; the order and roundings of the reference's prox.
template <typename A>
REGFAST_HOST_DEVICE inline A elastic_step(A x, bool has_l1, A threshold, bool has_l2, A shrink) {
  if (has_l1) x = soft_threshold(x, threshold);
  if (has_l2) x = x * shrink;
  return x;
}

// a·b and a + b, each rounded on its own: nvcc contracts a·b + c into one fma by default, where the
// reference rounds twice.
template <typename A>
REGFAST_HOST_DEVICE inline A mul_rn(A a, A b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename A>
REGFAST_HOST_DEVICE inline A add_rn(A a, A b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<A, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// The elastic-net step of step lr as a function: threshold lr·l1 and shrink 1/(1 + 2·lr·l2) as the
// reference computes them, in double from a float lr (`from_double`, given the host's double
// values) or in A, one rounding per op, from a tensor lr (`from_acc`).
template <typename A>
struct ElasticStep {
  A threshold;
  A shrink;
  bool has_l1;
  bool has_l2;

  REGFAST_HOST_DEVICE static ElasticStep from_double(double threshold, double shrink, bool has_l1, bool has_l2) {
    return {static_cast<A>(threshold), static_cast<A>(shrink), has_l1, has_l2};
  }

  REGFAST_HOST_DEVICE static ElasticStep from_acc(A lr, double l1, double l2) {
    const A shrink = l2 != 0 ? A(1) / add_rn(mul_rn(mul_rn(A(2), lr), static_cast<A>(l2)), A(1)) : A(1);
    return {mul_rn(lr, static_cast<A>(l1)), shrink, l1 != 0, l2 != 0};
  }

  REGFAST_HOST_DEVICE A operator()(A x) const { return elastic_step(x, has_l1, threshold, has_l2, shrink); }
};

// The double values from_double takes for a float lr: lr·l1 and 1/(1 + 2·lr·l2) (1 without l2).
inline void elastic_scalars(double lr, double l1, double l2, double& threshold, double& shrink) {
  threshold = lr * l1;
  shrink = l2 != 0 ? 1.0 / (1.0 + 2.0 * lr * l2) : 1.0;
}

// torch.maximum: NaN if either is NaN.
template <typename A>
REGFAST_HOST_DEVICE inline A maximum(A a, A b) {
  const A larger = a > b ? a : b;
  return a != a ? a : (b != b ? b : larger);
}

}  // namespace regfast
