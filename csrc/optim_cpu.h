// The per-element loops of the fused optimizer steps on the CPU, as plain functions over one run
// [begin, end) of one tensor. optim_cpu.cpp (the ops) prepares the scalars and the work list and
// calls them from at::parallel_for.
//
// ATen's vectorized CPU kernels round a·b + c once (an fma) when torch runs with AVX2 or AVX512
// kernels and twice otherwise; to give the same bits as the foreach optimizers the loops are
// built twice: `rounded_twice` (optim_cpu_baseline.cpp, the baseline ISA) and `fused`
// (optim_cpu_fma.cpp, AVX2 + FMA on x86-64; elsewhere the same file as rounded_twice).
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace regfast {
namespace optim_cpu {

// Every double is converted to the accumulation dtype A (float, double for double params) with
// static_cast, as ATen converts a Scalar; values the reference computes in A are already exact in A.
struct SgdArgs {
  DType elem;
  Momentum momentum_mode;
  bool maximize;
  bool has_weight_decay;
  bool nesterov;
  bool lr_is_tensor;  // the prox scalars in the accumulation dtype, as the reference computes them
  bool has_l1;
  bool penalty;       // write Σ|w| and Σw² of the new (rounded) params
  double neg_lr;
  double weight_decay;
  double momentum;
  double keep;        // 1 − dampening
  double threshold;   // lr·l1
  double shrink;      // 1/(1 + 2·lr·l2); 1 without l2
};

struct SgdTensor {
  void* param;
  const void* grad;
  void* buffer;  // accumulation dtype; unused without momentum
  // Where given (group lasso, the group shrink to follow): the new params go here, unrounded (accumulation dtype,
  // indexed as the param), and the params are not written.
  void* work = nullptr;
};

struct AdamWArgs {
  DType elem;
  ProxMode prox;
  bool maximize;
  bool amsgrad;
  bool lr_is_tensor;  // w + m/(d/step_size) instead of w + step_size·m/d, and s = lr/d instead of (1/d)·lr
  bool has_l1;
  bool has_l2;
  bool penalty;
  double lr;
  double decay;          // 1 − lr·weight_decay (1 without decay)
  double beta1_weight;   // 1 − β1
  double beta2;
  double beta2_weight;   // 1 − β2
  double eps;
  double threshold;      // prox "lr": lr·l1
  double shrink;         // prox "lr": 1/(1 + 2·lr·l2)
  double l1;             // prox "preconditioned": per element s·l1 and 1/(1 + s·2l2)
  double two_l2;
  bool group;            // group lasso: AdamWTensor's work (and group, prox "preconditioned") below
  // With group and prox "lr" or none (the CPU steps with group lasso in two passes): the moments as a step left
  // them, read again and not written, the grad not read; the param's new value to work again.
  bool replay = false;
};

struct AdamWTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // unused without amsgrad
  double step_size;      // −lr/(1 − β1ᵗ)
  double bc2_sqrt;       // √(1 − β2ᵗ)
  // With args.group (accumulation dtype, indexed as the param): the new params before the group shrink go to
  // `work`, the params are not written; with the preconditioned prox `group` holds the group term of the floor on
  // entry (group_floors) and the group shrink's threshold group_weight·s/(1 + s·2l2) on return.
  void* group = nullptr;
  void* work = nullptr;
  double group_weight = 0;  // group_lasso·√|g|
};

// Groups [g0, g1) of a contiguous tensor laid out [outer, ngroups, inner] (groups.h's GroupShape).
struct GroupBlock {
  int64_t outer, ngroups, inner, g0, g1;
};

// sums[0] = Σ|w|, sums[1] = Σw² of the run's new params (in A, stored exactly) when args.penalty.
namespace rounded_twice {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums);
void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums);
}  // namespace rounded_twice

// The group passes of the preconditioned prox with group lasso (reference: penalty_gradient_scales and
// _metric_group_shrink_) over one block of groups, each group's sums in double in an order fixed by its shape alone
// (optim_cpu_groups.h): the same bits from the baseline build (optim_cpu_baseline.cpp) and the AVX2 one
// (optim_cpu_fma.cpp, x86-64 only). The block's own arrays (`out`, `u`, `a`: accumulation dtype) hold its elements
// contiguously, [outer, g1 − g0, inner]; the params `w` (element type `elem`) are the whole tensor.
// group_floors: out = (|w_i| / ‖w_g‖) · weight (a zero norm taken as 1) from the block's params.
// metric_shrink: u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂, rounded into the block's params.
// round_into: the block's array `work` rounded into its params, as the kernels round (F16C where the CPU has it).
struct GroupPasses {
  void (*group_floors)(DType elem, const void* w, void* out, const GroupBlock& b, double weight);
  void (*metric_shrink)(DType elem, void* u, const void* a, void* w, const GroupBlock& b);
  void (*round_into)(DType elem, const void* work, void* w, const GroupBlock& b);
};

namespace rounded_twice {
extern const GroupPasses kGroupPasses;
}  // namespace rounded_twice
#if defined(__x86_64__)
namespace fused {
extern const GroupPasses kGroupPasses;
}  // namespace fused
#endif

namespace fused {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums);
void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums);
}  // namespace fused

// The same loops as `fused` on 512-bit vectors (optim_cpu_avx512.cpp), where the CPU passes run AVX-512.
namespace fused_avx512 {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums);
void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums);
}  // namespace fused_avx512

}  // namespace optim_cpu
}  // namespace regfast
