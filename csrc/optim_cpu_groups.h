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
#include <type_traits>
#include <utility>
#include <vector>

#include "groups.h"
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
constexpr int64_t kReduceRows = 4;  // group_reduce's column groups

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

// Output k of a reduction combines its terms by adding them or, where bit k of kMax is set, by keeping the
// largest (max_nan: NaN as soon as one is).
template <unsigned kMax, int k, typename V>
inline V combine(V s, V v) {
  if constexpr (((kMax >> k) & 1u) != 0) {
    return max_nan(s, v);
  } else {
    return s + v;
  }
}

// f(std::integral_constant<int, k>{}) for k = 0, ..., N − 1: the outputs of a reduction, each with its combiner.
template <typename F, int... K>
inline void each_output(F&& f, std::integer_sequence<int, K...>) {
  (f(std::integral_constant<int, K>{}), ...);
}
template <int N, typename F>
inline void each_output(F&& f) {
  each_output(f, std::make_integer_sequence<int, N>{});
}

// r[k][j] for one group whose elements come in `runs` runs of `len` elements, run o at xs + o·stride (ys alike):
// element e of a run into lane e mod kSumLanes of each output, the lanes combined in a fixed tree at the end
// (group_reduce's groups with inner > 1, pack_reduce's).
template <int N, unsigned kMax, typename X, typename Y, typename Term>
inline void reduce_runs(const X* __restrict__ xs, const Y* __restrict__ ys, int64_t runs, int64_t stride, int64_t len,
                        double param, int64_t j, double* const (&r)[N], Term term) {
  const Vd p = splat(param);
  Vd lo[N], hi[N];  // lanes 0-3 and 4-7 of each output
  for (int k = 0; k < N; ++k) lo[k] = hi[k] = splat(0.0);
  double s[N][kSumLanes];
  for (int64_t o = 0; o < runs; ++o) {
    const X* __restrict__ x = xs + o * stride;
    const Y* __restrict__ y = ys + o * stride;
    int64_t e = 0;
    for (; e + kSumLanes <= len; e += kSumLanes) {
      Vd v[N], w[N];
      term(load_vd(x + e), load_vd(y + e), p, v);
      term(load_vd(x + e + kVd), load_vd(y + e + kVd), p, w);
      each_output<N>([&](auto k) {
        constexpr int kk = decltype(k)::value;
        lo[kk] = combine<kMax, kk>(lo[kk], v[kk]);
        hi[kk] = combine<kMax, kk>(hi[kk], w[kk]);
      });
    }
    if (e < len) {
      for (int k = 0; k < N; ++k) {
        store_vd(s[k], lo[k]);
        store_vd(s[k] + kVd, hi[k]);
      }
      for (int l = 0; e < len; ++e, ++l) {
        double v[N];
        term(static_cast<double>(x[e]), static_cast<double>(y[e]), param, v);
        each_output<N>([&](auto k) {
          constexpr int kk = decltype(k)::value;
          s[kk][l] = combine<kMax, kk>(s[kk][l], v[kk]);
        });
      }
      for (int k = 0; k < N; ++k) {
        lo[k] = load_vd(s[k]);
        hi[k] = load_vd(s[k] + kVd);
      }
    }
  }
  each_output<N>([&](auto k) {
    constexpr int kk = decltype(k)::value;
    store_vd(s[kk], lo[kk]);
    store_vd(s[kk] + kVd, hi[kk]);
    for (int width = kSumLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) s[kk][l] = combine<kMax, kk>(s[kk][l], s[kk][l + width]);
    }
    r[kk][j] = s[kk][0];
  });
}

