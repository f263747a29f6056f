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

// The state tensors of one param in an optimizer step: the momentum buffer (SGD), or exp_avg,
// exp_avg_sq and max_exp_avg_sq (AdamW); accumulation dtype, absent ones null.
struct OptimState {
  void* first;
  void* second;
  void* third;
};

enum MomentumMode : int { kMomentumNone = 0, kMomentumInit = 1, kMomentumUpdate = 2 };
enum ProxMode : int { kProxNone = 0, kProxLr = 1, kProxPreconditioned = 2 };

// The hyperparameters of an optimizer step. lr from the 0-dim accumulation-dtype tensor at
// lr_ptr when set, else `lr` with threshold = lr·l1, shrink = 1/(1 + 2·lr·l2) and (AdamW)
// decay = 1 − lr·weight_decay computed in double, as the reference computes them from a float.
struct OptimScalars {
  const void* lr_ptr;
  double lr;
  double threshold;
  double shrink;
  double decay;
  double l1;
  double l2;
  double weight_decay;
  double momentum;
  double keep;  // 1 − dampening
  double beta1_weight;  // 1 − β1
  double beta2;
  double beta2_weight;  // 1 − β2
  double eps;
  int momentum_mode;
  int prox;
  bool nesterov;
  bool maximize;
  bool amsgrad;
};

}  // namespace cuda
}  // namespace regfast
