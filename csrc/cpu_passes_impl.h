// The passes of the CPU kernels (declared in cpu_passes.h), compiled once per instruction set: the translation
// unit that includes this header names its variant in REGFAST_CPU_ISA and REGFAST_CPU_AVX2 (cpu_kernels.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_passes.h"
#include "elementwise.h"
#include "groups.h"

namespace regfast {
namespace cpu {
namespace REGFAST_CPU_ISA {

// c·x computed as q·(x·p) with p a power of two, for c = weight/norm: p = 1 and q = c unless c is far
// from 1 (a group of tiny or huge weights), where c itself may leave the range of A (or of double):
// then p and q each carry about half of c's exponent, and x·p stays within a few powers of two of
// weight (|x| ≤ norm).
inline void split_coefficient(double weight, double norm, double& p, double& q) {
  // Both normal (nor zero, subnormal, infinite or NaN): frexp's exponents are the biased ones less 1022, so their
  // difference is the biased exponents', without frexp's two calls.
  uint64_t bits_w = 0, bits_n = 0;
  std::memcpy(&bits_w, &weight, sizeof weight);
  std::memcpy(&bits_n, &norm, sizeof norm);
  const int biased_w = static_cast<int>(bits_w >> 52 & 0x7FF), biased_n = static_cast<int>(bits_n >> 52 & 0x7FF);
  if (biased_w != 0 && biased_w != 0x7FF && biased_n != 0 && biased_n != 0x7FF && biased_w - biased_n > -60 &&
      biased_w - biased_n < 60) {
    p = 1;
    q = weight / norm;
    return;
  }
  int ew = 0, en = 0;
  const double mw = std::frexp(weight, &ew), mn = std::frexp(norm, &en);
  const int e = ew - en;
  if (!(std::isfinite(weight) && std::isfinite(norm) && weight > 0) || (e > -60 && e < 60)) {
    p = 1;
    q = weight / norm;
    return;
  }
  p = std::ldexp(1.0, e / 2);
  q = (mw / mn) * std::ldexp(1.0, e - e / 2);
}

// One element of the gradient pass, as on its lane: o = mult·(l1·sign(x) + scale·(x·p)), or with kAccumulate
// o + (l1·sign(x) + scale·(x·p)) (add_penalty_grad_, whose mult is 1: 1·inc is inc, not computed).
template <bool kL1, bool kLin, bool kAccumulate, typename T, typename A>
inline void grad_element(A x, T& o, A l1, A mult, A scale, A p) {
  A inc = 0;
  if constexpr (kL1) inc += l1 * sign_of(x);
  if constexpr (kLin) inc += scale * (x * p);
  if constexpr (kAccumulate) {
    o = static_cast<T>(static_cast<A>(o) + inc);
  } else {
    o = static_cast<T>(mult * inc);
  }
}

// One run of the gradient pass: out[i] = mult·(l1·sign(w) + scale(i)·(w·scale.p(i))), or with kAccumulate
// out[i] + (l1·sign(w) + scale(i)·(w·scale.p(i))), for i in [begin, end) (scale(i)·p(i) is 2·l2 plus the group
// coefficient), adding |w| and w² to the lane sums when kSums (the value is wanted). The sums live in local arrays
// and the pointers are restrict-qualified so that the stores to `out` cannot alias them and the loop vectorizes.
// kSignBits (with kL1, for a finite l1): l1·sign(w) from w's bits (l1_sign_bits_lanes), the same values; without
// the linear term a NaN w is selected into the sum itself (the next operation quiets it, as l1·w does).
template <typename T, bool kL1, bool kLin, bool kAccumulate, bool kSums, bool kSignBits = false, typename A,
          typename Scale>
inline void grad_run(const T* __restrict__ w, T* __restrict__ out, int64_t begin, int64_t end, A l1, A mult,
                     Scale scale, LaneSum<A>& abs_sum, LaneSum<A>& sq_sum) {
  // Whole rounds on lane vectors, the tail element by element from lane 0: the operations of the scalar
  // loop in the same order in every lane (cpu_kernels.h).
  Vec<A> v1 = load_lanes<A>(abs_sum.v), v2 = load_lanes<A>(sq_sum.v);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    prefetch_round(w + i);
    prefetch_round(out + i);
    const Vec<A> x = load_lanes<A>(w + i);
    if constexpr (kSums) {
      v1 += abs_lanes<A>(x);
      v2 += x * x;
    }
    // 0 + l1·sign(w) is l1·sign(w) (never −0: l1 ≥ 0), so the sum starts from it; from 0 otherwise, which turns
    // a −0 of the linear term into +0 as the element loop does.
    Vec<A> inc{};
    static_assert(!kSignBits || kL1, "l1·sign(w) from w's bits is the l1 term");
    if constexpr (kSignBits) {
      inc = l1_sign_bits_lanes<A>(x, l1);
      if constexpr (!kLin) {
        for (int k = 0; k < Vec<A>::kPieces; ++k) inc.p[k] = select_bits(x.p[k] != x.p[k], x.p[k], inc.p[k]);
      }
    } else if constexpr (kL1) {
      inc = l1 * sign_lanes<A>(x);
    }
    if constexpr (kLin) {
      if constexpr (Scale::kUnitPre) {
        inc += scale.lanes(i) * x;
      } else {
        inc += scale.lanes(i) * (x * scale.p_lanes(i));
      }
    }
    if constexpr (kAccumulate) {
      store_lanes<A>(out + i, load_lanes<A>(out + i) + inc);
    } else {
      store_lanes<A>(out + i, mult * inc);
    }
  }
  store_lanes<A>(abs_sum.v, v1);
  store_lanes<A>(sq_sum.v, v2);
  for (int j = 0; i < end; ++i, ++j) {
    const A x = static_cast<A>(w[i]);
    if constexpr (kSums) {
      abs_sum.v[j] += std::abs(x);
      sq_sum.v[j] += x * x;
    }
    grad_element<kL1, kLin, kAccumulate>(x, out[i], l1, mult, scale(i), scale.p(i));
  }
}

// grad_run over a chunk of n < kLanes elements with one scale (a small tensor without groups, or of one group), its
// lane sums' totals into *abs_total and *sq_total when kSums (short_norms: element j is lane j's only term).
template <typename T, bool kL1, bool kLin, bool kAccumulate, bool kSums, typename A, typename Scale>
inline void short_grad_run(const T* __restrict__ w, T* __restrict__ out, int n, A l1, A mult, Scale scale,
                           A* abs_total, A* sq_total) {
  if constexpr (kSums) short_norms(w, n, *abs_total, *sq_total);
  for (int j = 0; j < n; ++j) {
    grad_element<kL1, kLin, kAccumulate>(static_cast<A>(w[j]), out[j], l1, mult, scale(j), scale.p(j));
  }
}

// mult·(l1·sign(w)) in a 16-bit T, the gradient penalty_backward returns for l1 alone, is set by the class of w:
// zero (either sign), subnormal, normal or infinite, NaN, each with its sign (rounded to T, a NaN is canonical:
// bfloat16 drops its sign, float16 keeps it). The eight values are computed once, by the element loop's own
// operations on a pattern of each class (so on this thread's floating-point mode), and each element picks its
// value from its bits: integer compares and selects, which the compiler vectorizes for any instruction set, where
// the float path converts each element to float and back.
template <typename T>
class L1Table {
 public:
  using A = acc_t<T>;
  static constexpr int16_t kInf = std::is_same_v<T, c10::BFloat16> ? 0x7F80 : 0x7C00;  // infinity's bits
  static constexpr int16_t kMinNormal = std::is_same_v<T, c10::BFloat16> ? 0x0080 : 0x0400;

