// The arithmetic of the fused optimizer steps on the CPU, element by element, in the operation
// order of torch's foreach SGD / AdamW (as regfast/reference/optim.py mirrors them), so that
// the results carry the same bits. Included by optim_cpu_baseline.cpp and optim_cpu_fma.cpp only.
//
// Each ATen op of the reference rounds once: w.add_(g, alpha) and lerp_ and addcmul_ are one
// fmadd in ATen's vectorized kernels (kFused: one rounding when torch runs AVX2/AVX512 kernels),
// addcdiv_ is (value·t1)/t2 + self, mul/div/sqrt/clamp round each result. Without an fma the
// file must be compiled with -ffp-contract=off so that the compiler fuses nothing by itself.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "elementwise.h"
#include "kernel_types.h"
#include "optim_cpu.h"
#if defined(REGFAST_OPTIM_F16C)
#include "f16c.h"
#endif

#if !defined(REGFAST_OPTIM_LOOPS)
#error "define REGFAST_OPTIM_LOOPS, the namespace of the including file's instruction set"
#endif

namespace regfast {
namespace optim_cpu {
// Internal linkage, in a namespace named after the instruction set: each including file compiles its own
// copy for its own instruction set, so that no AVX2 instantiation can stand in for a baseline one at link
// time, and the library's symbols say which is which.
namespace REGFAST_OPTIM_LOOPS {
namespace {

constexpr int kLanes = 16;

// a·b + c rounded as ATen's Vectorized<A>::fmadd rounds it: once (kFused) or twice.
template <bool kFused, typename A>
inline A fmadd(A a, A b, A c) {
  if constexpr (kFused) {
#if defined(__GNUC__)
    if constexpr (std::is_same_v<A, float>) {
      return __builtin_fmaf(a, b, c);
    } else {
      return __builtin_fma(a, b, c);
    }
#else
    return std::fma(a, b, c);
#endif
  } else {
    return a * b + c;
  }
}

// Elements per block: each block is stepped by one plain loop, then, while it is still in the
// L1 cache, its new values are added to the penalty sums. A multiple of kLanes, so that element
// i always lands in lane (i − begin) mod kLanes.
constexpr int64_t kBlock = 1024;

// float16 blocks are stepped in float arrays: the params and grads widened by loops of their own, the float
// step over them, the params narrowed back, with c10's conversions or F16C's (the same bits as converting element
// by element). Inside the step's loop those conversions keep it from vectorizing. bfloat16's conversions (shifts)
// do not: staged, its steps were no faster.
template <typename T>
constexpr bool kNarrow = std::is_same_v<T, c10::Half>;

#if defined(REGFAST_OPTIM_F16C)
// F16C's conversions (f16c.h, c10's bits), where the CPU has them: the including file defines REGFAST_OPTIM_F16C
// where it is compiled for AVX2 (8: eight elements a conversion) or AVX-512 (16: sixteen).
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}

#if REGFAST_OPTIM_F16C == 16
#define REGFAST_OPTIM_F16C_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#else
#define REGFAST_OPTIM_F16C_TARGET "avx2,fma,f16c"
#endif

__attribute__((target(REGFAST_OPTIM_F16C_TARGET), noinline)) void widen_f16c(const c10::Half* __restrict__ src,
                                                                             float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + REGFAST_OPTIM_F16C <= n; i += REGFAST_OPTIM_F16C) {
#if REGFAST_OPTIM_F16C == 16
    _mm512_storeu_ps(dst + i, f16c::load16(src + i));
#else
    _mm256_storeu_ps(dst + i, f16c::load8(src + i));
#endif
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target(REGFAST_OPTIM_F16C_TARGET), noinline)) void narrow_f16c(const float* __restrict__ src,
                                                                              c10::Half* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + REGFAST_OPTIM_F16C <= n; i += REGFAST_OPTIM_F16C) {
#if REGFAST_OPTIM_F16C == 16
    f16c::store16(dst + i, _mm512_loadu_ps(src + i));
#else
    f16c::store8(dst + i, _mm256_loadu_ps(src + i));
#endif
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#undef REGFAST_OPTIM_F16C_TARGET
#endif

template <typename T>
__attribute__((noinline)) void widen(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#if defined(REGFAST_OPTIM_F16C)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return widen_f16c(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
__attribute__((noinline)) void narrow(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#if defined(REGFAST_OPTIM_F16C)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return narrow_f16c(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// s1[j] += |w_i|, s2[j] += w_i² over [begin, end) of a block, lane j = (i − begin) mod kLanes.
template <typename T, typename A>
inline void add_to_lanes(const T* __restrict__ w, int64_t begin, int64_t end, A* __restrict__ s1,
                         A* __restrict__ s2) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A x = static_cast<A>(w[i + j]);
      s1[j] += std::abs(x);
      s2[j] += x * x;
    }
  }
  for (int j = 0; i < end; ++i, ++j) {
    const A x = static_cast<A>(w[i]);
    s1[j] += std::abs(x);
    s2[j] += x * x;
  }
}

template <typename A>
inline void add_lanes(const A* s1, const A* s2, double* sums) {
  A a[kLanes], b[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    a[j] = s1[j];
    b[j] = s2[j];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) {
      a[j] += a[j + width];
      b[j] += b[j + width];
    }
  }
  sums[0] = static_cast<double>(a[0]);
  sums[1] = static_cast<double>(b[0]);
}

// A loop-invariant choice, held as a value of A (1 or 0) and compared with 0: a bool would give a
// byte-sized mask, which GCC's vectorizer cannot combine with A-sized lanes in one loop.
template <typename A>
inline A pick(A on, A a, A b) {
  return on > A(0) ? a : b;
}

template <typename A>
inline A flag(bool b) {
  return b ? A(1) : A(0);
}

template <typename A>
struct SgdConst {
  A neg_lr, weight_decay, momentum, keep, threshold, shrink;
  A maximize, has_weight_decay, nesterov, has_l1;