// Per group j of the block and output k < N, r[k][j] = the combination (combine<kMax, k>), from 0, of the terms
// term(x, y, p, v) gives for each element in v[0 .. N − 1] (x from xs, y from ys at the same index, p = param[j];
// on doubles or on four lanes of Vd), in a fixed order: column groups of 2-D tensors (inner = 1) a row of the block
// at a time, one accumulator per group (the groups are the vectors' lanes); groups whose elements come in runs
// (inner > 1) each run over kSumLanes accumulators, element e of a run into lane e mod kSumLanes, the lanes
// combined in a fixed tree at the end. The same bits whether a lane's element is taken on its own or in a vector,
// and for output k whatever the other outputs are.
template <int N, unsigned kMax, typename X, typename Y, typename Term>
inline void group_reduce(const GroupBlock& b, const X* __restrict__ xs, const Y* __restrict__ ys,
                         const double* __restrict__ param, double* const (&r)[N], Term term) {
  const int64_t ng = b.g1 - b.g0;
  if (b.inner == 1) {
    for (int k = 0; k < N; ++k) std::fill(r[k], r[k] + ng, 0.0);
    // Rows o .. o + kRows − 1, each vector of sums loaded and stored once for them and the rows added in order: the
    // same bits kReduceRows rows at a time as a row at a time, without a load and a store of the sums per row.
    const auto add_rows = [&](int64_t o, auto rows) {
      constexpr int64_t kRows = decltype(rows)::value;
      const int64_t base = o * b.ngroups + b.g0;
      const X* __restrict__ x = xs + base;
      const Y* __restrict__ y = ys + base;
      int64_t j = 0;
      for (; j + kVd <= ng; j += kVd) {
        const Vd p = load_vd(param + j);
        Vd s[N];
        for (int k = 0; k < N; ++k) s[k] = load_vd(r[k] + j);
        for (int64_t row = 0; row < kRows; ++row) {
          Vd v[N];
          term(load_vd(x + row * b.ngroups + j), load_vd(y + row * b.ngroups + j), p, v);
          each_output<N>([&](auto k) {
            constexpr int kk = decltype(k)::value;
            s[kk] = combine<kMax, kk>(s[kk], v[kk]);
          });
        }
        for (int k = 0; k < N; ++k) store_vd(r[k] + j, s[k]);
      }
      for (; j < ng; ++j) {
        for (int64_t row = 0; row < kRows; ++row) {
          double v[N];
          term(static_cast<double>(x[row * b.ngroups + j]), static_cast<double>(y[row * b.ngroups + j]), param[j], v);
          each_output<N>([&](auto k) {
            constexpr int kk = decltype(k)::value;
            r[kk][j] = combine<kMax, kk>(r[kk][j], v[kk]);
          });
        }
      }
    };
    int64_t o = 0;
    for (; o + kReduceRows <= b.outer; o += kReduceRows) add_rows(o, std::integral_constant<int64_t, kReduceRows>{});
    for (; o < b.outer; ++o) add_rows(o, std::integral_constant<int64_t, 1>{});
    return;
  }
  for (int64_t j = 0; j < ng; ++j) {
    reduce_runs<N, kMax>(xs + (b.g0 + j) * b.inner, ys + (b.g0 + j) * b.inner, b.outer, b.ngroups * b.inner,
                         b.inner, param[j], j, r, term);
  }
}

// group_reduce over a pack's groups, each one run of its elements in the pack's own arrays: the sums of a block of
// one group, whose elements are that run (inner its size; one element alone gives the same bits as inner = 1's
// path: 0 + v, then + 0 in the tree).
template <int N, unsigned kMax, typename X, typename Y, typename Term>
inline void pack_reduce(const GroupPack& p, const X* __restrict__ xs, const Y* __restrict__ ys,
                        const double* __restrict__ param, double* const (&r)[N], Term term) {
  for (int64_t j = 0; j < p.ng;) {
    const int64_t at = p.offsets[j];
    if (j + kVd <= p.ng && p.offsets[j + kVd] - at == kVd) {
      // Four one-element groups in a row: their terms on a vector's lanes, each 0 combined with its term, as
      // group_reduce's column groups take them (the same bits as one at a time).
      Vd v[N];
      term(load_vd(xs + at), load_vd(ys + at), load_vd(param + j), v);
      each_output<N>([&](auto k) {
        constexpr int kk = decltype(k)::value;
        store_vd(r[kk] + j, combine<kMax, kk>(splat(0.0), v[kk]));
      });
      j += kVd;
      continue;
    }
    reduce_runs<N, kMax>(xs + at, ys + at, 1, 0, p.offsets[j + 1] - at, param[j], j, r, term);
    ++j;
  }
}