  L1Table(A l1, A mult) {
    const uint16_t patterns[4] = {0x0000, 0x0001, kMinNormal, kInf | (kInf >> 1 & ~kInf)};
    for (int c = 0; c < 4; ++c) {
      pos_[c] = value(patterns[c], l1, mult);
      neg_[c] = value(static_cast<uint16_t>(patterns[c] | 0x8000), l1, mult);
    }
  }

  void run(const T* w, T* out, int64_t n) const {
    // On int16 lanes, every choice a select of the same width (signed compares: SSE2 has no unsigned ones).
    const int16_t* __restrict__ in = reinterpret_cast<const int16_t*>(w);
    int16_t* __restrict__ o = reinterpret_cast<int16_t*>(out);
    const int16_t p0 = pos_[0], p1 = pos_[1], p2 = pos_[2], p3 = pos_[3];
    const int16_t d0 = p0 ^ neg_[0], d1 = p1 ^ neg_[1], d2 = p2 ^ neg_[2], d3 = p3 ^ neg_[3];
    for (int64_t i = 0; i < n; ++i) {
      const int16_t x = in[i];
      const int16_t mag = x & 0x7FFF;
      const int16_t negative = x >> 15;  // all ones for a negative sign
      int16_t r = p3 ^ (d3 & negative);
      r = mag <= kInf ? static_cast<int16_t>(p2 ^ (d2 & negative)) : r;
      r = mag < kMinNormal ? static_cast<int16_t>(p1 ^ (d1 & negative)) : r;
      r = mag == 0 ? static_cast<int16_t>(p0 ^ (d0 & negative)) : r;
      o[i] = r;
    }
  }

