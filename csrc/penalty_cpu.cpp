// CPU implementations of regfast_C::penalty, penalty_backward and add_penalty_grad_: the value from
// per-tensor and group norms, the gradient in one pass that also sums |w| and w² for the value.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {
namespace {

using namespace cpu;  // the building blocks of every CPU kernel (cpu_kernels.h)

void check_params(at::TensorList params) { check_group(params, "params", c10::kCPU); }

// c·x computed as q·(x·p) with p a power of two, for c = weight/norm: p = 1 and q = c unless c is far
// from 1 (a group of tiny or huge weights), where c itself may leave the range of A (or of double):
// then p and q each carry about half of c's exponent, and x·p stays within a few powers of two of
// weight (|x| ≤ norm).
inline void split_coefficient(double weight, double norm, double& p, double& q) {
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

// One run of the gradient pass: out[i] = [out[i] +] mult·(l1·sign(w) + scale(i)·(w·scale.p(i))) for i in
// [begin, end) (scale(i)·p(i) is 2·l2 plus the group coefficient), adding |w| and w² to the lane sums.
// The sums live in local arrays and the pointers are restrict-qualified so that the stores to `out`
// cannot alias them and the loop vectorizes.
template <typename T, bool kL1, bool kLin, bool kAccumulate, typename A, typename Scale>
inline void grad_run(const T* __restrict__ w, T* __restrict__ out, int64_t begin, int64_t end, A l1, A mult,
                     Scale scale, LaneSum<A>& abs_sum, LaneSum<A>& sq_sum) {
  // Whole rounds on lane vectors, the tail element by element from lane 0: the operations of the scalar
  // loop in the same order in every lane (cpu_kernels.h).
  Vec<A> v1 = load_lanes<A>(abs_sum.v), v2 = load_lanes<A>(sq_sum.v);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const Vec<A> x = load_lanes<A>(w + i);
    v1 += abs_lanes<A>(x);
    v2 += x * x;
    Vec<A> inc{};
    if constexpr (kL1) inc += l1 * sign_lanes<A>(x);
    if constexpr (kLin) inc += scale.lanes(i) * (x * scale.p_lanes(i));
    if constexpr (kAccumulate) {
      store_lanes<A>(out + i, load_lanes<A>(out + i) + mult * inc);
    } else {
      store_lanes<A>(out + i, mult * inc);
    }
  }
  store_lanes<A>(abs_sum.v, v1);
  store_lanes<A>(sq_sum.v, v2);
  for (int j = 0; i < end; ++i, ++j) {
    const A x = static_cast<A>(w[i]);
    abs_sum.v[j] += std::abs(x);
    sq_sum.v[j] += x * x;
    A inc = 0;
    if constexpr (kL1) inc += l1 * sign_of(x);
    if constexpr (kLin) inc += scale(i) * (x * scale.p(i));
    if constexpr (kAccumulate) {
      out[i] = static_cast<T>(static_cast<A>(out[i]) + mult * inc);
    } else {
      out[i] = static_cast<T>(mult * inc);
    }
  }
}

// The gradient pass: out = [g +] mult·(l1·sign(w) + (2·l2 + gscale)·w), with per-chunk Σ|w| and Σw².
// The group-lasso part of the value, gl·Σ √|g|·‖w_g‖, is added by the caller from the group norms.
template <typename T>
acc_t<T> grad_pass(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& outs, bool accumulate,
                   double l1, double l2, double gl, Grouping grouping, double mult) {
  using A = acc_t<T>;
  const size_t nt = ws.size();
  std::vector<GroupShape> shapes;
  std::vector<A> scales, pres;
  std::vector<int64_t> scale_offsets;
  double group_value = 0;
  if (gl != 0) {
    shapes = shapes_of(ws, grouping);
    std::vector<int64_t> offsets;
    const std::vector<double> norms = group_norms<T>(ws, shapes, [](A x) { return x; }, offsets);
    std::vector<A> per_group(norms.size()), pre(norms.size());
    for (size_t t = 0; t < nt; ++t) {
      if (ws[t].numel() == 0) continue;
      const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
      for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) {
        const double norm = norms[g];
        group_value += root * norm;
        double p = 1, q = 0;
        if (norm != 0) split_coefficient(gl * root, norm, p, q);
        // (2·l2 + c)·w as (2·l2/p + q)·(w·p): with p = 1 the sum the element loop would form.
        per_group[g] = static_cast<A>(2 * l2 / p) + static_cast<A>(q);
        pre[g] = static_cast<A>(p);
      }
    }
    scales = expand_scales(per_group, offsets, shapes, ws, scale_offsets);
    pres = expand_scales(pre, offsets, shapes, ws, scale_offsets);
  } else {
    shapes.assign(nt, GroupShape{1, 1, 1});
  }
  const WorkList wl = make_work_list(ws);
  std::vector<A> p1(wl.chunks.size()), p2(wl.chunks.size());
  const A a_l1 = static_cast<A>(l1), a_lin = static_cast<A>(2 * l2), a_mult = static_cast<A>(mult);
  const bool has_l1 = l1 != 0, has_lin = l2 != 0 || gl != 0;