  explicit SgdConst(const SgdArgs& a)
      : neg_lr(static_cast<A>(a.neg_lr)),
        weight_decay(static_cast<A>(a.weight_decay)),
        momentum(static_cast<A>(a.momentum)),
        keep(static_cast<A>(a.keep)),
        threshold(static_cast<A>(a.threshold)),
        shrink(static_cast<A>(a.shrink)),
        maximize(flag<A>(a.maximize)),
        has_weight_decay(flag<A>(a.has_weight_decay)),
        nesterov(flag<A>(a.nesterov)),
        has_l1(flag<A>(a.has_l1)) {}
};

// One element of the SGD step and the prox; kWork (group lasso, the group shrink to follow): the new value goes
// to work[i] (unrounded), the param is not written.
template <typename T, bool kFused, Momentum kMode, bool kWork, typename A>
inline void sgd_element(const SgdConst<A>& c, T* __restrict__ w, const T* __restrict__ grad, A* __restrict__ buf,
                        A* __restrict__ work, int64_t i) {
  A x = static_cast<A>(w[i]);
  A g;
  if constexpr (kMode == Momentum::kReplayBuffer) {
    g = buf[i];  // the grad is not read
  } else {
    g = static_cast<A>(grad[i]);
    g = pick(c.maximize, -g, g);
    g = pick(c.has_weight_decay, fmadd<kFused>(x, c.weight_decay, g), g);
    if constexpr (kMode == Momentum::kReplay) {
      g = pick(c.nesterov, fmadd<kFused>(buf[i], c.momentum, g), buf[i]);
    } else if constexpr (kMode != Momentum::kNone) {
      A b = g;
      if constexpr (kMode == Momentum::kUpdate) b = fmadd<kFused>(g, c.keep, buf[i] * c.momentum);
      buf[i] = b;
      g = pick(c.nesterov, fmadd<kFused>(b, c.momentum, g), b);
    }
  }
  // torch's SGD adds g with alpha = −lr, a tensor lr read as a number: the same rounding for both.
  x = fmadd<kFused>(g, c.neg_lr, x);
  x = pick(c.has_l1, soft_threshold(x, c.threshold), x);
  if constexpr (kWork) {
    work[i] = x * c.shrink;
  } else {
    w[i] = static_cast<T>(x * c.shrink);
  }
}

// The element loop of one block. Its own function, not inlined, so that the restrict parameters
// reach the vectorizer (they are lost when inlined into the caller).
template <typename T, bool kFused, Momentum kMode, bool kWork, typename A>
__attribute__((noinline)) void sgd_block(const SgdConst<A>& c, T* __restrict__ w, const T* __restrict__ grad,
                                         A* __restrict__ buf, A* __restrict__ work, int64_t begin, int64_t end) {
  if constexpr (kNarrow<T>) {
    float wf[kBlock], gf[kBlock];
    const int64_t n = end - begin;
    widen(w + begin, wf, n);
    if constexpr (kMode != Momentum::kReplayBuffer) widen(grad + begin, gf, n);
    sgd_block<float, kFused, kMode, kWork>(c, wf, gf, kMode == Momentum::kNone ? buf : buf + begin,
                                           kWork ? work + begin : work, 0, n);
    if constexpr (!kWork) narrow(wf, w + begin, n);
  } else {
    for (int64_t i = begin; i < end; ++i) sgd_element<T, kFused, kMode, kWork>(c, w, grad, buf, work, i);
  }
}

template <typename T, bool kFused, Momentum kMode, bool kPenalty>
void sgd_loop(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  using A = acc_t<T>;
  const SgdConst<A> c(args);
  T* __restrict__ w = static_cast<T*>(t.param);
  const T* __restrict__ grad = static_cast<const T*>(t.grad);
  A* __restrict__ buf = static_cast<A*>(t.buffer);
  A* __restrict__ work = static_cast<A*>(t.work);
  A s1[kLanes] = {}, s2[kLanes] = {};
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    if (work != nullptr) {
      sgd_block<T, kFused, kMode, true>(c, w, grad, buf, work, b, e);
    } else {
      sgd_block<T, kFused, kMode, false>(c, w, grad, buf, work, b, e);
    }
    if constexpr (kPenalty) add_to_lanes(w, b, e, s1, s2);
  }
  if constexpr (kPenalty) add_lanes(s1, s2, sums);
}