 private:
  static uint16_t value(uint16_t bits, A l1, A mult) {
    // The pattern hidden from the compiler: folded at compile time, l1·NaN would give a NaN of its own sign.
    asm("" : "+r"(bits));
    T w, o;
    std::memcpy(&w, &bits, sizeof w);
    grad_element<true, false, false>(static_cast<A>(w), o, l1, mult, A(0), A(1));
    uint16_t r;
    std::memcpy(&r, &o, sizeof r);
    return r;
  }

  uint16_t pos_[4], neg_[4];  // by class: zero, subnormal, normal or infinite, NaN
};

// Whether tensor t of a pass with group lasso is a small one-group tensor (fewer than kLanes elements, one group,
// outer 1): its group norm, scale and gradient or prox in one visit (grad_core, prox_groups_table) rather than
// through group_norms and the scale arrays. Its norm is short_sumsq's, as group_norms takes such a group (one
// partial, added to 0, one part: for A = float only; double's groups may be summed again by parts).
template <typename A>
inline bool small_group(int64_t numel, const GroupShape& s) {
  return kParts<A> == 1 && numel > 0 && numel < kLanes && s.outer == 1 && s.ngroups == 1;
}

// The small one-group tensors (small_group) of a pass with group lasso over tensors of numels[t] elements grouped as
// shapes[t]: marked (none: empty), and the numels with theirs 0 in `others` (for group_norms to leave them out).
template <typename A>
std::vector<char> mark_small_groups(const std::vector<int64_t>& numels, const GroupShape* shapes,
                                    std::vector<int64_t>& others) {
  std::vector<char> small;
  for (size_t t = 0; t < numels.size(); ++t) {
    if (!small_group<A>(numels[t], shapes[t])) continue;
    if (small.empty()) {
      small.assign(numels.size(), 0);
      others = numels;
    }
    small[t] = 1;
    others[t] = 0;
  }
  return small;
}

// The norm of a small one-group tensor's n elements (small_group) as group_norms gives it.
template <typename A, typename T, typename F>
inline double small_group_norm(const T* w, int n, F f) {
  double sq = 0, acc = 0;
  short_sumsq<A>(w, 0, n, f, &sq);
  acc += sq;
  return norm_from_parts(acc, 0.0, 0.0, 1);
}

// (2·l2 + c)·w as (2·l2/p + q)·(w·p) for the group coefficient c = weight/norm (split_coefficient): with p = 1 the
// sum the element loop would form. The scale and its pre-scale p.
template <typename A>
inline ConstScale<A> gradient_scale(double l2, double weight, double norm) {
  double p = 1, q = 0;
  if (norm != 0) split_coefficient(weight, norm, p, q);
  return {static_cast<A>(p == 1 ? 2 * l2 : 2 * l2 / p) + static_cast<A>(q), static_cast<A>(p)};
}

// The group lasso's part of a gradient pass: per tensor the shape of its groups and, laid out as for_scale_runs
// reads them, each group's scale and pre-scale (small one-group tensors aside: `small`, set where any is, marks
// them, and grad_core writes each one's √|g|·‖w_g‖₂ into small_terms[t]); and Σ_g √|g|·‖w_g‖₂ (total()) from each
// other group's term `terms` (tensor t's at [offsets[t], offsets[t + 1])), in tensor and group order.
template <typename A>
struct GradGroups {
  std::vector<GroupShape> shapes;
  std::vector<A> scales, pres;
  std::vector<int64_t> scale_offsets;
  std::vector<double> terms;
  std::vector<int64_t> offsets;
  std::vector<char> small;
  mutable std::vector<double> small_terms;