// The groups of a block (group_reduce) or of a pack (pack_reduce), for the passes that take either.
struct BlockGroups {
  const GroupBlock& b;
  int64_t count() const { return b.g1 - b.g0; }
  template <int N, unsigned kMax, typename X, typename Y, typename Term>
  void reduce(const X* x, const Y* y, const double* param, double* const (&r)[N], Term term) const {
    group_reduce<N, kMax>(b, x, y, param, r, term);
  }
};
struct PackGroups {
  const GroupPack& p;
  int64_t count() const { return p.ng; }
  template <int N, unsigned kMax, typename X, typename Y, typename Term>
  void reduce(const X* x, const Y* y, const double* param, double* const (&r)[N], Term term) const {
    pack_reduce<N, kMax>(p, x, y, param, r, term);
  }
};

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

// norm_j = ‖x_g‖₂ in double of every group j of a block of x laid out as `layout` (reference: group_norms), or of a
// pack's own array x (group_norms_of). Squares of float32 / 16-bit values neither overflow nor underflow in double,
// so their norms are taken as they are; float64 groups are scaled by their largest magnitude first, as the
// reference does (not a group holding an inf or NaN: its norm is inf or NaN, as the reference's). `scratch`: ng
// doubles.
template <typename Groups, typename X>
void group_norms_of(const Groups& groups, const X* x, double* __restrict__ norm, double* __restrict__ scratch) {
  const int64_t ng = groups.count();
  double* const squares[1] = {norm};
  std::fill(scratch, scratch + ng, 1.0);
  if constexpr (std::is_same_v<X, double>) {
    double* const largest[1] = {scratch};
    groups.template reduce<1, 1u>(x, x, norm, largest, [](auto v, auto, auto, auto* r) { r[0] = magnitude(v); });
    for (int64_t j = 0; j < ng; ++j) scratch[j] = scratch[j] > 0 && std::isfinite(scratch[j]) ? scratch[j] : 1.0;
    groups.template reduce<1, 0u>(x, x, scratch, squares, [](auto v, auto, auto p, auto* r) {
      const auto y = v / p;
      r[0] = y * y;
    });
  } else {
    groups.template reduce<1, 0u>(x, x, scratch, squares, [](auto v, auto, auto, auto* r) { r[0] = v * v; });
  }
  for (int64_t j = 0; j < ng; ++j) norm[j] = std::sqrt(norm[j]) * scratch[j];
}

template <typename X>
void block_group_norms(const GroupBlock& layout, const X* x, double* __restrict__ norm, double* __restrict__ scratch) {
  group_norms_of(BlockGroups{layout}, x, norm, scratch);
}

