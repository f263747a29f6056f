// The fused optimizer steps: SGD or AdamW, then the elastic-net prox, then the penalty partials
// of the new params, one read and one write of every param and state element.
//
// The arithmetic of an element is optim_math.h's: torch's foreach SGD / AdamW as its CUDA kernels
// round them (the reference's ops, run on CUDA), then the prox.
#include "cuda_launch.h"
#include "optim_math.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {
namespace {

// The step-dependent scalars of the elastic-net prox with step lr: from a tensor lr (computed in A,
// one rounding per op, as the reference does with a tensor lr), else the host's double values.
template <typename A>
struct ProxScalars {
  A neg_lr, lr, threshold, shrink;

  __device__ static ProxScalars make(const OptimScalars& s) {
    if (!s.tensor_lr) {
      return {static_cast<A>(-s.lr), static_cast<A>(s.lr), static_cast<A>(s.threshold), static_cast<A>(s.shrink)};
    }
    const A lr = tensor_lr_of<A>(s);
    const ElasticStep<A> u = ElasticStep<A>::from_acc(lr, s.l1, s.l2);
    return {-lr, lr, u.threshold, u.shrink};
  }
};

// Both functors step kVec<T> elements at a time through 16-byte loads and stores of the param, its grad and
// its states when all of them are 16-byte aligned (the states' vectors are kVec<T> accumulation values: two
// 16-byte pieces for float16 / bfloat16 params), then the scalar tail; the element math is the same.
template <typename T, Momentum kMode>
struct SgdFunctor {
  using A = acc_t<T>;
  OptimScalars s;
  const OptimState* state;
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& meta) const {
    __shared__ A shared[kThreads / 32];
    constexpr bool kBuffer = kMode != Momentum::kNone;
    constexpr int kN = kVec<T>;
    T* w = static_cast<T*>(meta.data);
    const T* grad = static_cast<const T*>(meta.other);
    A* buf = static_cast<A*>(state[item.tensor].first);
    const ProxScalars<A> p = ProxScalars<A>::make(s);
    const SgdElement<A> e{static_cast<A>(s.weight_decay), static_cast<A>(s.momentum), static_cast<A>(s.keep),
                          p.neg_lr, p.threshold, p.shrink, kMode, s.weight_decay != 0, s.nesterov, s.maximize,
                          s.tensor_lr, s.l1 != 0, s.l2 != 0};
    A s1 = 0, s2 = 0;
    auto rounded = [&](A x) {  // the new param, and its terms of the penalty partials
      const T r = from_acc<T>(x);
      const A y = to_acc<A>(r);
      s1 += fabs(y);
      s2 += y * y;
      return r;
    };
    for_elements<T>(
        item.begin, item.end, vec_ok<T>(w, grad, item.begin) && (!kBuffer || aligned16(buf)),
        [&](int64_t i) {
          Vec<T> wv = *reinterpret_cast<const Vec<T>*>(w + i);
          const Vec<T> gv = *reinterpret_cast<const Vec<T>*>(grad + i);
          A b[kN];
          if (kMode == Momentum::kUpdate) load_acc_vec(buf + i, b);
#pragma unroll
          for (int k = 0; k < kN; ++k) wv.v[k] = rounded(e.step(to_acc<A>(wv.v[k]), to_acc<A>(gv.v[k]), b + k));
          *reinterpret_cast<Vec<T>*>(w + i) = wv;
          if (kBuffer) store_acc_vec(buf + i, b);
        },
        [&](int64_t i) { w[i] = rounded(e.step(to_acc<A>(w[i]), to_acc<A>(grad[i]), kBuffer ? buf + i : nullptr)); });
    if (partials == nullptr) return;
    store_partial_pair(s1, s2, shared, partials, c, nitems);
  }
};

template <typename T, bool kAmsgrad>
struct AdamWFunctor {
  using A = acc_t<T>;
  OptimScalars s;
  const OptimState* state;
  const A* corrections;  // per tensor: −lr/(1 − β1ᵗ), √(1 − β2ᵗ); null: the scalars' (one count for all)
  A* partials;
  int64_t nitems;