template <typename A>
struct AdamWConst {
  A lr, decay, beta1_weight, beta1_weight_m1, beta2, beta2_weight, eps, threshold, shrink, l1, two_l2;
  A step_size, bc2_sqrt, group_weight;
  A maximize, lr_is_tensor, small_weight, has_l1, has_l2, group, replay;

  AdamWConst(const AdamWArgs& a, const AdamWTensor& t)
      : lr(static_cast<A>(a.lr)),
        decay(static_cast<A>(a.decay)),
        beta1_weight(static_cast<A>(a.beta1_weight)),
        beta1_weight_m1(static_cast<A>(a.beta1_weight) - A(1)),
        beta2(static_cast<A>(a.beta2)),
        beta2_weight(static_cast<A>(a.beta2_weight)),
        eps(static_cast<A>(a.eps)),
        threshold(static_cast<A>(a.threshold)),
        shrink(static_cast<A>(a.shrink)),
        l1(static_cast<A>(a.l1)),
        two_l2(static_cast<A>(a.two_l2)),
        step_size(static_cast<A>(t.step_size)),
        bc2_sqrt(static_cast<A>(t.bc2_sqrt)),
        group_weight(static_cast<A>(t.group_weight)),
        maximize(flag<A>(a.maximize)),
        lr_is_tensor(flag<A>(a.lr_is_tensor)),
        // ATen's lerp: self + w·(end − self) for |w| < 0.5, else end + (w − 1)·(end − self).
        small_weight(flag<A>(std::abs(static_cast<A>(a.beta1_weight)) < A(0.5))),
        has_l1(flag<A>(a.has_l1)),
        has_l2(flag<A>(a.has_l2)),
        group(flag<A>(a.group)),
        replay(flag<A>(a.replay)) {}
};