// out_l = (|w_i| / ‖w_g‖₂) · weight in A (reference: penalty_gradient_scales' group term), the norm by
// block_group_norms. Float32 / 16-bit elements are multiplied by weight / ‖w_g‖ in double (a double ulp or two from
// the quotient: the same value rounded to A but within that of a rounding boundary); float64 ones are divided by the
// norm first, as the reference does: weight / ‖w_g‖ overflows for a group of subnormal norm. With `scales` (float32
// / 16-bit params), weight / ‖w_g‖ of each group j of the block into scales[j] instead, for the step to form the
// floors from (AdamWTensor::floor_scale); `out` then only holds 16-bit params widened.
template <typename T>
void group_floors_typed(const T* __restrict__ w, acc_t<T>* __restrict__ out, const GroupBlock& b, double weight,
                        double* __restrict__ scales) {
  using A = acc_t<T>;
  constexpr bool kScaled = std::is_same_v<T, double>;
  const int64_t ng = b.g1 - b.g0;
  GroupArray<double> buf(2 * ng, 0.0);
  double* __restrict__ scale = buf.data();
  double* __restrict__ norm = scale + ng;
  if constexpr (std::is_same_v<T, A>) {
    block_group_norms(b, w, norm, scale);
  } else {
    // 16-bit params: the block's widened into `out` first (the variant's conversion, F16C for float16), in its
    // own layout; the norms and floors from there.
    const int64_t span = ng * b.inner;
    for (int64_t o = 0; o < b.outer; ++o) widen(w + (o * b.ngroups + b.g0) * b.inner, out + o * span, span);
    block_group_norms(own_layout(b), out, norm, scale);
  }
  for (int64_t j = 0; j < ng; ++j) norm[j] = norm[j] == 0 ? 1.0 : norm[j];
  if constexpr (kScaled) {
    for_each_element(b, [&](int64_t i, int64_t l, int64_t j) { out[l] = (std::abs(w[i]) / norm[j]) * weight; });
  } else {
    for (int64_t j = 0; j < ng; ++j) scale[j] = weight / norm[j];
    if (scales != nullptr) {
      std::copy(scale, scale + ng, scales);
      return;
    }
    for_each_element(b, [&](int64_t i, int64_t l, int64_t j) {
      const double x = std::is_same_v<T, A> ? static_cast<double>(w[i]) : static_cast<double>(out[l]);
      out[l] = static_cast<A>(std::abs(x) * scale[j]);
    });
  }
}

// The sums of Adam's metric group shrink (optim_cpu.h's metric_roots), per element of u (the new values) and a
// (the thresholds): MetricFirst ‖u_g‖² and Σ u_i²·a_i (no division); MetricTest the vanishing test's Σ (u_i/a_i)²
// (over u_i ≠ 0); MetricNewton<A> S2, S3, S4 at t = p, each element dividing once (r is finite, d ≥ tiny: q = 0
// where u = 0 unless d is NaN, where the reference's sums are NaN too).
struct MetricFirst {
  template <typename V>
  void operator()(V x, V y, V, V* v) const {
    v[0] = x * x;
    v[1] = v[0] * y;
  }
};
struct MetricTest {
  template <typename V>
  void operator()(V x, V y, V, V* v) const {
    const V q = x / y;
    v[0] = select(nonzero(x), q * q, x - x);
  }
};
template <typename A>
struct MetricNewton {
  template <typename V>
  void operator()(V x, V y, V t, V* v) const {
    const V r = 1.0 / clamp_min(t + y, std::numeric_limits<A>::min());
    const V q = x * r;
    const V q2 = q * q;
    v[0] = q2;
    v[1] = q2 * r;
    v[2] = v[1] * r;
  }
};

// x = u·t/(t + a) rounded to T, t rounded to A (the reference's factor); 0 where the group vanishes.
template <typename A, typename T>
inline T metric_result(A u, A a, A root, bool vanishes) {
  constexpr A tiny = std::numeric_limits<A>::min();
  A d = root + a;
  d = d < tiny ? tiny : d;
  const A factor = vanishes ? A(0) : root / d;
  return static_cast<T>(u * factor);
}

// u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂ on the block's own arrays (the roots by optim_cpu.h's
// metric_roots from the arrays' sums), the results rounded into the params w. The vanishing test's pass runs only
// for a block with a group left in doubt; for float32 / 16-bit params the Newton step that stops is usually the
// first.
// t_j and vanishes_j of Adam's metric group shrink for every group of a block's or a pack's own arrays u (the new
// values) and a (the thresholds), by optim_cpu.h's metric_roots from the arrays' sums.
template <typename A, typename Groups>
void metric_group_roots(const Groups& groups, const A* u, const A* a, double* t, char* vanishes) {
  // (MetricFirst and MetricTest take no per-group parameter: they are given t, unread.)
  metric_roots<A>(groups.count(), [&](int stage, double* const (&s)[3], const double* at) {
    if (stage == 0) {
      double* const first[2] = {s[0], s[1]};
      groups.template reduce<2, 0u>(u, a, at, first, MetricFirst{});
    } else if (stage == 1) {
      double* const test[1] = {s[0]};
      groups.template reduce<1, 0u>(u, a, at, test, MetricTest{});
    } else {
      groups.template reduce<3, 0u>(u, a, at, s, MetricNewton<A>{});
    }
  }, t, vanishes);
}