  double total() const {
    double value = 0;
    for (size_t t = 0; t + 1 < offsets.size(); ++t) {
      if (!small.empty() && small[t]) {
        value += small_terms[t];
        continue;
      }
      for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) value += terms[g];
    }
    return value;
  }
};

// The gradient pass over the tensors at wd[t] (read) and od[t] (written), of numels[t] contiguous elements each,
// with the group lasso's scales `groups` (null without): out = [g +] mult·(l1·sign(w) + (2·l2 + gscale)·w), and
// with `accumulate` the value from per-chunk Σ|w| and Σw² and the group norms (see Passes::grad_pass).
template <typename T>
acc_t<T> grad_core(const void* const* wd, void* const* od, const std::vector<int64_t>& numels, bool accumulate,
                   double l1, double l2, double gl, const GradGroups<acc_t<T>>* groups, double mult) {
  TORCH_INTERNAL_ASSERT(!accumulate || mult == 1.0, "add_penalty_grad_ adds the gradient itself (mult 1)");
  TORCH_INTERNAL_ASSERT((gl != 0) == (groups != nullptr), "group scales come with group lasso");
  using A = acc_t<T>;
  const WorkList wl = make_work_list(numels);
  const A a_l1 = static_cast<A>(l1), a_lin = static_cast<A>(2 * l2), a_mult = static_cast<A>(mult);
  const bool has_l1 = l1 != 0, has_lin = l2 != 0 || gl != 0;
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (!accumulate && has_l1 && !has_lin) {
      const L1Table<T> table(a_l1, a_mult);
      for_each_chunk(wl, [&](int64_t, const Chunk& ch) {
        table.run(static_cast<const T*>(wd[ch.tensor]) + ch.begin, static_cast<T*>(od[ch.tensor]) + ch.begin,
                  ch.end - ch.begin);
      });
      return A(0);
    }
  }
  std::vector<A> p1(wl.chunks.size()), p2(wl.chunks.size());
  auto run = [&](auto l1_tag, auto lin_tag, auto acc_tag, auto bits_tag) {
    constexpr bool kL1 = decltype(l1_tag)::value, kLin = decltype(lin_tag)::value;
    constexpr bool kAccumulate = decltype(acc_tag)::value, kSignBits = decltype(bits_tag)::value;
    for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
      prefetch_chunk<T, 0>(wl, c, wd);
      prefetch_chunk<T, 1>(wl, c, od);
      const T* w = static_cast<const T*>(wd[ch.tensor]);
      T* out = static_cast<T*>(od[ch.tensor]);
      const A* sc = groups != nullptr ? groups->scales.data() + groups->scale_offsets[ch.tensor] : nullptr;
      const A* pr = groups != nullptr ? groups->pres.data() + groups->scale_offsets[ch.tensor] : nullptr;
      const GroupShape shape = groups != nullptr ? groups->shapes[ch.tensor] : GroupShape{1, 1, 1};
      if (ch.end - ch.begin < kLanes && shape.ngroups == 1) {  // (no groups: ngroups 1 too)
        const auto n = static_cast<int>(ch.end - ch.begin);
        if (groups == nullptr) {
          short_grad_run<T, kL1, kLin, kAccumulate, kAccumulate>(w + ch.begin, out + ch.begin, n, a_l1, a_mult,
                                                                 UnitScale<A>{a_lin}, &p1[c], &p2[c]);
        } else if (!groups->small.empty() && groups->small[ch.tensor]) {
          const double norm = small_group_norm<A>(w, n, Identity{});
          const double root = std::sqrt(static_cast<double>(n));
          groups->small_terms[ch.tensor] = root * norm;
          short_grad_run<T, kL1, kLin, kAccumulate, kAccumulate>(w, out, n, a_l1, a_mult,
                                                                 gradient_scale<A>(l2, gl * root, norm),
                                                                 &p1[c], &p2[c]);
        } else {
          short_grad_run<T, kL1, kLin, kAccumulate, kAccumulate>(w + ch.begin, out + ch.begin, n, a_l1, a_mult,
                                                                 ConstScale<A>{sc[0], pr[0]}, &p1[c], &p2[c]);
        }
        return;
      }
      LaneSum<A> s1, s2;
      for_scale_runs(shape, sc, pr, a_lin, ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        grad_run<T, kL1, kLin, kAccumulate, kAccumulate, kSignBits>(w, out, b, e, a_l1, a_mult, scale, s1, s2);
      });
      p1[c] = s1.total();
      p2[c] = s2.total();
    });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  // The l1 term from w's bits unless l1 overflowed A (then l1·sign(±0) is NaN).
  auto go = [&](auto l1_tag, auto lin_tag, auto acc_tag) {
    if (decltype(l1_tag)::value && std::isfinite(a_l1)) {
      run(l1_tag, lin_tag, acc_tag, l1_tag);
    } else {
      run(l1_tag, lin_tag, acc_tag, F_{});
    }
  };
  if (accumulate) {
    if (has_l1 && has_lin) go(T_{}, T_{}, T_{});
    else if (has_l1) go(T_{}, F_{}, T_{});
    else if (has_lin) go(F_{}, T_{}, T_{});
  } else {
    if (has_l1 && has_lin) go(T_{}, T_{}, F_{});
    else if (has_l1) go(T_{}, F_{}, F_{});
    else if (has_lin) go(F_{}, T_{}, F_{});
  }
  if (!accumulate) return A(0);
  A abs_sum = 0, sq_sum = 0;
  for (size_t c = 0; c < wl.chunks.size(); ++c) {
    abs_sum += p1[c];
    sq_sum += p2[c];
  }
  A value = 0;
  if (l1 != 0) value += static_cast<A>(l1) * abs_sum;
  if (l2 != 0) value += static_cast<A>(l2) * sq_sum;
  if (gl != 0) value += static_cast<A>(gl * groups->total());
  return value;
}

