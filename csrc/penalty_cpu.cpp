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

#include "cpu_passes.h"
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {
namespace {

void check_params(at::TensorList params) { check_group(params, "params", c10::kCPU); }

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
      cpu::passes<scalar_t>().tensor_norms(ws, v1, v2);
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
      const auto norms = cpu::passes<scalar_t>().group_norms(ws, shapes, offsets);
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
                                      cpu::passes<scalar_t>().grad_pass(ws, outs, false, l1, l2, gl, grouping, mult);
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
                                  [&] {
                                    value = cpu::passes<scalar_t>().grad_pass(ws, gs, true, l1, l2, gl, grouping, 1.0);
                                  });
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
