// The group passes of AdamW's preconditioned prox with group lasso on the CPU (optim_cpu.h's group_passes), for
// one block of groups of one contiguous tensor seen as [outer, ngroups, inner], and the rounding of a block's
// array into 16-bit params for every step with group lasso. Included by
// optim_cpu_baseline.cpp and optim_cpu_fma.cpp after optim_cpu_math.h, in the same instruction-set namespace.
//
// Every sum over a group is taken in double, element by element in memory order, into the lanes of a fixed
// pattern: column groups of 2-D tensors (inner = 1) hold one sum per group and add a row of the block at a
// time (the groups are the vector's lanes); groups whose elements come in runs (inner > 1) spread each run over
// kSumLanes partial sums, added up in a fixed tree at the end. The pattern depends only on the tensor's shape
// and the block, never on the thread count or the instruction set (no operation is contracted into an fma:
// -ffp-contract=off), so every variant gives the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_types.h"
#include "optim_cpu.h"

#if !defined(REGFAST_OPTIM_LOOPS)
#error "define REGFAST_OPTIM_LOOPS, the namespace of the including file's instruction set"
#endif

namespace regfast {
namespace optim_cpu {
namespace REGFAST_OPTIM_LOOPS {
namespace {

constexpr int kSumLanes = 8;

// Four doubles (GCC's vector extension: one AVX register, two SSE2 ones in the baseline build), each lane rounded
// as the scalar operation rounds it; and its comparison mask.
typedef double Vd __attribute__((vector_size(32)));
typedef int64_t Vm __attribute__((vector_size(32)));
constexpr int kVd = 4;

inline Vd splat(double x) { return Vd{x, x, x, x}; }
template <typename X>
inline Vd load_vd(const X* p) {
  double d[kVd];
  for (int l = 0; l < kVd; ++l) d[l] = static_cast<double>(p[l]);
  Vd v;
  std::memcpy(&v, d, sizeof v);
  return v;
}
inline Vd load_vd(const double* p) {
  Vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_vd(double* p, Vd v) { std::memcpy(p, &v, sizeof v); }

// The operations the group terms use, on one double or on four.
inline double select(bool m, double a, double b) { return m ? a : b; }
inline Vd select(Vm m, Vd a, Vd b) { return m ? a : b; }
inline double clamp_min(double x, double lo) { return x < lo ? lo : x; }  // a NaN stays NaN
inline Vd clamp_min(Vd x, double lo) { return select(x < splat(lo), splat(lo), x); }
inline double magnitude(double x) { return std::abs(x); }
inline Vd magnitude(Vd x) {
  Vm bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= INT64_MAX;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline bool nonzero(double x) { return x != 0.0; }
inline Vm nonzero(Vd x) { return x != splat(0.0); }

// The larger of m and x, NaN as soon as either is (torch's amax).
inline double max_nan(double m, double x) { return (m < x || x != x) ? x : m; }
inline Vd max_nan(Vd m, Vd x) { return select((m < x) | (x != x), x, m); }

struct Add {
  template <typename V>
  static V combine(V s, V v) { return s + v; }
};
struct Max {
  template <typename V>
  static V combine(V s, V v) { return max_nan(s, v); }
};

// Per group j of the block, r0[j] and r1[j] = the combination (C: Add or Max), from `init`, of the two terms
// term(x, y, p, v0, v1) gives for each element (x from xs, y from ys at the same index, p = param[j]; on doubles
// or on four lanes of Vd), in a fixed order: column groups of 2-D tensors (inner = 1) a row of the block at a time,
// one accumulator per group (the groups are the vectors' lanes); groups whose elements come in runs (inner > 1)
// each run over kSumLanes accumulators, element e of a run into lane e mod kSumLanes, the lanes combined in a
// fixed tree at the end. The same bits whether a lane's element is taken on its own or in a vector.
template <typename C, typename X, typename Y, typename Term>
inline void group_reduce(const GroupBlock& b, const X* __restrict__ xs, const Y* __restrict__ ys,
                         const double* __restrict__ param, double init, double* __restrict__ r0,
                         double* __restrict__ r1, Term term) {
  const int64_t ng = b.g1 - b.g0;
  if (b.inner == 1) {
    for (int64_t j = 0; j < ng; ++j) r0[j] = r1[j] = init;
    for (int64_t o = 0; o < b.outer; ++o) {
      const int64_t base = o * b.ngroups + b.g0;
      const X* __restrict__ x = xs + base;
      const Y* __restrict__ y = ys + base;
      int64_t j = 0;
      for (; j + kVd <= ng; j += kVd) {
        Vd v0, v1;
        term(load_vd(x + j), load_vd(y + j), load_vd(param + j), v0, v1);
        store_vd(r0 + j, C::combine(load_vd(r0 + j), v0));
        store_vd(r1 + j, C::combine(load_vd(r1 + j), v1));
      }
      for (; j < ng; ++j) {
        double v0, v1;
        term(static_cast<double>(x[j]), static_cast<double>(y[j]), param[j], v0, v1);
        r0[j] = C::combine(r0[j], v0);
        r1[j] = C::combine(r1[j], v1);
      }
    }
    return;
  }
  for (int64_t j = 0; j < ng; ++j) {
    const Vd p = splat(param[j]);
    Vd a0 = splat(init), a1 = a0, b0 = a0, b1 = a0;  // lanes 0-3 and 4-7 of each term
    double s0[kSumLanes], s1[kSumLanes];
    for (int64_t o = 0; o < b.outer; ++o) {
      const int64_t start = (o * b.ngroups + b.g0 + j) * b.inner;
      const X* __restrict__ x = xs + start;
      const Y* __restrict__ y = ys + start;
      int64_t e = 0;
      for (; e + kSumLanes <= b.inner; e += kSumLanes) {
        Vd v0, v1;
        term(load_vd(x + e), load_vd(y + e), p, v0, v1);
        a0 = C::combine(a0, v0);
        a1 = C::combine(a1, v1);
        term(load_vd(x + e + kVd), load_vd(y + e + kVd), p, v0, v1);
        b0 = C::combine(b0, v0);
        b1 = C::combine(b1, v1);
      }
      if (e < b.inner) {
        store_vd(s0, a0);
        store_vd(s0 + kVd, b0);
        store_vd(s1, a1);
        store_vd(s1 + kVd, b1);
        for (int l = 0; e < b.inner; ++e, ++l) {
          double v0, v1;
          term(static_cast<double>(x[e]), static_cast<double>(y[e]), param[j], v0, v1);
          s0[l] = C::combine(s0[l], v0);
          s1[l] = C::combine(s1[l], v1);
        }
        a0 = load_vd(s0);
        b0 = load_vd(s0 + kVd);
        a1 = load_vd(s1);
        b1 = load_vd(s1 + kVd);
      }
    }
    store_vd(s0, a0);
    store_vd(s0 + kVd, b0);
    store_vd(s1, a1);
    store_vd(s1 + kVd, b1);
    for (int width = kSumLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) {
        s0[l] = C::combine(s0[l], s0[l + width]);
        s1[l] = C::combine(s1[l], s1[l + width]);
      }
    }
    r0[j] = s0[0];
    r1[j] = s1[0];
  }
}

// Calls f(i, l, j) for every element of the block: i its index in the tensor, l in the block's own arrays
// ([outer, g1 − g0, inner]), j its group's index in the block; in memory order.
template <typename F>
inline void for_each_element(const GroupBlock& b, F&& f) {
  const int64_t ng = b.g1 - b.g0;
  const int64_t span = ng * b.inner;
  for (int64_t o = 0; o < b.outer; ++o) {
    const int64_t base = (o * b.ngroups + b.g0) * b.inner;
    const int64_t local = o * span;
    if (b.inner == 1) {
      for (int64_t j = 0; j < ng; ++j) f(base + j, local + j, j);
    } else {
      for (int64_t j = 0; j < ng; ++j) {
        for (int64_t k = 0; k < b.inner; ++k) f(base + j * b.inner + k, local + j * b.inner + k, j);
      }
    }
  }
}

// The block's own arrays seen as a block: [outer, g1 − g0, inner], every group of it.
inline GroupBlock own_layout(const GroupBlock& b) { return {b.outer, b.g1 - b.g0, b.inner, 0, b.g1 - b.g0}; }

// out_l = (|w_i| / ‖w_g‖₂) · weight in A (reference: penalty_gradient_scales' group term), the norm in double
// (reference: group_norms). Squares of float32 / 16-bit values neither overflow nor underflow in double, so their
// norms are taken as they are; float64 groups are scaled by their largest magnitude first, as the reference does.
template <typename T>
void group_floors_typed(const T* __restrict__ w, acc_t<T>* __restrict__ out, const GroupBlock& b, double weight) {
  using A = acc_t<T>;
  constexpr bool kScaled = std::is_same_v<T, double>;
  const int64_t ng = b.g1 - b.g0;
  std::vector<double> buf(4 * ng, 0.0);
  double* __restrict__ scale = buf.data();
  double* __restrict__ norm = scale + ng;
  double* __restrict__ unused = norm + ng;
  double* __restrict__ zeros = unused + ng;
  if constexpr (kScaled) {
    group_reduce<Max>(b, w, w, zeros, 0.0, scale, unused, [](auto x, auto, auto, auto& v0, auto& v1) {
      v0 = magnitude(x);
      v1 = x - x;
    });
    for (int64_t j = 0; j < ng; ++j) scale[j] = scale[j] > 0 ? scale[j] : 1.0;
  } else {
    for (int64_t j = 0; j < ng; ++j) scale[j] = 1.0;
  }
  group_reduce<Add>(b, w, w, scale, 0.0, norm, unused, [](auto x, auto, auto p, auto& v0, auto& v1) {
    const auto y = kScaled ? x / p : x;
    v0 = y * y;
    v1 = y - y;
  });
  for (int64_t j = 0; j < ng; ++j) {
    const double n = std::sqrt(norm[j]) * scale[j];
    norm[j] = n == 0 ? 1.0 : n;
  }
  // |w_i| / ‖w_g‖ first, as the reference: weight / ‖w_g‖ overflows for a float64 group of subnormal norm.
  for_each_element(b, [&](int64_t i, int64_t l, int64_t j) {
    out[l] = static_cast<A>((std::abs(static_cast<double>(w[i])) / norm[j]) * weight);
  });
}

// u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂ (reference: _metric_group_shrink_) on the block's own arrays,
// the results rounded into the params w: the group vanishes when ‖u_g/a_g‖₂ ≤ 1, else x_i = u_i·t/(t + a_i) with t
// the root of Σ_i u_i²/(t + a_i)² = 1, by Newton's method from max(‖u_g‖ − max a_g, 0), at most the reference's
// METRIC_NEWTON_STEPS steps, in double. The iterates rise monotonically to the root; a group stops after the first
// step that rises by less than kSettled relative to t (or not at all), and a NaN stops it as NaN. The factor
// t/(t + a_i) is then rounded as the reference rounds it, from t rounded to A.
template <typename A, typename T>
void metric_shrink_typed(A* __restrict__ u, const A* __restrict__ a, T* __restrict__ w, const GroupBlock& b) {
  constexpr int kNewtonSteps = 8;
  // A step that moves t by at most this much relative to it leaves an error of the order of its square (Newton's
  // steps converge quadratically): t is then the root to double rounding, and the group stops.
  constexpr double kSettled = 0x1p-30;
  constexpr double tiny = std::numeric_limits<A>::min();
  const GroupBlock own = own_layout(b);
  const int64_t ng = own.ngroups;
  std::vector<double> buf(7 * ng, 0.0);
  double* __restrict__ s0 = buf.data();
  double* __restrict__ s1 = s0 + ng;
  double* __restrict__ t = s1 + ng;
  double* __restrict__ amax = t + ng;
  double* __restrict__ unused = amax + ng;
  double* __restrict__ active = unused + ng;  // 1 while a group's Newton steps run, else 0
  double* __restrict__ zeros = active + ng;
  group_reduce<Add>(own, u, a, zeros, 0.0, s0, s1, [](auto x, auto y, auto, auto& v0, auto& v1) {
    const auto q = x / y;
    v0 = select(nonzero(x), q * q, x - x);
    v1 = x * x;
  });
  group_reduce<Max>(own, a, a, zeros, 0.0, amax, unused, [](auto y, auto, auto, auto& v0, auto& v1) {
    v0 = y;
    v1 = y - y;
  });
  std::vector<char> vanishes(ng);
  bool running = false;
  for (int64_t j = 0; j < ng; ++j) {
    vanishes[j] = s0[j] <= 1;
    const double t0 = std::sqrt(s1[j]) - amax[j];
    t[j] = t0 < 0 ? 0.0 : t0;
    active[j] = vanishes[j] ? 0.0 : 1.0;
    running = running || !vanishes[j];
  }
  for (int step = 0; running && step < kNewtonSteps; ++step) {
    group_reduce<Add>(own, u, a, t, 0.0, s0, s1, [](auto x, auto y, auto tj, auto& v0, auto& v1) {
      // r is finite (d ≥ tiny), so q = 0 where x = 0 unless d is NaN, where the reference's sums are NaN too.
      const auto r = 1.0 / clamp_min(tj + y, tiny);
      const auto q = x * r;
      const auto q2 = q * q;
      v0 = q2;
      v1 = q2 * r;
    });
    running = false;
    for (int64_t j = 0; j < ng; ++j) {
      if (active[j] == 0) continue;
      const double r2 = s0[j];
      const double slope = s1[j] < tiny ? tiny : s1[j];
      const double next = t[j] + (std::sqrt(r2) - 1) * r2 / slope;
      active[j] = next - t[j] > kSettled * next ? 1.0 : 0.0;
      t[j] = next;
      running = running || active[j] != 0;
    }
  }
  std::vector<A> root(ng);
  for (int64_t j = 0; j < ng; ++j) root[j] = static_cast<A>(t[j]);
  const A* __restrict__ rt = root.data();
  for_each_element(b, [&](int64_t i, int64_t l, int64_t j) {
    A d = rt[j] + a[l];
    d = d < A(tiny) ? A(tiny) : d;
    const A factor = vanishes[j] ? A(0) : rt[j] / d;
    w[i] = static_cast<T>(u[l] * factor);
  });
}

inline void group_floors_run(DType elem, const void* w, void* out, const GroupBlock& b, double weight) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    group_floors_typed<T>(static_cast<const T*>(w), static_cast<acc_t<T>*>(out), b, weight);
  });
}

inline void metric_shrink_run(DType elem, void* u, const void* a, void* w, const GroupBlock& b) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    metric_shrink_typed<A, T>(static_cast<A*>(u), static_cast<const A*>(a), static_cast<T*>(w), b);
  });
}

inline void round_into_run(DType elem, const void* work, void* w, const GroupBlock& b) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t span = (b.g1 - b.g0) * b.inner;
    for (int64_t o = 0; o < b.outer; ++o) {
      const A* src = static_cast<const A*>(work) + o * span;
      T* dst = static_cast<T*>(w) + (o * b.ngroups + b.g0) * b.inner;
      if constexpr (std::is_same_v<T, A>) {
        std::memcpy(dst, src, static_cast<size_t>(span) * sizeof(T));
      } else {
        narrow(src, dst, span);
      }
    }
  });
}

}  // namespace
}  // namespace REGFAST_OPTIM_LOOPS
}  // namespace optim_cpu
}  // namespace regfast