// One element of the AdamW step and the prox. kLrTensor and kL2 are c.lr_is_tensor and c.has_l2 (kL2 only for the
// preconditioned prox, the one mode that divides by l2's term): each choice compiled on its own, where a select
// between both sides would compute the divisions of both (seven per element where three are needed).
// kGroup (group lasso, the group shrink to follow): the param's new value goes to work[i] (unrounded); with the
// preconditioned prox the floor also adds the group term ga[i], and the elementwise prox's step in the l2 metric
// times group_weight goes to ga[i].
// kGroup: 0, 1 (group lasso), or kReplayGroup (AdamWArgs::replay: the moments read again, not updated); with the
// preconditioned prox and float accumulation, kScaledGroup / kScaledReplay take the floor's group term from the param
// as it is read, |w_i|·fs[i] in double rounded to float (AdamWTensor::floor_scale: the passes' column_floors' float32
// / 16-bit form), ga[i] only written.
constexpr int kReplayGroup = 2;
constexpr int kScaledGroup = 3;
constexpr int kScaledReplay = 4;
constexpr bool replays(int group) { return group == kReplayGroup || group == kScaledReplay; }

template <typename T, bool kFused, bool kAmsgrad, ProxMode kProx, bool kLrTensor, bool kL2, int kGroup, typename A>
inline void adamw_element(const AdamWConst<A>& c, T* __restrict__ w, const T* __restrict__ grad, A* __restrict__ m1,
                          A* __restrict__ m2, A* __restrict__ mx, A* __restrict__ ga, A* __restrict__ work,
                          const double* __restrict__ fs, int64_t i) {
  A x = static_cast<A>(w[i]);
  A g = A(0);  // a replay reads no grad
  if constexpr (!replays(kGroup)) {
    g = static_cast<A>(grad[i]);
    g = pick(c.maximize, -g, g);
  }
  // The size of the penalty's gradient at w, the floor of the preconditioned denominator.
  A floor = (kL2 ? c.two_l2 * std::abs(x) : A(0)) + c.l1;
  if constexpr (kGroup == kScaledGroup || kGroup == kScaledReplay) {
    floor = floor + static_cast<A>(std::abs(static_cast<double>(x)) * fs[i]);
  } else if constexpr (kGroup && kProx == ProxMode::kPreconditioned) {
    floor = floor + ga[i];
  }
  x = x * c.decay;
  A m = m1[i];
  A second;
  if constexpr (replays(kGroup)) {
    second = kAmsgrad ? mx[i] : m2[i];
  } else {
    const A diff = g - m;
    m = pick(c.small_weight, fmadd<kFused>(c.beta1_weight, diff, m), fmadd<kFused>(c.beta1_weight_m1, diff, g));
    m1[i] = m;
    const A v = fmadd<kFused>(c.beta2_weight * g, g, m2[i] * c.beta2);
    m2[i] = v;
    second = v;
    if constexpr (kAmsgrad) {
      second = maximum(mx[i], v);
      mx[i] = second;
    }
  }
  A denom = std::sqrt(second) / c.bc2_sqrt + c.eps;
  // prox="preconditioned": Adam's denominator is at least the penalty's gradient (reference.penalty_gradient_scales),
  // for the update and the prox alike. A NaN denominator stays NaN.
  if constexpr (kProx == ProxMode::kPreconditioned) denom = denom < floor ? floor : denom;
  if constexpr (kLrTensor) {
    x = x + m / (denom / c.step_size);
  } else {
    x = x + (c.step_size * m) / denom;
  }
  if constexpr (kProx == ProxMode::kLr) {
    x = pick(c.has_l1, soft_threshold(x, c.threshold), x);
    x = x * c.shrink;
  } else if constexpr (kProx == ProxMode::kPreconditioned) {
    // The reference's lr / d: a true division for a tensor lr, reciprocal(d)·lr for a float.
    A s = kLrTensor ? c.lr / denom : (A(1) / denom) * c.lr;
    x = pick(c.has_l1, soft_threshold(x, s * c.l1), x);
    if constexpr (kL2) {
      const A shrink = A(1) / (s * c.two_l2 + A(1));
      x = x * shrink;
      if constexpr (kGroup) s = s * shrink;
    }
    if constexpr (kGroup) ga[i] = s * c.group_weight;
  }
  if constexpr (kGroup) {
    work[i] = x;
  } else {
    w[i] = static_cast<T>(x);
  }
}