// NaN into out[i] wherever w[i] is ±inf, in the groups whose norm is not finite (every group that holds an infinite
// element): the reference's group term c·w_i/‖w_g‖₂ is inf/inf there, NaN, which the pass's (2·l2 + c/‖w_g‖₂)·w_i
// leaves ±inf wherever l2 ≠ 0 (the finite elements of such a group take c·w_i/inf = 0 as the pass does). Groups of
// finite norm hold no infinite element and are not read again.
template <typename T>
void nan_at_infinite_elements(const void* const* wd, void* const* od, const std::vector<int64_t>& numels,
                              const std::vector<double>& norms, const GradGroups<acc_t<T>>& groups) {
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] == 0) continue;
    const T* w = static_cast<const T*>(wd[t]);
    T* out = static_cast<T*>(od[t]);
    const GroupShape& s = groups.shapes[t];
    const auto fix = [&](int64_t j) {
      for (int64_t o = 0; o < s.outer; ++o) {
        for (int64_t i = (o * s.ngroups + j) * s.inner, e = i + s.inner; i < e; ++i) {
          if (std::isinf(static_cast<double>(w[i]))) out[i] = std::numeric_limits<T>::quiet_NaN();
        }
      }
    };
    if (!groups.small.empty() && groups.small[t]) {
      if (!std::isfinite(groups.small_terms[t])) fix(0);
      continue;
    }
    for (int64_t g = groups.offsets[t]; g < groups.offsets[t + 1]; ++g) {
      if (!std::isfinite(norms[g])) fix(g - groups.offsets[t]);
    }
  }
}