// u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂ on the block's own arrays (metric_group_roots), the results
// rounded into the params w. The vanishing test's pass runs only for a block with a group left in doubt; for
// float32 / 16-bit params the Newton step that stops is usually the first.
template <typename A, typename T>
void metric_shrink_typed(A* __restrict__ u, const A* __restrict__ a, T* __restrict__ w, const GroupBlock& b) {
  const GroupBlock own = own_layout(b);
  const int64_t ng = own.ngroups;
  GroupArray<double> t(ng);
  GroupArray<char> vanishes(ng);
  metric_group_roots<A>(BlockGroups{own}, u, a, t.data(), vanishes.data());
  GroupArray<A> root(ng);
  for (int64_t j = 0; j < ng; ++j) root[j] = static_cast<A>(t[j]);
  const A* __restrict__ rt = root.data();
  if constexpr (std::is_same_v<T, A>) {
    for_each_element(b, [&](int64_t i, int64_t l, int64_t j) {
      w[i] = metric_result<A, T>(u[l], a[l], rt[j], vanishes[j]);
    });
  } else {
    // Into u, then rounded by the variant (F16C for float16): the same bits as the scalar conversion.
    for_each_element(b, [&](int64_t, int64_t l, int64_t j) {
      u[l] = metric_result<A, A>(u[l], a[l], rt[j], vanishes[j]);
    });
    const int64_t span = ng * b.inner;
    for (int64_t o = 0; o < b.outer; ++o) narrow(u + o * span, w + (o * b.ngroups + b.g0) * b.inner, span);
  }
}

inline void group_floors_run(DType elem, const void* w, void* out, const GroupBlock& b, double weight,
                             double* scales) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    group_floors_typed<T>(static_cast<const T*>(w), static_cast<acc_t<T>*>(out), b, weight, scales);
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

// prox_'s group shrink with only the group term on the block's own array u (accumulation dtype), rounded into the
// block's params w: u_g·max(0, 1 − coef·√|g| / ‖u_g‖₂) (group_shrink_factor), the norm by block_group_norms. The
// scaled values go into the params a piece of at most kShrinkPiece elements at a time, each scaled in u and rounded
// while in the L1 cache; with lines `ahead`, pieces of kAheadPiece, each followed by its share of the lines (asked for
// in fewer, larger batches they came in later: 50257 × 768 float16 SGD by rows, one thread, 29-30 ms per step with
// pieces of 512, 33-34 with 4096; without, the larger pieces are faster: 1024 × 512, 0.24-0.25 ms against 0.27-0.28).
constexpr int64_t kShrinkPiece = 4096;
constexpr int64_t kAheadPiece = 512;

// x_k·f_k (kOne: x_k·f_0) for n elements: into the params y where they are of the accumulation dtype, else into x (to
// be rounded).
template <bool kOne, typename T, typename A>
inline void scale_run(A* __restrict__ x, const A* __restrict__ f, T* __restrict__ y, int64_t n) {
  A* out = nullptr;  // based on y or x
  if constexpr (std::is_same_v<T, A>) {
    out = y;
  } else {
    out = x;
  }
  if constexpr (kOne) {
    const A s = f[0];
    for (int64_t k = 0; k < n; ++k) out[k] = x[k] * s;
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = x[k] * f[k];
  }
}

