// The fused optimizer steps: SGD or AdamW, then the elastic-net prox, then the penalty partials
// of the new params, one read and one write of every param and state element.
//
// The arithmetic follows csrc/optim_cpu_math.h (the operation order of torch's foreach SGD /
// AdamW as regfast/reference/optim.py mirrors it); here every a·b + c of the reference is an
// fma, as CUDA's ATen kernels compile them.
#include "cuda_launch.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {
namespace {

// The step-dependent scalars of the elastic-net prox with step lr: from the device lr when
// given (computed in A, one rounding per op, as the reference does with a tensor lr), else the
// host's double values.
template <typename A>
struct ProxScalars {
  A neg_lr, lr, threshold, shrink;

  __device__ static ProxScalars make(const OptimScalars& s) {
    if (s.lr_ptr == nullptr) {
      return {static_cast<A>(-s.lr), static_cast<A>(s.lr), static_cast<A>(s.threshold), static_cast<A>(s.shrink)};
    }
    const A lr = *static_cast<const A*>(s.lr_ptr);
    const ElasticStep<A> u = ElasticStep<A>::from_acc(lr, s.l1, s.l2);
    return {-lr, lr, u.threshold, u.shrink};
  }
};

template <typename T, Momentum kMode>
struct SgdFunctor {
  using A = acc_t<T>;
  OptimScalars s;
  const OptimState* state;
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& meta) const {
    __shared__ A shared[kThreads / 32];
    T* w = static_cast<T*>(meta.data);
    const T* grad = static_cast<const T*>(meta.other);
    A* buf = static_cast<A*>(state[item.tensor].first);
    const ProxScalars<A> p = ProxScalars<A>::make(s);
    const A wd = static_cast<A>(s.weight_decay), mom = static_cast<A>(s.momentum), keep = static_cast<A>(s.keep);
    A s1 = 0, s2 = 0;
    for (int64_t i = item.begin + threadIdx.x; i < item.end; i += blockDim.x) {
      A x = to_acc<A>(w[i]);
      A g = to_acc<A>(grad[i]);
      if (s.maximize) g = -g;
      if (s.weight_decay != 0) g = fma(x, wd, g);
      if (kMode != Momentum::kNone) {
        const A b = kMode == Momentum::kInit ? g : fma(g, keep, buf[i] * mom);
        buf[i] = b;
        g = s.nesterov ? fma(b, mom, g) : b;
      }
      x = s.lr_ptr != nullptr ? x + g * p.neg_lr : fma(g, p.neg_lr, x);
      if (s.l1 != 0) x = soft_threshold(x, p.threshold);
      if (s.l2 != 0) x = x * p.shrink;
      const T r = from_acc<T>(x);
      w[i] = r;
      const A y = to_acc<A>(r);
      s1 += fabs(y);
      s2 += y * y;
    }
    if (partials == nullptr) return;
    store_partial_pair(s1, s2, shared, partials, c, nitems);
  }
};

