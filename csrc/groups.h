// Host-side description of a tensor's groups, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace regfast {

enum class Grouping { kRow, kCol, kTensor };

inline Grouping parse_grouping(c10::string_view groups) {
  if (groups == "row") return Grouping::kRow;
  if (groups == "col") return Grouping::kCol;
  TORCH_CHECK(groups == "tensor", "groups must be 'row', 'col' or 'tensor', got '", std::string(groups), "'");
  return Grouping::kTensor;
}

// A contiguous tensor seen as [outer, ngroups, inner]: group g holds every element [o, g, k].
// "row" groups are slices along dim 0 (outer = 1), "col" groups slices along dim 1, "tensor"
// and tensors with fewer than 2 dims are one group (outer = ngroups = 1).
struct GroupShape {
  int64_t outer;
  int64_t ngroups;
  int64_t inner;

  int64_t row_length() const { return ngroups * inner; }
  int64_t group_size() const { return outer * inner; }
};

// Only called for tensors with at least one element, so every extent is >= 1.
inline GroupShape group_shape(const at::Tensor& t, Grouping grouping) {
  const int64_t n = t.numel();
  if (grouping == Grouping::kTensor || t.dim() < 2) return {1, 1, n};
  if (grouping == Grouping::kRow) return {1, t.size(0), n / t.size(0)};
  return {t.size(0), t.size(1), n / (t.size(0) * t.size(1))};
}

// prox_'s group factor max(0, 1 − coef/‖w_g‖) from a group's norm, in double and rounded to A: a zero group stays
// zero, a tiny norm gives coef/norm = inf and factor 0, and std::max(x, 0) keeps a NaN x, so a NaN group stays NaN.
template <typename A>
inline A group_shrink_factor(double norm, double coef) {
  return norm == 0 ? A(0) : static_cast<A>(std::max(1 - coef / norm, 0.0));
}

// The group shape of each tensor of a list (an empty tensor has no groups).
inline std::vector<GroupShape> shapes_of(const std::vector<at::Tensor>& ts, Grouping grouping) {
  std::vector<GroupShape> shapes;
  shapes.reserve(ts.size());
  for (const auto& t : ts) shapes.push_back(t.numel() ? group_shape(t, grouping) : GroupShape{1, 1, 0});
  return shapes;
}

}  // namespace regfast