template <typename T, bool kFused, bool kAmsgrad, ProxMode kProx, bool kLrTensor, bool kL2, int kGroup,
          typename A>
__attribute__((noinline)) void adamw_elements(const AdamWConst<A>& c, T* __restrict__ w, const T* __restrict__ grad,
                                              A* __restrict__ m1, A* __restrict__ m2, A* __restrict__ mx,
                                              A* __restrict__ ga, A* __restrict__ work, const double* __restrict__ fs,
                                              int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    adamw_element<T, kFused, kAmsgrad, kProx, kLrTensor, kL2, kGroup>(c, w, grad, m1, m2, mx, ga, work, fs, i);
  }
}

// ga, work and fs: AdamWTensor's group, work and floor_scale (kGroup only).
template <typename T, bool kFused, bool kAmsgrad, ProxMode kProx, typename A>
void adamw_block(const AdamWConst<A>& c, T* __restrict__ w, const T* __restrict__ grad, A* __restrict__ m1,
                 A* __restrict__ m2, A* __restrict__ mx, A* ga, A* work, const double* fs, int64_t begin,
                 int64_t end) {
  const bool group = c.group > A(0);
  if constexpr (kNarrow<T>) {
    float wf[kBlock], gf[kBlock];
    const int64_t n = end - begin;
    widen(w + begin, wf, n);
    if (!(group && c.replay > A(0))) widen(grad + begin, gf, n);  // a replay reads no grad
    adamw_block<float, kFused, kAmsgrad, kProx>(c, wf, gf, m1 + begin, m2 + begin, kAmsgrad ? mx + begin : mx,
                                                ga ? ga + begin : ga, group ? work + begin : work,
                                                fs ? fs + begin : fs, 0, n);
    if (!group) narrow(wf, w + begin, n);
  } else {
    auto run = [&](auto lr_tensor, auto l2, auto grouped) {
      adamw_elements<T, kFused, kAmsgrad, kProx, decltype(lr_tensor)::value, decltype(l2)::value,
                     decltype(grouped)::value>(c, w, grad, m1, m2, mx, ga, work, fs, begin, end);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    const bool tensor = c.lr_is_tensor > A(0);
    if constexpr (kProx == ProxMode::kPreconditioned) {
      const auto with = [&](auto grouped) {
        if (c.has_l2 > A(0)) {
          tensor ? run(Yes{}, Yes{}, grouped) : run(No{}, Yes{}, grouped);
        } else {
          tensor ? run(Yes{}, No{}, grouped) : run(No{}, No{}, grouped);
        }
      };
      if constexpr (std::is_same_v<A, float>) {
        if (group && fs != nullptr) {
          if (c.replay > A(0)) {
            with(std::integral_constant<int, kScaledReplay>{});
          } else {
            with(std::integral_constant<int, kScaledGroup>{});
          }
          return;
        }
      }
      if (group && c.replay > A(0)) {
        with(std::integral_constant<int, kReplayGroup>{});
      } else if (group) {
        with(Yes{});
      } else {
        with(No{});
      }
      return;
    } else if (group && c.replay > A(0)) {
      using Replay = std::integral_constant<int, kReplayGroup>;
      tensor ? run(Yes{}, No{}, Replay{}) : run(No{}, No{}, Replay{});
      return;
    } else if (group) {
      tensor ? run(Yes{}, No{}, Yes{}) : run(No{}, No{}, Yes{});
      return;
    }
    tensor ? run(Yes{}, No{}, No{}) : run(No{}, No{}, No{});
  }
}

template <typename T, bool kFused, bool kAmsgrad, ProxMode kProx, bool kPenalty>
void adamw_loop(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  using A = acc_t<T>;
  const AdamWConst<A> c(args, t);
  T* __restrict__ w = static_cast<T*>(t.param);
  const T* __restrict__ grad = static_cast<const T*>(t.grad);
  A* __restrict__ m1 = static_cast<A*>(t.exp_avg);
  A* __restrict__ m2 = static_cast<A*>(t.exp_avg_sq);
  A* __restrict__ mx = static_cast<A*>(t.max_exp_avg_sq);
  A* ga = static_cast<A*>(t.group);
  A* work = static_cast<A*>(t.work);
  const double* fs = t.floor_scale;
  A s1[kLanes] = {}, s2[kLanes] = {};
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    adamw_block<T, kFused, kAmsgrad, kProx>(c, w, grad, m1, m2, mx, ga, work, fs, b, e);
    if constexpr (kPenalty) add_to_lanes(w, b, e, s1, s2);
  }
  if constexpr (kPenalty) add_lanes(s1, s2, sums);
}

