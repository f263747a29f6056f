// The per-element loops of the fused optimizer steps on the CPU, as plain functions over one run
// [begin, end) of one tensor. optim_cpu.cpp (the ops) prepares the scalars and the work list and
// calls them from at::parallel_for.
//
// ATen's vectorized CPU kernels round a·b + c once (an fma) when torch runs with AVX2 or AVX512
// kernels and twice otherwise; to give the same bits as the foreach optimizers the loops are
// built twice: `rounded_twice` (optim_cpu_baseline.cpp, the baseline ISA) and `fused`
// (optim_cpu_fma.cpp, AVX2 + FMA on x86-64; elsewhere the same file as rounded_twice).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/SmallVector.h>

#include "kernel_types.h"

namespace regfast {
namespace optim_cpu {

// Per-group arrays of a block (norms, factors, roots): on the stack for up to 16 groups (a 1-D tensor's block, one
// group; a block of a few rows or columns), on the heap beyond.
template <typename T>
using GroupArray = c10::SmallVector<T, 16>;

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
  // With group (the CPU steps with group lasso in several passes): the moments as a step left them, read again and
  // not written, the grad not read; the param's new value to work again (and with the preconditioned prox, from the
  // floors in group, the threshold to group again).
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
  // With the preconditioned prox, group and float accumulation (float32 / 16-bit params), where set: the floor's
  // group term of element i is |w_i|·floor_scale[i] in double, rounded to float, formed as the param is read (group
  // is then only written), where group_floors / column_floors would have written it into `group` first.
  const double* floor_scale = nullptr;
};

// Groups [g0, g1) of a contiguous tensor laid out [outer, ngroups, inner] (groups.h's GroupShape).
struct GroupBlock {
  int64_t outer, ngroups, inner, g0, g1;
};

// Whole tensors of one group each, stepped together (a pack): group j's elements at [offsets[j], offsets[j + 1])
// of the pack's own arrays, its params at params[j].
struct GroupPack {
  int64_t ng;
  const int64_t* offsets;  // ng + 1
  void* const* params;     // ng
};

// Memory to ask for while a block is shrunk: the next block's param, grad and state, a cache line at a time, spread
// over the shrink's pieces (GroupPasses::group_shrink) so that it comes in while the shrink computes.
struct LinesAhead {
  static constexpr int kRanges = 4;
  const char* at[kRanges] = {};
  int64_t lines[kRanges] = {};
  int ranges = 0;
  int64_t total = 0;

  void add(const void* p, int64_t bytes) {
    if (p == nullptr || bytes <= 0 || ranges == kRanges) return;
    at[ranges] = static_cast<const char*>(p);
    lines[ranges] = (bytes + 63) / 64;
    total += lines[ranges++];
  }
  // At most `cap` lines in all: the first lines of each range, the same share of each.
  void limit(int64_t cap) {
    if (total <= cap) return;
    int64_t kept = 0;
    for (int r = 0; r < ranges; ++r) kept += lines[r] = lines[r] * cap / total;
    total = kept;
  }
  // The next `count` lines, range after range.
  void ask(int64_t count) {
    for (int r = 0; r < ranges && count > 0; ++r) {
      for (; lines[r] > 0 && count > 0; --lines[r], --count, at[r] += 64) __builtin_prefetch(at[r], 0, 2);
    }
  }
};

// sums[0] = Σ|w|, sums[1] = Σw² of the run's new params (in A, stored exactly) when args.penalty.
namespace rounded_twice {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums);
void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums);
}  // namespace rounded_twice

// One group of Adam's metric group shrink u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂ (reference:
// _metric_group_shrink_), from its sums in double (optim_cpu_groups.h's metric_shrink_typed; optim_cpu.cpp's passes
// over large tensors). The group vanishes when ‖u_g/a_g‖₂ ≤ 1, else x_i = u_i·t/(t + a_i) with t the root of
// Σ_i u_i²/(t + a_i)² = 1 found by Newton's method, the factor t/(t + a_i) then formed from t rounded to A.
//
// The start: ā = Σ_i u_i²·a_i / ‖u_g‖² is the mean of a_g weighted by u_i², and by Jensen's inequality (1/x² is
// convex) Σ_i u_i²/(t + a_i)² ≥ ‖u_g‖²/(t + ā)² for t ≥ 0. So where ‖u_g‖ exceeds ā by more than the sums' rounding
// can account for, ‖u_g/a_g‖ > 1 and the group stays without the vanishing test (whose sum divides each element);
// and t₀ = max(‖u_g‖ − ā, 0) lies at or below the root. The reference starts from max(‖u_g‖ − max a_g, 0), also below
// the root but further from it where a_g spreads: both reach the same root.
struct MetricStart {
  double t0;
  bool stays;  // surely ‖u_g/a_g‖ > 1; else the vanishing test decides
};