template <typename T>
void group_shrink_typed(acc_t<T>* __restrict__ u, T* __restrict__ w, const GroupBlock& b, double coef,
                        LinesAhead* ahead) {
  using A = acc_t<T>;
  const int64_t ng = b.g1 - b.g0;
  GroupArray<double> buf(2 * ng);
  block_group_norms(own_layout(b), u, buf.data(), buf.data() + ng);
  const double c = coef * std::sqrt(static_cast<double>(b.outer * b.inner));
  GroupArray<A> factor(static_cast<size_t>(ng));
  for (int64_t j = 0; j < ng; ++j) factor[j] = group_shrink_factor<A>(buf[j], c);
  const A* __restrict__ f = factor.data();
  const int64_t span = ng * b.inner;
  for (int64_t o = 0; o < b.outer; ++o) {
    A* const src = u + o * span;
    T* const dst = w + (o * b.ngroups + b.g0) * b.inner;
    for (int64_t e = 0; e < span;) {
      const int64_t end = std::min(span, e + (ahead != nullptr ? kAheadPiece : kShrinkPiece));
      for (int64_t i = e; i < end;) {  // a run of one group's elements, or with inner = 1 of one element per group
        const int64_t j = i / b.inner;
        const int64_t stop = b.inner == 1 ? end : std::min(end, (j + 1) * b.inner);
        A* __restrict__ x = src + i;
        T* __restrict__ y = dst + i;
        const int64_t n = stop - i;
        if (b.inner == 1) {
          scale_run<false>(x, f + i, y, n);
        } else {
          scale_run<true>(x, f + j, y, n);
        }
        i = stop;
      }
      if constexpr (!std::is_same_v<T, A>) narrow(src + e, dst + e, end - e);
      if (ahead != nullptr) ahead->ask((ahead->total * (end - e) + b.outer * span - 1) / (b.outer * span));
      e = end;
    }
  }
}

inline void group_shrink_run(DType elem, void* u, void* w, const GroupBlock& b, double coef, LinesAhead* ahead) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    group_shrink_typed<T>(static_cast<acc_t<T>*>(u), static_cast<T*>(w), b, coef, ahead);
  });
}

// The group passes over a pack (optim_cpu.h's GroupPack): whole tensors of one group each, group j's elements at
// [offsets[j], offsets[j + 1]) of the pack's own arrays, its params at params[j]. Each gives every group the bits
// the block passes give it as a block of its own (pack_reduce's sums, the same per-element arithmetic), with one
// call for the pack where the blocks take one per tensor.
template <typename T>
void pack_floors_typed(const GroupPack& p, const double* weight, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t ng = p.ng;
  // Each tensor copied (16-bit ones widened, the variant's conversion) into its place in out, the norms and
  // floors from there: the values group_floors_typed reads from the params.
  for (int64_t j = 0; j < ng; ++j) {
    const T* w = static_cast<const T*>(p.params[j]);
    const int64_t at = p.offsets[j], n = p.offsets[j + 1] - at;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(out + at, w, static_cast<size_t>(n) * sizeof(T));
    } else {
      widen(w, out + at, n);
    }
  }
  GroupArray<double> buf(2 * ng, 0.0);
  double* __restrict__ scale = buf.data();
  double* __restrict__ norm = scale + ng;
  group_norms_of(PackGroups{p}, out, norm, scale);
  for (int64_t j = 0; j < ng; ++j) {
    const double nj = norm[j] == 0 ? 1.0 : norm[j];
    A* __restrict__ x = out + p.offsets[j];
    const int64_t n = p.offsets[j + 1] - p.offsets[j];
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t k = 0; k < n; ++k) x[k] = (std::abs(x[k]) / nj) * weight[j];
    } else {
      const double sj = weight[j] / nj;
      for (int64_t k = 0; k < n; ++k) x[k] = static_cast<A>(std::abs(static_cast<double>(x[k])) * sj);
    }
  }
}

template <typename A, typename T>
void pack_metric_shrink_typed(A* __restrict__ u, const A* __restrict__ a, const GroupPack& p) {
  const int64_t ng = p.ng;
  GroupArray<double> t(ng);
  GroupArray<char> vanishes(ng);
  metric_group_roots<A>(PackGroups{p}, u, a, t.data(), vanishes.data());
  for (int64_t j = 0; j < ng; ++j) {
    const A root = static_cast<A>(t[j]);
    const int64_t at = p.offsets[j], n = p.offsets[j + 1] - at;
    T* __restrict__ w = static_cast<T*>(p.params[j]);
    if constexpr (std::is_same_v<T, A>) {
      for (int64_t k = 0; k < n; ++k) w[k] = metric_result<A, T>(u[at + k], a[at + k], root, vanishes[j]);
    } else {
      for (int64_t k = 0; k < n; ++k) u[at + k] = metric_result<A, A>(u[at + k], a[at + k], root, vanishes[j]);
      narrow(u + at, w, n);
    }
  }
}

