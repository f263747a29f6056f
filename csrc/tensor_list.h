// Host-side helpers of every op, CPU and CUDA alike: the checks of a (device, dtype) group, the
// dtype mapping, and the contiguous working copies of in-place ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernel_types.h"

namespace regfast {

// The dtype reductions accumulate in: float64 for float64 tensors, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, "params must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// `ts` is one group of an op: non-empty, floating point, one dtype, one device of `type`.
inline void check_group(at::TensorList ts, const char* name, c10::DeviceType type) {
  TORCH_CHECK(!ts.empty(), name, " must not be empty");
  const auto dtype = ts[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), name, " must be floating point");
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().type() == type && t.device() == ts[0].device() && t.scalar_type() == dtype, name,
                " must all be ", c10::DeviceTypeName(type), " tensors of one device and dtype, got ", t.device(), " ",
                t.scalar_type(), " and ", ts[0].device(), " ", dtype);
  }
}

// The tensors themselves where contiguous, else contiguous copies (kernels read flat memory).
inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// In-place ops work on contiguous copies of non-contiguous tensors; this copies the results back.
inline void write_back(at::TensorList originals, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < work.size(); ++i) {
    if (!originals[i].is_same(work[i])) originals[i].copy_(work[i]);
  }
}

}  // namespace regfast