template <typename T, bool kAmsgrad>
struct AdamWFunctor {
  using A = acc_t<T>;
  OptimScalars s;
  const OptimState* state;
  const A* corrections;  // per tensor: −lr/(1 − β1ᵗ), √(1 − β2ᵗ)
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& meta) const {
    __shared__ A shared[kThreads / 32];
    T* w = static_cast<T*>(meta.data);
    const T* grad = static_cast<const T*>(meta.other);
    const OptimState st = state[item.tensor];
    A* m1 = static_cast<A*>(st.first);
    A* m2 = static_cast<A*>(st.second);
    A* mx = static_cast<A*>(st.third);
    const ProxScalars<A> p = ProxScalars<A>::make(s);
    const A step_size = corrections[2 * item.tensor], bc2_sqrt = corrections[2 * item.tensor + 1];
    const A decay = s.weight_decay == 0
                        ? A(1)
                        : (s.lr_ptr != nullptr ? A(1) - p.lr * static_cast<A>(s.weight_decay) : static_cast<A>(s.decay));
    const A w1 = static_cast<A>(s.beta1_weight), beta2 = static_cast<A>(s.beta2);
    const A w2 = static_cast<A>(s.beta2_weight), eps = static_cast<A>(s.eps);
    const A l1 = static_cast<A>(s.l1), two_l2 = static_cast<A>(2 * s.l2);
    A s1 = 0, s2 = 0;
    for (int64_t i = item.begin + threadIdx.x; i < item.end; i += blockDim.x) {
      A x = to_acc<A>(w[i]);
      // The size of the penalty's gradient at w, the floor of the preconditioned denominator.
      const A floor = (s.l2 != 0 ? two_l2 * fabs(x) : A(0)) + l1;
      x = x * decay;
      A g = to_acc<A>(grad[i]);
      if (s.maximize) g = -g;
      const A diff = g - m1[i];
      // lerp: self + w·(end − self) for |w| < 0.5, else end + (w − 1)·(end − self).
      const A m = fabs(w1) < A(0.5) ? fma(w1, diff, m1[i]) : fma(w1 - A(1), diff, g);
      m1[i] = m;
      const A v = fma(w2 * g, g, m2[i] * beta2);
      m2[i] = v;
      A second = v;
      if (kAmsgrad) {
        second = maximum(mx[i], v);
        mx[i] = second;
      }
      A denom = sqrt(second) / bc2_sqrt + eps;
      // prox="preconditioned": Adam's denominator is at least the penalty's gradient, for the update and the
      // prox alike (reference.penalty_gradient_scales); a NaN denominator stays NaN.
      if (s.prox == ProxMode::kPreconditioned && denom < floor) denom = floor;
      x = s.lr_ptr != nullptr ? x + m / (denom / step_size) : x + (step_size * m) / denom;
      if (s.prox == ProxMode::kLr) {
        if (s.l1 != 0) x = soft_threshold(x, p.threshold);
        if (s.l2 != 0) x = x * p.shrink;
      } else if (s.prox == ProxMode::kPreconditioned) {
        const A step = s.lr_ptr != nullptr ? p.lr / denom : (A(1) / denom) * p.lr;
        if (s.l1 != 0) x = soft_threshold(x, step * l1);
        if (s.l2 != 0) x = x * (A(1) / (step * two_l2 + A(1)));
      }
      const T r = from_acc<T>(x);
      w[i] = r;
      const A y = to_acc<A>(r);
      s1 += fabs(y);
      s2 += y * y;
    }
    if (partials == nullptr) return;
    store_partial_pair(s1, s2, shared, partials, c, nitems);
  }
};

template <typename T, Momentum kMode>
void sgd_apply(const WorkItem* items, int64_t nitems, const TensorMeta* meta, const OptimState* state,
               const OptimScalars& s, void* partials, cudaStream_t stream) {
  using A = acc_t<T>;
  SgdFunctor<T, kMode> f{s, state, static_cast<A*>(partials), nitems};
  multi_tensor_apply(items, nitems, meta, f, stream);
}

}  // namespace

void launch_sgd_step(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta,
                     const OptimState* state, const OptimScalars& s, void* partials, cudaStream_t stream) {
  REGFAST_DISPATCH(dtype, {
    if (s.momentum_mode == Momentum::kNone) {
      sgd_apply<scalar_t, Momentum::kNone>(items, nitems, meta, state, s, partials, stream);
    } else if (s.momentum_mode == Momentum::kInit) {
      sgd_apply<scalar_t, Momentum::kInit>(items, nitems, meta, state, s, partials, stream);
    } else {
      sgd_apply<scalar_t, Momentum::kUpdate>(items, nitems, meta, state, s, partials, stream);
    }
  });
}

void launch_adamw_step(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta,
                       const OptimState* state, const OptimScalars& s, const void* corrections, void* partials,
                       cudaStream_t stream) {
  REGFAST_DISPATCH(dtype, {
    using A = acc_t<scalar_t>;
    if (s.amsgrad) {
      AdamWFunctor<scalar_t, true> f{s, state, static_cast<const A*>(corrections), static_cast<A*>(partials), nitems};
      multi_tensor_apply(items, nitems, meta, f, stream);
    } else {
      AdamWFunctor<scalar_t, false> f{s, state, static_cast<const A*>(corrections), static_cast<A*>(partials), nitems};
      multi_tensor_apply(items, nitems, meta, f, stream);
    }
  });
}

}  // namespace cuda
}  // namespace regfast