// From ‖u_g‖² and Σ_i u_i²·a_i. ‖u_g‖² beyond ā² by kMargin is beyond it whatever the rounding (of both sums, the
// test's, their quotient and its square: at most about 5n·2⁻⁵³ relative for n ≤ 2³⁴ terms); sums at least kNormal
// are normal doubles, whose terms lost at most 2⁻¹⁰⁷⁴ each to underflow. A NaN leaves the group to the test, t₀ = 0.
inline MetricStart metric_start(double squares, double weighted) {
  constexpr double kMargin = 1 + 0x1p-16;
  constexpr double kNormal = 0x1p-900;
  const double mean = weighted / squares;
  const double m2 = mean * mean;
  const double t0 = std::sqrt(squares) - mean;
  return {t0 > 0 ? t0 : 0.0, squares >= kNormal && weighted >= kNormal && m2 >= kNormal && squares > m2 * kMargin};
}

// Newton's steps solve f(t) = 1 for f = 1/‖u_g/(t + a_g)‖, which is increasing and concave (f'' ∝ S3² − S2·S4 ≤ 0 by
// Cauchy-Schwarz, with Sk = Σ_i u_i²/(t + a_i)^k): the iterates rise monotonically to the root, and a step of length
// δ from t leaves t short of it by about 1.5·(S2·S4 − S3²)/(S2·S3)·δ². One step from t with S2, S3, S4 at t (t moves
// to the next iterate); whether the group steps on: not after a step that rises by less than kSettled relative to t
// (its next would move t by about the square of that: t is the root to double rounding), nor after one that rises
// by at most kSmallStep relative to t with that estimate at most kClose relative to t (below half an ulp of A by a
// margin: the root's rounding to A, unless the root lies within kClose of a rounding boundary; not with the slope
// S3 clamped), nor after one that does not rise; a NaN stops it as NaN. At most kMetricNewtonSteps steps (the
// reference's METRIC_NEWTON_STEPS).
constexpr int kMetricNewtonSteps = 8;

template <typename A>
inline bool metric_newton_step(double& t, double s2, double s3, double s4) {
  constexpr double kSettled = 0x1p-30;
  constexpr double kSmallStep = 0x1p-10;  // the estimate's own error is of the order of δ/t
  constexpr double kClose = std::is_same_v<A, double> ? 0x1p-56 : 0x1p-36;
  constexpr double tiny = std::numeric_limits<A>::min();
  const double slope = s3 < tiny ? tiny : s3;
  const double next = t + (std::sqrt(s2) - 1) * s2 / slope;
  const double rise = next - t;
  const double short_by = 1.5 * std::abs(s2 * s4 - s3 * s3) / (s2 * slope) * rise * rise;
  t = next;
  // A slope clamped to tiny shortens the step, and the estimate with it: no early stop then.
  return rise > kSettled * next && !(s3 >= tiny && rise <= kSmallStep * next && short_by <= kClose * next);
}

// The roots t (ng of them) of ng groups' shrink and which groups vanish, from their sums: sums(stage, out, t) writes
// stage 0's ‖u_g‖² and Σ u_i²·a_i into out[0], out[1], stage 1's vanishing test Σ (u_i/a_i)² into out[0] (asked
// only where a group is in doubt), stage 2's S2, S3, S4 at t into out[0 .. 2] (once per Newton step), each out[k]
// ng doubles. The blocks (optim_cpu_groups.h's metric_shrink_typed) sum over their arrays, the passes over large
// tensors (optim_cpu.cpp's metric_passes) over the elements again.
template <typename A, typename Sums>
void metric_roots(int64_t ng, Sums&& sums, double* t, char* vanishes) {
  GroupArray<double> buf(static_cast<size_t>(3 * ng), 0.0);
  double* const s[3] = {buf.data(), buf.data() + ng, buf.data() + 2 * ng};
  GroupArray<char> active(static_cast<size_t>(ng), 1);
  sums(0, s, t);
  bool doubt = false;
  for (int64_t j = 0; j < ng; ++j) {
    const MetricStart start = metric_start(s[0][j], s[1][j]);
    t[j] = start.t0;
    active[j] = start.stays;
    vanishes[j] = 0;
    doubt = doubt || !start.stays;
  }
  if (doubt) {
    sums(1, s, t);
    for (int64_t j = 0; j < ng; ++j) {
      vanishes[j] = !active[j] && s[0][j] <= 1;
      active[j] = !vanishes[j];
    }
  }
  bool running = std::find(active.begin(), active.end(), 1) != active.end();
  for (int step = 0; running && step < kMetricNewtonSteps; ++step) {
    sums(2, s, t);
    running = false;
    for (int64_t j = 0; j < ng; ++j) {
      if (!active[j]) continue;
      active[j] = metric_newton_step<A>(t[j], s[0][j], s[1][j], s[2][j]);
      running = running || active[j];
    }
  }
}