  __device__ void operator()(int64_t c, const WorkItem& item, const TensorMeta& meta) const {
    __shared__ A shared[kThreads / 32];
    constexpr int kN = kVec<T>;
    T* w = static_cast<T*>(meta.data);
    const T* grad = static_cast<const T*>(meta.other);
    const OptimState st = state[item.tensor];
    A* m1 = static_cast<A*>(st.first);
    A* m2 = static_cast<A*>(st.second);
    A* mx = static_cast<A*>(st.third);
    const ProxScalars<A> p = ProxScalars<A>::make(s);
    const bool tensor_lr = s.tensor_lr;
    // With a tensor lr, 1 − lr·wd in A, one rounding per op, as the reference computes it from the tensor.
    const A decay = tensor_lr ? A(1) - p.lr * static_cast<A>(s.weight_decay) : static_cast<A>(s.decay);
    const AdamWElement<A> e{decay, static_cast<A>(s.beta1_weight), static_cast<A>(s.beta2),
                            static_cast<A>(s.beta2_weight), static_cast<A>(s.eps),
                            corrections != nullptr ? corrections[2 * item.tensor] : static_cast<A>(s.step_size),
                            corrections != nullptr ? corrections[2 * item.tensor + 1] : static_cast<A>(s.bc2_sqrt),
                            p.lr, static_cast<A>(s.l1), static_cast<A>(2 * s.l2),
                            p.threshold, p.shrink, s.prox, s.weight_decay != 0, s.maximize, kAmsgrad, tensor_lr,
                            s.l1 != 0, s.l2 != 0};
    A s1 = 0, s2 = 0;
    auto rounded = [&](A x) {  // the new param, and its terms of the penalty partials
      const T r = from_acc<T>(x);
      const A y = to_acc<A>(r);
      s1 += fabs(y);
      s2 += y * y;
      return r;
    };
    const bool aligned =
        vec_ok<T>(w, grad, item.begin) && aligned16(m1) && aligned16(m2) && (!kAmsgrad || aligned16(mx));
    for_elements<T>(
        item.begin, item.end, aligned,
        [&](int64_t i) {
          Vec<T> wv = *reinterpret_cast<const Vec<T>*>(w + i);
          const Vec<T> gv = *reinterpret_cast<const Vec<T>*>(grad + i);
          if constexpr (sizeof(A) == 8) {
            // float64: the states element by element (two elements' states live across the divisions, which
            // are calls here, spill registers on sm_80).
#pragma unroll
            for (int k = 0; k < kN; ++k) {
              A m = m1[i + k], v = m2[i + k], v_max = kAmsgrad ? mx[i + k] : A(0);
              wv.v[k] = rounded(e.step(to_acc<A>(wv.v[k]), to_acc<A>(gv.v[k]), m, v, v_max));
              m1[i + k] = m;
              m2[i + k] = v;
              if (kAmsgrad) mx[i + k] = v_max;
            }
          } else {
            A m[kN], v[kN], v_max[kN];
            load_acc_vec(m1 + i, m);
            load_acc_vec(m2 + i, v);
            if (kAmsgrad) load_acc_vec(mx + i, v_max);
#pragma unroll
            for (int k = 0; k < kN; ++k) {
              wv.v[k] = rounded(e.step(to_acc<A>(wv.v[k]), to_acc<A>(gv.v[k]), m[k], v[k], v_max[k]));
            }
            store_acc_vec(m1 + i, m);
            store_acc_vec(m2 + i, v);
            if (kAmsgrad) store_acc_vec(mx + i, v_max);
          }
          *reinterpret_cast<Vec<T>*>(w + i) = wv;
        },
        [&](int64_t i) {
          A m = m1[i], v = m2[i], v_max = kAmsgrad ? mx[i] : A(0);
          w[i] = rounded(e.step(to_acc<A>(w[i]), to_acc<A>(grad[i]), m, v, v_max));
          m1[i] = m;
          m2[i] = v;
          if (kAmsgrad) mx[i] = v_max;
        });
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