// The gradient pass of the tensors at wd[t] (read) and od[t] (written), of numels[t] contiguous elements each, with
// group lasso gl over the groups shapes[t] (null without): Passes::grad_table, and grad_pass on a list's pointers.
template <typename T>
acc_t<T> grad_table(const void* const* wd, void* const* od, const std::vector<int64_t>& numels, bool accumulate,
                    double l1, double l2, double gl, const GroupShape* shapes, double mult) {
  using A = acc_t<T>;
  if (gl == 0) return grad_core<T>(wd, od, numels, accumulate, l1, l2, 0.0, nullptr, mult);
  const size_t nt = numels.size();
  GradGroups<A> groups;
  groups.shapes.assign(shapes, shapes + nt);
  std::vector<int64_t> others;
  groups.small = mark_small_groups<A>(numels, shapes, others);
  if (!groups.small.empty()) groups.small_terms.assign(nt, 0.0);
  const std::vector<int64_t>& grouped = groups.small.empty() ? numels : others;
  const std::vector<double> norms = group_norms<T>(wd, grouped, groups.shapes, Identity{}, groups.offsets);
  std::vector<A> per_group(norms.size()), pre(norms.size());
  groups.terms.resize(norms.size());
  for (size_t t = 0; t < nt; ++t) {
    if (grouped[t] == 0) continue;
    const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
    for (int64_t g = groups.offsets[t]; g < groups.offsets[t + 1]; ++g) {
      groups.terms[g] = root * norms[g];
      const ConstScale<A> scale = gradient_scale<A>(l2, gl * root, norms[g]);
      per_group[g] = scale.value;
      pre[g] = scale.pre;
    }
  }
  groups.scales = expand_scales(std::move(per_group), groups.offsets, groups.shapes, grouped, groups.scale_offsets);
  groups.pres = expand_scales(std::move(pre), groups.offsets, groups.shapes, grouped, groups.scale_offsets);
  const acc_t<T> value = grad_core<T>(wd, od, numels, accumulate, l1, l2, gl, &groups, mult);
  nan_at_infinite_elements<T>(wd, od, numels, norms, groups);
  return value;
}

// The gradient pass of a list of contiguous tensors (Passes::grad_pass).
template <typename T>
acc_t<T> grad_pass(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& outs, bool accumulate,
                   double l1, double l2, double gl, Grouping grouping, double mult) {
  std::vector<void*> od(ws.size());
  for (size_t t = 0; t < ws.size(); ++t) od[t] = data_of<T>(outs[t]);
  const std::vector<GroupShape> shapes = gl != 0 ? shapes_of(ws, grouping) : std::vector<GroupShape>();
  return grad_table<T>(const_data_of(ws).data(), od.data(), numels_of(ws), accumulate, l1, l2, gl, shapes.data(),
                       mult);
}