template <typename T>
void pack_group_shrink_typed(acc_t<T>* __restrict__ u, const GroupPack& p, double coef) {
  using A = acc_t<T>;
  const int64_t ng = p.ng;
  GroupArray<double> buf(2 * ng);
  group_norms_of(PackGroups{p}, u, buf.data(), buf.data() + ng);
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t at = p.offsets[j], n = p.offsets[j + 1] - at;
    const A factor = group_shrink_factor<A>(buf[j], coef * std::sqrt(static_cast<double>(n)));
    T* const w = static_cast<T*>(p.params[j]);
    scale_run<true>(u + at, &factor, w, n);
    if constexpr (!std::is_same_v<T, A>) narrow(u + at, w, n);
  }
}

inline void pack_floors_run(DType elem, const GroupPack& p, const double* weight, void* out) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    pack_floors_typed<T>(p, weight, static_cast<acc_t<T>*>(out));
  });
}

inline void pack_metric_shrink_run(DType elem, void* u, const void* a, const GroupPack& p) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    pack_metric_shrink_typed<A, T>(static_cast<A*>(u), static_cast<const A*>(a), p);
  });
}

inline void pack_group_shrink_run(DType elem, void* u, const GroupPack& p, double coef) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    pack_group_shrink_typed<T>(static_cast<acc_t<T>*>(u), p, coef);
  });
}

// Over n elements seen as rows of `cols` (the last row may be short), out[k][c] combined with term k over column c's
// elements (group_reduce over the rows, in row order, then combined into out: added, or the largest where bit k of
// kMax is set): the passes of Adam's metric over a large tensor by columns or as one group (optim_cpu.cpp's
// metric_passes). p: one value per column.
template <int N, unsigned kMax = 0u, typename X, typename Y, typename Term>
void add_column_sums(const X* x, const Y* y, const double* p, int64_t n, int64_t cols, double* const* out,
                     Term term) {
  std::vector<double> buf((N + 1) * cols, 0.0);
  double* part[N];
  for (int k = 0; k < N; ++k) part[k] = buf.data() + (k + 1) * cols;
  const double* param = p ? p : buf.data();
  const int64_t rows = n / cols, rest = n % cols;
  const auto add = [&](const GroupBlock& b, int64_t at) {
    double* const (&sums)[N] = part;
    group_reduce<N, kMax>(b, x + at, y + at, param, sums, term);
    each_output<N>([&](auto k) {
      constexpr int kk = decltype(k)::value;
      for (int64_t c = 0; c < b.ngroups; ++c) out[kk][c] = combine<kMax, kk>(out[kk][c], part[kk][c]);
    });
  };
  if (rows) add(GroupBlock{rows, cols, 1, 0, cols}, 0);
  if (rest) add(GroupBlock{1, rest, 1, 0, rest}, rows * cols);
}

// float64 params: each column's largest magnitude, combined into largest[c] (max_nan).
inline void column_largest_run(const double* w, int64_t n, int64_t cols, double* largest) {
  double* const out[1] = {largest};
  add_column_sums<1, 1u>(w, w, nullptr, n, cols, out, [](auto v, auto, auto, auto* r) { r[0] = magnitude(v); });
}

inline void column_squares_run(DType elem, const void* w, int64_t n, int64_t cols, float* scratch, const double* scale,
                               double* sums) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(w);
    double* const out[1] = {sums};
    const auto square = [](auto v, auto, auto, auto* r) { r[0] = v * v; };
    if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
      widen(x, scratch, n);  // the variant's conversion (F16C for float16)
      add_column_sums<1>(scratch, scratch, nullptr, n, cols, out, square);
    } else if constexpr (std::is_same_v<T, double>) {
      // Scaled by the column's largest magnitude, as block_group_norms scales float64 groups.
      add_column_sums<1>(x, x, scale, n, cols, out, [](auto v, auto, auto p, auto* r) {
        const auto y = v / p;
        r[0] = y * y;
      });
    } else {
      add_column_sums<1>(x, x, nullptr, n, cols, out, square);
    }
  });
}

