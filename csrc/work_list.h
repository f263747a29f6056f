// The work list the CUDA launcher reads: plain structs shared by the host code and the kernels.
#pragma once

#include <cstdint>

namespace regfast {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

constexpr int64_t kChunk = 1 << 16;

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// One tensor of a list: its data, an optional second tensor of the same shape (grads or
// outputs), its group layout [outer, ngroups, inner] and where its groups start in per-group arrays.
struct TensorMeta {
  void* data;
  void* other;
  int64_t numel;
  int64_t ngroups;
  int64_t inner;
  int64_t group_offset;
};

// A proximal step: lr from the 0-dim accumulation-dtype tensor at lr_ptr when set, else `lr`.
struct Step {
  const void* lr_ptr;
  double lr;
  double l1;
  double l2;
};

}  // namespace cuda
}  // namespace regfast