// The elastic-net step of w[b, e) in place, times the group factors `scale` with kGroup.
template <typename T, bool kT, bool kShrink, bool kGroup, typename Scale>
inline void prox_run(T* w, int64_t b, int64_t e, ElasticStep<acc_t<T>> elastic, Scale scale) {
  using A = acc_t<T>;
  int64_t i = b;
  // On lanes but for double (the same operations as the element loop below): the compiler does not vectorize
  // float16's conversions on its own, and its loop's threshold takes two compares and two blends where a
  // threshold that is not NaN takes a max and a min (bfloat16 l1, GPT-2 small at half scale, 1 thread: 17.3
  // -> 15.3 ms). Each round prefetches ahead (prefetch_round): GPT-2 small, builds alternating, ms, bfloat16 l1 one
  // thread 50.2-52.6 -> 29.4-33.5, two 25.6-27.2 -> 15.6-16.2, float16 l1+l2 one thread 44.0-46.5 -> 27.8-31.3,
  // float32 l1 51.0-52.1 -> 43.4-48.1.
  // The loop's scalars and pointer are copied into its own lambda: the vector stores may alias anything, and a
  // loop over captures by reference loaded them again after every store (AVX-512 prox_ l1+l2 of 32M elements,
  // one thread, alternating builds: bfloat16 3.9-4.0 -> 3.3-3.4 ms, float16 3.0-3.2 -> 2.6).
  if constexpr (!std::is_same_v<T, double>) {
    const A threshold = elastic.threshold, shrink = elastic.shrink;
    T* const out = w;
    const auto lanes = [=](auto number, int64_t k) {
      for (; k + kLanes <= e; k += kLanes) {
        prefetch_round(out + k);
        Vec<A> x = load_lanes<A>(out + k);
        if constexpr (kT) {
          x = decltype(number)::value ? soft_threshold_number_lanes<A>(x, threshold)
                                      : soft_threshold_lanes<A>(x, threshold);
        }
        if constexpr (kShrink) x = x * shrink;
        if constexpr (kGroup) x = x * scale.lanes(k);
        store_lanes<A>(out + k, x);
      }
      return k;
    };
    i = !kT || threshold == threshold ? lanes(std::true_type{}, i) : lanes(std::false_type{}, i);
  }
  for (; i < e; ++i) {
    A x = static_cast<A>(w[i]);
    x = elastic_step(x, kT, elastic.threshold, kShrink, elastic.shrink);
    if constexpr (kGroup) x = x * scale(i);
    w[i] = static_cast<T>(x);
  }
}

// The prox without group lasso of the tensors whose data pointers are `data` (numels[t] contiguous elements of T
// at data[t]): the elastic-net step of every element, spread over threads by for_each_range.
template <typename T>
void prox_table(void* const* data, const std::vector<int64_t>& numels, ElasticStep<acc_t<T>> elastic) {
  using A = acc_t<T>;
  auto run = [&](auto t_tag, auto shrink_tag) {
    constexpr bool kT = decltype(t_tag)::value, kShrink = decltype(shrink_tag)::value;
    for_each_range<T>(numels, data, [&](size_t t, int64_t b, int64_t e) {
      prox_run<T, kT, kShrink, false>(static_cast<T*>(data[t]), b, e, elastic, UnitScale<A>{A(1)});
    });
  };
  if (elastic.has_l1 && elastic.has_l2) run(std::true_type{}, std::true_type{});
  else if (elastic.has_l1) run(std::true_type{}, std::false_type{});
  else if (elastic.has_l2) run(std::false_type{}, std::true_type{});
}