  auto run = [&](auto l1_tag, auto lin_tag, auto acc_tag) {
    constexpr bool kL1 = decltype(l1_tag)::value, kLin = decltype(lin_tag)::value;
    constexpr bool kAccumulate = decltype(acc_tag)::value;
    for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
      const T* w = ws[ch.tensor].const_data_ptr<T>();
      T* out = outs[ch.tensor].data_ptr<T>();
      const A* sc = gl != 0 ? scales.data() + scale_offsets[ch.tensor] : nullptr;
      const A* pr = gl != 0 ? pres.data() + scale_offsets[ch.tensor] : nullptr;
      LaneSum<A> s1, s2;
      for_scale_runs(shapes[ch.tensor], sc, pr, a_lin, ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        grad_run<T, kL1, kLin, kAccumulate>(w, out, b, e, a_l1, a_mult, scale, s1, s2);
      });
      p1[c] = s1.total();
      p2[c] = s2.total();
    });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (accumulate) {
    if (has_l1 && has_lin) run(T_{}, T_{}, T_{});
    else if (has_l1) run(T_{}, F_{}, T_{});
    else if (has_lin) run(F_{}, T_{}, T_{});
  } else {
    if (has_l1 && has_lin) run(T_{}, T_{}, F_{});
    else if (has_l1) run(T_{}, F_{}, F_{});
    else if (has_lin) run(F_{}, T_{}, F_{});
  }
  A abs_sum = 0, sq_sum = 0;
  for (size_t c = 0; c < wl.chunks.size(); ++c) {
    abs_sum += p1[c];
    sq_sum += p2[c];
  }
  A value = 0;
  if (l1 != 0) value += static_cast<A>(l1) * abs_sum;
  if (l2 != 0) value += static_cast<A>(l2) * sq_sum;
  if (gl != 0) value += static_cast<A>(gl * group_value);
  return value;
}

at::Tensor penalty_cpu(at::TensorList params, double l1, double l2, double gl, c10::string_view groups) {
  check_params(params);
  const Grouping grouping = parse_grouping(groups);
  const auto ws = contiguous_all(params);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_cpu", [&] {
    using A = acc_t<scalar_t>;
    A v = 0;
    if (l1 != 0 || l2 != 0) {
      std::vector<A> v1, v2;
      tensor_norms<scalar_t>(ws, v1, v2);
      A s1 = 0, s2 = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        s1 += v1[t];
        s2 += v2[t];
      }
      if (l1 != 0) v += static_cast<A>(l1) * s1;
      if (l2 != 0) v += static_cast<A>(l2) * s2;
    }
    if (gl != 0) {
      const auto shapes = shapes_of(ws, grouping);
      std::vector<int64_t> offsets;
      const auto norms = group_norms<scalar_t>(ws, shapes, [](A x) { return x; }, offsets);
      double term = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        if (ws[t].numel() == 0) continue;
        const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
        for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) term += root * norms[g];
      }
      v += static_cast<A>(gl * term);
    }
    value = static_cast<double>(v);
  });
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

// A fresh output of `like`'s shape and dtype. Outputs of more than a few MB come from fresh pages that the
// kernel faults in and zeroes on first write, page by page (glibc maps such blocks anew on every call):
// they are marked for transparent huge pages first, where the system offers them on request, so that the
// first write faults 2 MB at a time instead of 4 KB.
at::Tensor fresh_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = static_cast<size_t>(out.numel()) * out.element_size();
  if (bytes >= 2 * kHuge) {
    const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1), last = (start + bytes) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: may be ignored
  }
#endif
  return out;
}

std::vector<at::Tensor> penalty_backward_cpu(const at::Tensor& grad, at::TensorList params, double l1, double l2,
                                             double gl, c10::string_view groups) {
  check_params(params);
  const Grouping grouping = parse_grouping(groups);
  const auto ws = contiguous_all(params);
  std::vector<at::Tensor> outs;
  outs.reserve(ws.size());
  for (const auto& w : ws) outs.push_back(fresh_output(w));
  const double mult = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_backward_cpu",
                                  [&] {
                                    if (l1 == 0 && l2 == 0 && gl == 0) {
                                      for (auto& o : outs) o.zero_();
                                    } else {
                                      grad_pass<scalar_t>(ws, outs, false, l1, l2, gl, grouping, mult);
                                    }
                                  });
  // Results take the layout of their param, like the fake kernel's empty_like.
  for (size_t i = 0; i < outs.size(); ++i) {
    if (!params[i].is_contiguous()) outs[i] = at::empty_like(params[i]).copy_(outs[i]);
  }
  return outs;
}

at::Tensor add_penalty_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2, double gl,
                                c10::string_view groups) {
  check_params(params);
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  const Grouping grouping = parse_grouping(groups);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].device() == params[i].device(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
  }
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_add_penalty_grad_cpu",
                                  [&] { value = grad_pass<scalar_t>(ws, gs, true, l1, l2, gl, grouping, 1.0); });
  write_back(grads, gs);
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) {
  m.impl("penalty", &penalty_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("add_penalty_grad_", &add_penalty_grad_cpu);
}

}  // namespace regfast