// Over n elements of a float array seen as rows of `cols` (the last row may be short): each element times its
// column's factor, then rounded into the params w (element type `elem`, float32 or 16-bit) as round_into rounds.
inline void column_scale_round_run(DType elem, float* work, const float* factor, int64_t n, int64_t cols, void* w) {
  for (int64_t e = 0; e < n; e += cols) {
    float* __restrict__ x = work + e;
    const float* __restrict__ f = factor;
    const int64_t m = std::min(cols, n - e);
    for (int64_t c = 0; c < m; ++c) x[c] = x[c] * f[c];
  }
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<acc_t<T>, float>) {
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(w, work, static_cast<size_t>(n) * sizeof(float));
      } else {
        narrow(static_cast<const float*>(work), static_cast<T*>(w), n);
      }
    }
  });
}

// The floors as group_floors_typed forms them: float64 elements divided by the norm, then times weight; float32 /
// 16-bit ones times scale = weight / norm.
inline void column_floors_run(DType elem, const void* w, const double* scale, const double* norm, double weight,
                              int64_t n, int64_t cols, void* out) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* __restrict__ x = static_cast<const T*>(w);
    A* __restrict__ o = static_cast<A*>(out);
    // 16-bit params widened into out first (the variant's conversion, F16C for float16).
    if constexpr (!std::is_same_v<T, A>) widen(x, o, n);
    for (int64_t e = 0; e < n; e += cols) {
      const int64_t m = std::min(cols, n - e);
      for (int64_t c = 0; c < m; ++c) {
        if constexpr (std::is_same_v<T, double>) {
          o[e + c] = (std::abs(x[e + c]) / norm[c]) * weight;
        } else {
          const double v = std::is_same_v<T, A> ? static_cast<double>(x[e + c]) : static_cast<double>(o[e + c]);
          o[e + c] = static_cast<A>(std::abs(v) * scale[c]);
        }
      }
    }
  });
}

inline void metric_sums_run(DType elem, int stage, const void* u, const void* a, const double* t, int64_t n,
                            int64_t cols, double* const* out) {
  const auto sums = [&](auto* x, auto* y) {
    using A = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    if (stage == 0) {
      add_column_sums<2>(x, y, nullptr, n, cols, out, MetricFirst{});
    } else if (stage == 1) {
      add_column_sums<1>(x, y, nullptr, n, cols, out, MetricTest{});
    } else {
      add_column_sums<3>(x, y, t, n, cols, out, MetricNewton<A>{});
    }
  };
  if (elem == DType::kDouble) {
    sums(static_cast<const double*>(u), static_cast<const double*>(a));
  } else {
    sums(static_cast<const float*>(u), static_cast<const float*>(a));
  }
}

inline void metric_apply_run(DType elem, void* u_, const void* a_, const void* root_, const char* vanishes, int64_t n,
                             int64_t cols, void* w) {
  dispatch_elem(elem, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* const u = static_cast<A*>(u_);
    const A* const a = static_cast<const A*>(a_);
    const A* const root = static_cast<const A*>(root_);
    // float32 / float64 into the params, 16-bit params through u and the variant's rounding (F16C for float16: the
    // scalar conversion's bits).
    A* const out = std::is_same_v<T, A> ? reinterpret_cast<A*>(w) : u;
    for (int64_t e = 0; e < n; e += cols) {
      const int64_t m = std::min(cols, n - e);
      for (int64_t c = 0; c < m; ++c) out[e + c] = metric_result<A, A>(u[e + c], a[e + c], root[c], vanishes[c]);
    }
    if constexpr (!std::is_same_v<T, A>) narrow(u, static_cast<T*>(w), n);
  });
}

}  // namespace
}  // namespace REGFAST_OPTIM_LOOPS
}  // namespace optim_cpu
}  // namespace regfast
