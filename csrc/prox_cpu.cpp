// CPU implementation of regfast_C::prox_: the elastic-net step of every element, and with group
// lasso the group factors from the group norms of that step, applied in the same pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// The prox with the elastic-net step `elastic` and, with group lasso, the group coefficient
// lr·gl·√|g|/(1 + 2·lr·l2) (in double from the step's value `lr`).
template <typename T>
void prox_impl(const std::vector<at::Tensor>& ws, double lr, ElasticStep<acc_t<T>> elastic, double l2, double gl,
               Grouping grouping) {
  using A = acc_t<T>;
  const bool has_t = elastic.has_l1, has_shrink = elastic.has_l2;
  const double shrink_d = has_shrink ? 1.0 / (1.0 + 2.0 * lr * l2) : 1.0;
  const size_t nt = ws.size();
  std::vector<GroupShape> shapes;
  std::vector<A> scales;
  std::vector<int64_t> scale_offsets;
  if (gl != 0) {
    shapes = shapes_of(ws, grouping);
    std::vector<int64_t> offsets;
    const auto norms = group_norms<T>(ws, shapes, elastic, offsets);
    std::vector<A> factor(norms.size());
    for (size_t i = 0; i < nt; ++i) {
      if (ws[i].numel() == 0) continue;
      const double c = lr * gl * std::sqrt(static_cast<double>(shapes[i].group_size())) * shrink_d;
      for (int64_t g = offsets[i]; g < offsets[i + 1]; ++g) {
        const double norm = norms[g];
        // In double: a tiny norm gives c/norm = inf and factor 0. std::max(x, 0) keeps a NaN x, so a NaN
        // group stays NaN.
        factor[g] = norm == 0 ? A(0) : static_cast<A>(std::max(1 - c / norm, 0.0));
      }
    }
    scales = expand_scales(factor, offsets, shapes, ws, scale_offsets);
  } else {
    shapes.assign(nt, GroupShape{1, 1, 1});
  }
  const WorkList wl = make_work_list(ws);
  auto run = [&](auto t_tag, auto shrink_tag, auto group_tag) {
    constexpr bool kT = decltype(t_tag)::value, kShrink = decltype(shrink_tag)::value;
    constexpr bool kGroup = decltype(group_tag)::value;
    for_each_chunk(wl, [&](int64_t, const Chunk& ch) {
      T* w = ws[ch.tensor].data_ptr<T>();
      const A* sc = kGroup ? scales.data() + scale_offsets[ch.tensor] : nullptr;
      // The prox multiplies by the factor alone: no pre-scale is read, so the factors stand in for them.
      for_scale_runs(shapes[ch.tensor], sc, sc, A(0), ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        int64_t i = b;
        // float16 on lanes (the same operations as the element loop below): the compiler does not vectorize its
        // conversions on its own. It does for the other dtypes' element loop, which measured as fast or faster.
        if constexpr (std::is_same_v<T, c10::Half>) {
          for (; i + kLanes <= e; i += kLanes) {
            Vec<A> x = load_lanes<A>(w + i);
            if constexpr (kT) x = soft_threshold_lanes<A>(x, elastic.threshold);
            if constexpr (kShrink) x = x * elastic.shrink;
            if constexpr (kGroup) x = x * scale.lanes(i);
            store_lanes<A>(w + i, x);
          }
        }
        for (; i < e; ++i) {
          A x = static_cast<A>(w[i]);
          x = elastic_step(x, kT, elastic.threshold, kShrink, elastic.shrink);
          if constexpr (kGroup) x = x * scale(i);
          w[i] = static_cast<T>(x);
        }
      });
    });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (gl != 0) {
    if (has_t && has_shrink) run(T_{}, T_{}, T_{});
    else if (has_t) run(T_{}, F_{}, T_{});
    else if (has_shrink) run(F_{}, T_{}, T_{});
    else run(F_{}, F_{}, T_{});
  } else {
    if (has_t && has_shrink) run(T_{}, T_{}, F_{});
    else if (has_t) run(T_{}, F_{}, F_{});
    else if (has_shrink) run(F_{}, T_{}, F_{});
  }
}

void prox_cpu(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
              double gl, c10::string_view groups) {
  check_params(params);
  const Grouping grouping = parse_grouping(groups);
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  const double step = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const auto acc = acc_type(params[0].scalar_type());
  const auto ws = contiguous_all(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_prox_cpu", [&] {
    using A = acc_t<scalar_t>;
    // As the reference: the scalars in A from a tensor lr, in double from a float one.
    ElasticStep<A> elastic{};
    if (lr_tensor.has_value()) {
      elastic = ElasticStep<A>::from_acc(lr_tensor->to(at::kCPU, acc).item<A>(), l1, l2);
    } else {
      double threshold = 0, shrink = 1;
      elastic_scalars(lr, l1, l2, threshold, shrink);
      elastic = ElasticStep<A>::from_double(threshold, shrink, l1 != 0, l2 != 0);
    }
    prox_impl<scalar_t>(ws, step, elastic, l2, gl, grouping);
  });
  write_back(params, ws);
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) { m.impl("prox_", &prox_cpu); }

}  // namespace regfast
