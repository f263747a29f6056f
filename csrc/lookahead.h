// Loads ahead of a walk over a list of tensors and their grads, for the heap objects each check reads.
//
// The checks of a tensor and its grad follow a chain of pointers: the Python object, its TensorImpl, its
// StorageImpl (data pointer), the autograd metadata, the grad's TensorImpl and its StorageImpl. Where the
// objects of a list lie in the order they were made, the hardware prefetchers find them; where a model's
// training has scattered them over the heap (grads are made during backward, among the autograd graph's
// own objects), each link is a miss to memory, and the walk waits for every one in turn. The walk calls
// `at(k)` before it reads tensor k: each stage follows one link of a later tensor, the one that the stage
// before it fetched kDistance tensors earlier, so the links arrive before they are read and the misses
// overlap. It goes down to the grad's TensorImpl (the processor overlaps a single last miss by itself), or for a
// walk without grads to the StorageImpl: for a list of 20,000 one-element tensors in shuffled order, prox_ on one
// thread took 2.6-5.0 ms without a lookahead (its three links left to the processor) and 1.4-2.6 ms with it
// (medians, builds alternating, a 2-core AMD EPYC).
//
// Only addresses are computed from what a stage reads; a stage reads nothing of an object that it did
// not first prove to be one of the walk's plain tensor types (a prefetch of a wrong address is harmless:
// it never faults), and nothing that can throw (a tensor without storage, such as a sparse one, has an
// empty unsafe_storage()). What the walk then checks is unchanged.
#pragma once

#include <Python.h>
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace regfast {
namespace host {

// `obj`'s type is one of the tuple `types` (exactly: a subclass is not one of them).
inline bool plain_type(PyObject* obj, PyObject* types) {
  const Py_ssize_t n = PyTuple_GET_SIZE(types);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (reinterpret_cast<PyObject*>(Py_TYPE(obj)) == PyTuple_GET_ITEM(types, i)) return true;
  }
  return false;
}

// The lines of an object of `bytes` bytes at `p`.
inline void prefetch_object(const void* p, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t line = first; line < end; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line));
}

// The VersionCounter that an in-place write of `t` bumps (VariableVersion holds only its pointer; null when
// disabled), for writing.
inline void prefetch_version_counter(const at::Tensor& t) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion holds one pointer");
  __builtin_prefetch(*reinterpret_cast<const void* const*>(&t.unsafeGetTensorImpl()->version_counter()), 1);
}

class Lookahead {
 public:
  // `items`: the n objects of the list; `types`: the tuple of tensor types the walk takes; `states`: tuples of n
  // state tensors whose objects the walk reads with each tensor (an optimizer step's plan), or null.
  // `storages`: the walk also reads the data pointers of the grads and states (for the CPU kernels' tables, or to
  // list them for a launcher in Python), so their StorageImpls are loaded too, half a stage ahead. `grads`: the
  // walk reads the grads. `data`: the walk reads the params' data pointers (their StorageImpls are loaded too).
  Lookahead(PyObject* const* items, ptrdiff_t n, PyObject* types, const std::vector<PyObject*>* states = nullptr,
            bool storages = false, bool grads = true, bool data = true)
      : items_(items), n_(n), types_(types), states_(states), storages_(storages), grads_(grads), data_(data) {
    for (ptrdiff_t k = -kStages * kDistance; k < 0; ++k) at(k);
  }

  // Before the walk reads tensor k and its grad. Each stage takes the link that the stage before it found,
  // kDistance tensors earlier, from the ring.
  void at(ptrdiff_t k) {
    if (const ptrdiff_t j = k + 4 * kDistance; 0 <= j && j < n_) __builtin_prefetch(items_[j]);
    if (const ptrdiff_t j = k + 3 * kDistance; 0 <= j && j < n_) {
      PyObject* obj = items_[j];
      Links& l = ring_[j & kMask];
      l = {};
      if (plain_type(obj, types_)) {
        l.impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
        prefetch_object(l.impl, sizeof(c10::TensorImpl));
      }
    }
    if (const ptrdiff_t j = k + 2 * kDistance; 0 <= j && j < n_) {
      Links& l = ring_[j & kMask];
      if (l.impl != nullptr) {
        if (data_) prefetch_object(l.impl->unsafe_storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
        if (grads_) l.meta = static_cast<const torch::autograd::AutogradMeta*>(l.impl->autograd_meta());
        if (l.meta != nullptr) __builtin_prefetch(&l.meta->grad_);
      }
    }
    if (states_ != nullptr) {
      if (const ptrdiff_t j = k + 2 * kDistance; 0 <= j && j < n_) {
        for (PyObject* tuple : *states_) __builtin_prefetch(PyTuple_GET_ITEM(tuple, j));
      }
      if (const ptrdiff_t j = k + kDistance; 0 <= j && j < n_) {
        for (PyObject* tuple : *states_) {
          PyObject* obj = PyTuple_GET_ITEM(tuple, j);
          if (plain_type(obj, types_)) {
            prefetch_object(THPVariable_Unpack(obj).unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
          }
        }
      }
    }
    if (const ptrdiff_t j = k + kDistance; 0 <= j && j < n_) {
      Links& l = ring_[j & kMask];
      if (l.meta != nullptr && l.meta->grad_.defined()) {
        l.grad = l.meta->grad_.unsafeGetTensorImpl();
        prefetch_object(l.grad, sizeof(c10::TensorImpl));
      }
    }
    if (!storages_) return;
    if (const ptrdiff_t j = k + kDistance / 2; 0 <= j && j < n_) {
      const Links& l = ring_[j & kMask];
      if (l.grad != nullptr) prefetch_object(l.grad->unsafe_storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
      if (states_ != nullptr) {
        for (PyObject* tuple : *states_) {
          PyObject* obj = PyTuple_GET_ITEM(tuple, j);
          if (plain_type(obj, types_)) {
            prefetch_object(THPVariable_Unpack(obj).unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(),
                            sizeof(c10::StorageImpl));
          }
        }
      }
    }
  }

  static constexpr ptrdiff_t kDistance = 8;  // tensors between stages

 private:
  static constexpr ptrdiff_t kStages = 4;

  // The links found so far of one tensor of the lookahead.
  struct Links {
    const c10::TensorImpl* impl = nullptr;
    const torch::autograd::AutogradMeta* meta = nullptr;
    const c10::TensorImpl* grad = nullptr;
  };
  static constexpr ptrdiff_t kRing = 32;  // > the 3·kDistance tensors whose links are held at once
  static constexpr ptrdiff_t kMask = kRing - 1;
  static_assert(kRing > 3 * kDistance && (kRing & kMask) == 0, "ring too small");

  PyObject* const* items_;
  ptrdiff_t n_;
  PyObject* types_;
  const std::vector<PyObject*>* states_;
  bool storages_;
  bool grads_;
  bool data_;
  Links ring_[kRing];
};

}  // namespace host
}  // namespace regfast