// The group passes of the preconditioned prox with group lasso (reference: penalty_gradient_scales and
// _metric_group_shrink_) over one block of groups, each group's sums in double in an order fixed by its shape alone
// (optim_cpu_groups.h): the same bits from the baseline build (optim_cpu_baseline.cpp) and the AVX2 one
// (optim_cpu_fma.cpp, x86-64 only). The block's own arrays (`out`, `u`, `a`: accumulation dtype) hold its elements
// contiguously, [outer, g1 − g0, inner]; the params `w` (element type `elem`) are the whole tensor.
// group_floors: out = (|w_i| / ‖w_g‖) · weight (a zero norm taken as 1) from the block's params (float32 / 16-bit
// params: |w_i| · (weight / ‖w_g‖)); with `scales` (float32 / 16-bit params), weight / ‖w_g‖ per group of the block
// into scales instead (AdamWTensor::floor_scale), `out` left holding 16-bit params widened.
// metric_shrink: u_g ← argmin_x Σ_i (x_i − u_i)²/(2·a_i) + ‖x_g‖₂, rounded into the block's params.
// round_into: the block's array `work` rounded into its params, as the kernels round (F16C where the CPU has it).
// group_shrink: prox_'s group shrink with only the group term, u_g·max(0, 1 − coef·√|g| / ‖u_g‖₂), on the block's
// array `work` (the steps with the scalar prox step: coef = step·gl), rounded into its params as round_into rounds.
//
// The passes over a large tensor by columns, or as one group (optim_cpu.cpp's metric_passes), each over n elements
// seen as rows of `cols` (the last row may be short) and adding its sums per column into the sums given, in double
// (each call's sums in row order); u and a are arrays of the accumulation dtype (float, or double for float64 params):
// column_largest (float64 params): each column's largest magnitude, kept in largest[c] if larger (NaN as soon as
// one is). column_squares: Σ w² of the params (16-bit ones widened into scratch first; float64 ones divided by
// scale_c first, their column's largest magnitude, as block_group_norms scales them; null for the others).
// column_floors: the floors as group_floors forms them, (|w_i| / norm_c)·weight for float64 params, else
// |w_i|·scale_c (scale_c = weight / norm_c).
// metric_sums: stage 0 ‖u_g‖² and Σ u_i²·a_i into out[0], out[1]; stage 1 the vanishing test's Σ (u_i/a_i)² into
// out[0]; stage 2 Newton's S2, S3, S4 at t_c into out[0 .. 2]. metric_apply: w = u·t/(t + a) as metric_shrink rounds
// it (root: t rounded to the accumulation dtype per column; vanishes per column), through u. column_scale_round
// (the two-pass steps of 16-bit params): a float array times each column's factor, rounded into the params.
//
// The passes over a pack (GroupPack), whose own arrays hold its tensors one after another, each a group: pack_floors
// (weight per group), pack_metric_shrink and pack_group_shrink (coef·√|g| per group) as group_floors, metric_shrink
// and group_shrink give a block of each tensor alone, rounded into each tensor's params.
struct GroupPasses {
  void (*group_floors)(DType elem, const void* w, void* out, const GroupBlock& b, double weight, double* scales);
  void (*metric_shrink)(DType elem, void* u, const void* a, void* w, const GroupBlock& b);
  void (*round_into)(DType elem, const void* work, void* w, const GroupBlock& b);
  void (*group_shrink)(DType elem, void* work, void* w, const GroupBlock& b, double coef, LinesAhead* ahead);
  void (*column_largest)(const double* w, int64_t n, int64_t cols, double* largest);
  void (*column_squares)(DType elem, const void* w, int64_t n, int64_t cols, float* scratch, const double* scale,
                         double* sums);
  void (*column_floors)(DType elem, const void* w, const double* scale, const double* norm, double weight, int64_t n,
                        int64_t cols, void* out);
  void (*metric_sums)(DType elem, int stage, const void* u, const void* a, const double* t, int64_t n, int64_t cols,
                      double* const* out);
  void (*metric_apply)(DType elem, void* u, const void* a, const void* root, const char* vanishes, int64_t n,
                       int64_t cols, void* w);
  void (*column_scale_round)(DType elem, float* work, const float* factor, int64_t n, int64_t cols, void* w);
  void (*pack_floors)(DType elem, const GroupPack& p, const double* weight, void* out);
  void (*pack_metric_shrink)(DType elem, void* u, const void* a, const GroupPack& p);
  void (*pack_group_shrink)(DType elem, void* u, const GroupPack& p, double coef);
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