// The prox of the tensors at data[t] (numels[t] contiguous elements each) with the elastic-net step `elastic` and,
// with group lasso gl over the groups shapes[t] (null without), the group coefficient lr·gl·√|g|/(1 + 2·lr·l2) (in
// double from the step's value `lr`): Passes::prox_table, and prox_pass on a list's pointers.
template <typename T>
void prox_groups_table(void* const* data, const std::vector<int64_t>& numels, double lr, ElasticStep<acc_t<T>> elastic,
                       double l2, double gl, const GroupShape* shapes) {
  using A = acc_t<T>;
  if (gl == 0) {
    prox_table<T>(data, numels, elastic);
    return;
  }
  const size_t nt = numels.size();
  const bool has_t = elastic.has_l1, has_shrink = elastic.has_l2;
  const double shrink_d = has_shrink ? 1.0 / (1.0 + 2.0 * lr * l2) : 1.0;
  const std::vector<GroupShape> group_shapes(shapes, shapes + nt);
  // Small one-group tensors (small_group) are left out of group_norms (as empty tensors): their norm, factor and
  // prox in one visit below.
  std::vector<int64_t> others;
  const std::vector<char> small = mark_small_groups<A>(numels, shapes, others);
  const std::vector<int64_t>& grouped = small.empty() ? numels : others;
  const ElasticLanes<A> f{elastic};
  const auto coefficient = [&](int64_t size) { return lr * gl * std::sqrt(static_cast<double>(size)) * shrink_d; };
  std::vector<int64_t> offsets;
  const auto norms = group_norms<T>(data, grouped, group_shapes, f, offsets);
  std::vector<A> factor(norms.size());
  for (size_t i = 0; i < nt; ++i) {
    if (grouped[i] == 0) continue;
    const double c = coefficient(shapes[i].group_size());
    for (int64_t g = offsets[i]; g < offsets[i + 1]; ++g) {
      factor[g] = group_shrink_factor<A>(norms[g], c);
    }
  }
  std::vector<int64_t> scale_offsets;
  const std::vector<A> scales = expand_scales(std::move(factor), offsets, group_shapes, grouped, scale_offsets);
  const WorkList wl = make_work_list(numels);
  auto run = [&](auto t_tag, auto shrink_tag) {
    constexpr bool kT = decltype(t_tag)::value, kShrink = decltype(shrink_tag)::value;
    for_each_chunk(wl, [&](int64_t, const Chunk& ch) {
      T* w = static_cast<T*>(data[ch.tensor]);
      if (!small.empty() && small[ch.tensor]) {
        const auto n = static_cast<int>(ch.end);  // the whole tensor: one chunk from 0
        const A a = group_shrink_factor<A>(small_group_norm<A>(w, n, f), coefficient(n));
        prox_run<T, kT, kShrink, true>(w, 0, n, elastic, ConstScale<A>{a, a});
        return;
      }
      const A* sc = scales.data() + scale_offsets[ch.tensor];
      // The prox multiplies by the factor alone: no pre-scale is read, so the factors stand in for them.
      for_scale_runs(shapes[ch.tensor], sc, sc, A(0), ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        prox_run<T, kT, kShrink, true>(w, b, e, elastic, scale);
      });
    });
  };
  if (has_t && has_shrink) run(std::true_type{}, std::true_type{});
  else if (has_t) run(std::true_type{}, std::false_type{});
  else if (has_shrink) run(std::false_type{}, std::true_type{});
  else run(std::false_type{}, std::false_type{});
}

template <typename T>
void prox_pass(const std::vector<at::Tensor>& ws, double lr, ElasticStep<acc_t<T>> elastic, double l2, double gl,
               Grouping grouping) {
  std::vector<void*> data(ws.size());
  for (size_t i = 0; i < ws.size(); ++i) data[i] = data_of<T>(ws[i]);
  const std::vector<GroupShape> shapes = gl != 0 ? shapes_of(ws, grouping) : std::vector<GroupShape>();
  prox_groups_table<T>(data.data(), numels_of(ws), lr, elastic, l2, gl, shapes.data());
}

template <typename T>
std::vector<double> plain_group_norms(const std::vector<at::Tensor>& ws, const std::vector<GroupShape>& shapes,
                                      std::vector<int64_t>& offsets) {
  return group_norms<T>(ws, shapes, Identity{}, offsets);
}

template <typename T>
Passes<T> passes() {
  return {&tensor_norms<T>, &plain_group_norms<T>, &grad_pass<T>, &prox_pass<T>, &prox_groups_table<T>,
          &tensor_norms<T>, &grad_table<T>};
}

// This variant's passes for every element type (this header is included once per variant's file).
template Passes<float> passes<float>();
template Passes<double> passes<double>();
template Passes<c10::Half> passes<c10::Half>();
template Passes<c10::BFloat16> passes<c10::BFloat16>();

}  // namespace REGFAST_CPU_ISA
}  // namespace cpu
}  // namespace regfast