// Runs body(T{}) with T the element type of `elem`.
template <typename Body>
inline void dispatch_elem(DType elem, Body&& body) {
  switch (elem) {
    case DType::kHalf:
      body(c10::Half{});
      break;
    case DType::kBFloat16:
      body(c10::BFloat16{});
      break;
    case DType::kFloat:
      body(float{});
      break;
    case DType::kDouble:
      body(double{});
      break;
  }
}

template <typename T, bool kFused, Momentum kMode>
void sgd_for_mode(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  if (args.penalty) {
    sgd_loop<T, kFused, kMode, true>(args, t, begin, end, sums);
  } else {
    sgd_loop<T, kFused, kMode, false>(args, t, begin, end, sums);
  }
}

template <typename T, bool kFused>
void sgd_typed(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  switch (args.momentum_mode) {
    case Momentum::kNone:
      sgd_for_mode<T, kFused, Momentum::kNone>(args, t, begin, end, sums);
      break;
    case Momentum::kInit:
      sgd_for_mode<T, kFused, Momentum::kInit>(args, t, begin, end, sums);
      break;
    case Momentum::kUpdate:
      sgd_for_mode<T, kFused, Momentum::kUpdate>(args, t, begin, end, sums);
      break;
    case Momentum::kReplay:
      sgd_for_mode<T, kFused, Momentum::kReplay>(args, t, begin, end, sums);
      break;
    case Momentum::kReplayBuffer:
      sgd_for_mode<T, kFused, Momentum::kReplayBuffer>(args, t, begin, end, sums);
      break;
  }
}

template <bool kFused>
void sgd_dispatch(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  dispatch_elem(args.elem, [&](auto tag) { sgd_typed<decltype(tag), kFused>(args, t, begin, end, sums); });
}

template <typename T, bool kFused, bool kAmsgrad, ProxMode kProx>
void adamw_for_prox(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  if (args.penalty) {
    adamw_loop<T, kFused, kAmsgrad, kProx, true>(args, t, begin, end, sums);
  } else {
    adamw_loop<T, kFused, kAmsgrad, kProx, false>(args, t, begin, end, sums);
  }
}

template <typename T, bool kFused, bool kAmsgrad>
void adamw_for_amsgrad(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  switch (args.prox) {
    case ProxMode::kNone:
      adamw_for_prox<T, kFused, kAmsgrad, ProxMode::kNone>(args, t, begin, end, sums);
      break;
    case ProxMode::kLr:
      adamw_for_prox<T, kFused, kAmsgrad, ProxMode::kLr>(args, t, begin, end, sums);
      break;
    case ProxMode::kPreconditioned:
      adamw_for_prox<T, kFused, kAmsgrad, ProxMode::kPreconditioned>(args, t, begin, end, sums);
      break;
  }
}

template <bool kFused>
void adamw_dispatch(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  dispatch_elem(args.elem, [&](auto tag) {
    using T = decltype(tag);
    if (args.amsgrad) {
      adamw_for_amsgrad<T, kFused, true>(args, t, begin, end, sums);
    } else {
      adamw_for_amsgrad<T, kFused, false>(args, t, begin, end, sums);
    }
  });
}

}  // namespace
}  // namespace REGFAST_OPTIM_LOOPS
using namespace REGFAST_OPTIM_LOOPS;
}  // namespace optim_cpu
}  // namespace regfast
