// Host-side helpers of every op, CPU and CUDA alike: the checks of a (device, dtype) group, the
// dtype mapping, and the contiguous working copies of in-place ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
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

// A list of tensors, each either borrowed from the caller or owned. A borrowed tensor takes no
// reference: torch counts a second reference to a tensor that Python also holds by taking a
// reference to its Python object, under the interpreter lock, and a walk over thousands of tensors
// would pay that lock twice per tensor. The tensors it borrows must outlive it; it is never copied.
class TensorRefs {
 public:
  TensorRefs() = default;
  TensorRefs(const TensorRefs&) = delete;
  TensorRefs& operator=(const TensorRefs&) = delete;
  TensorRefs(TensorRefs&& other) noexcept : tensors_(std::move(other.tensors_)), owned_(std::move(other.owned_)) {
    other.tensors_.clear();
    other.owned_.clear();
  }
  TensorRefs& operator=(TensorRefs&&) = delete;
  ~TensorRefs() {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (!owned_[i]) tensors_[i].unsafeReleaseTensorImpl();  // borrowed: give back without a decrement
    }
  }

  void reserve(size_t n) {
    tensors_.reserve(n);
    owned_.reserve(n);
  }
  void borrow(const at::Tensor& t) {
    owned_.push_back(0);
    at::Tensor ref(c10::intrusive_ptr<at::TensorImpl, at::UndefinedTensorImpl>::reclaim(t.unsafeGetTensorImpl()));
    try {
      tensors_.push_back(std::move(ref));
    } catch (...) {
      ref.unsafeReleaseTensorImpl();
      owned_.pop_back();
      throw;
    }
  }
  void own(at::Tensor t) {
    owned_.push_back(1);
    try {
      tensors_.push_back(std::move(t));
    } catch (...) {
      owned_.pop_back();
      throw;
    }
  }

  // Takes a reference to every borrowed tensor: the list then stays valid whatever the caller drops.
  void own_all() {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (owned_[i]) continue;
      at::Tensor ref = tensors_[i];
      tensors_[i].unsafeReleaseTensorImpl();
      tensors_[i] = std::move(ref);
      owned_[i] = 1;
    }
  }

  size_t size() const { return tensors_.size(); }
  bool empty() const { return tensors_.empty(); }
  const at::Tensor& operator[](size_t i) const { return tensors_[i]; }
  std::vector<at::Tensor>::const_iterator begin() const { return tensors_.begin(); }
  std::vector<at::Tensor>::const_iterator end() const { return tensors_.end(); }
  operator const std::vector<at::Tensor>&() const { return tensors_; }
  operator at::TensorList() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<uint8_t> owned_;
};

// The tensors themselves where contiguous (borrowed), else contiguous copies (kernels read flat memory).
inline TensorRefs contiguous_all(at::TensorList ts) {
  TensorRefs out;
  out.reserve(ts.size());
  for (const auto& t : ts) {
    if (t.is_contiguous()) {
      out.borrow(t);
    } else {
      out.own(t.contiguous());
    }
  }
  return out;
}

// In-place ops work on contiguous copies of non-contiguous tensors; this copies the results back.
inline void write_back(at::TensorList originals, at::TensorList work) {
  for (size_t i = 0; i < work.size(); ++i) {
    if (!originals[i].is_same(work[i])) originals[i].copy_(work[i]);
  }
}

}  // namespace regfast
