// The CUDA launcher's interface: the plain structs the host code fills and the kernels read (the
// work list, tensor table, steps and optimizer scalars), and the host entry point of every kernel.
// Plain pointers and CUDA types only, so that the kernels build with nvcc alone; the *_cuda.cpp
// files turn tensors into these arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace regfast {
namespace cuda {

constexpr int64_t kChunk = 1 << 16;

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// A piece of a group: elements [begin, end) of group `group` of tensor `tensor`, in the group's own order
// ([o, g, k] over its outer and inner indices).
struct GroupPiece {
  int64_t tensor;
  int64_t group;
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

// A proximal step. A tensor lr (tensor_lr) is read from the 0-dim accumulation-dtype tensor at lr_ptr when
// set, else it is `lr` (a CPU tensor's value, read on the host, exact in the accumulation dtype), and the
// elastic-net scalars are computed from it in the accumulation dtype, one rounding per op, as the reference
// computes them from a tensor. For a float lr, threshold = lr·l1 and shrink = 1/(1 + 2·lr·l2) are computed
// on the host in double (elementwise.h's elastic_scalars), as the reference computes them.
struct Step {
  const void* lr_ptr;
  double lr;
  double l1;
  double l2;
  double threshold;
  double shrink;
  bool tensor_lr;
};

// The state tensors of one param in an optimizer step: the momentum buffer (SGD), or exp_avg,
// exp_avg_sq and max_exp_avg_sq (AdamW); accumulation dtype, absent ones null.
struct OptimState {
  void* first;
  void* second;
  void* third;
};

// The hyperparameters of an optimizer step. A tensor lr (tensor_lr) as in Step: from lr_ptr when set,
// else `lr` (a CPU tensor's value). A float lr comes with threshold = lr·l1, shrink = 1/(1 + 2·lr·l2) and
// (AdamW) decay = 1 − lr·weight_decay computed in double, as the reference computes them from a float.
// AdamW's bias corrections, when every param has the same step count on the host, are step_size and
// bc2_sqrt (and the kernel gets no per-tensor table).
struct OptimScalars {
  const void* lr_ptr;
  bool tensor_lr;
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
  double step_size;  // −lr/(1 − β1ᵗ)
  double bc2_sqrt;   // √(1 − β2ᵗ)
  Momentum momentum_mode;
  ProxMode prox;
  bool nesterov;
  bool maximize;
  bool amsgrad;
};

// partials (accumulation dtype, 2·nitems): Σ|w| of item c at [c], Σw² at [nitems + c].
void launch_norms(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, void* partials,
                  cudaStream_t stream);

// out (accumulation dtype, 2·ntensors): per-tensor sums of `partials` in item order.
void launch_sum_partials(DType dtype, const void* partials, int64_t nitems, const int64_t* first, int64_t ntensors,
                         void* out, cudaStream_t stream);

// Per group (group q: pieces [first[q], first[q + 1]), each at most kChunk elements): norm = ‖u_g‖₂ with u = w,
// or the elastic-net step of w when `step` (a host pointer) is set, summed in double without overflow or
// underflow (norm_parts.h); root = √|g|. Both double, one value per group. piece_parts (3·npieces doubles) and
// group_parts (3·total_groups) are scratch.
void launch_group_norms(DType dtype, const GroupPiece* pieces, int64_t npieces, const int64_t* first,
                        int64_t total_groups, const TensorMeta* meta, const Step* step, double* piece_parts,
                        double* group_parts, double* norm, double* root, cudaStream_t stream);

// meta.other[i] = [other[i] +] mult·(l1·sign(w) + scale_g·(w·pre_g)), or with 2·l2·w in place of the
// group term when group_scale is null; partials as launch_norms. group_scale and group_pre (per group,
// accumulation dtype) come together; mult (0-dim accumulation dtype) may be null (1).
void launch_grad(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, double l1, double l2,
                 const void* group_scale, const void* group_pre, const void* mult, bool accumulate, void* partials,
                 cudaStream_t stream);

// w = factor_g·u(w), u the elastic-net step; group_factor (per group) may be null.
void launch_prox(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta, Step step,
                 const void* group_factor, cudaStream_t stream);

// One SGD step and the prox over every item (meta.data: params, meta.other: grads, state[t].first:
// the momentum buffer); partials as launch_norms, of the new params, or null for none.
void launch_sgd_step(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta,
                     const OptimState* state, const OptimScalars& s, void* partials, cudaStream_t stream);

// One AdamW step and the prox; state[t] = (exp_avg, exp_avg_sq, max_exp_avg_sq), corrections
// (accumulation dtype, 2 per tensor) = (−lr/(1 − β1ᵗ), √(1 − β2ᵗ)), or null for the scalars' step_size and
// bc2_sqrt.
void launch_adamw_step(DType dtype, const WorkItem* items, int64_t nitems, const TensorMeta* meta,
                       const OptimState* state, const OptimScalars& s, const void* corrections, void* partials,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace regfast
