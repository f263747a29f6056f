// The CPU kernels' passes over a list of tensors, compiled once per instruction set from one source
// (cpu_passes_impl.h, cpu_kernels.h): for the architecture's baseline (cpu_passes_baseline.cpp) and, on
// x86-64, for AVX2 + F16C (cpu_passes_avx2.cpp), where lane vectors are 32-byte registers and float16
// converts in one instruction, and for AVX-512 (cpu_passes_avx512.cpp), where they are 64-byte registers.
// Every variant keeps the same lane order and the same operations on each lane, so they give the same bits.
//
// The ops (norms_cpu.cpp, penalty_cpu.cpp, prox_cpu.cpp) call the passes of the active instruction set,
// chosen once per process: the widest the CPU and the OS support (AVX-512 F/BW/DQ/VL, else AVX2 and F16C,
// else the baseline), unless the environment variable REGFAST_CPU_ISA names another ("baseline", "avx2" or
// "avx512"); regfast._C.set_cpu_isa changes it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "elementwise.h"
#include "groups.h"
#include "kernel_types.h"

namespace regfast {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The passes of one instruction set for element type T, as function pointers.
template <typename T>
struct Passes {
  using A = acc_t<T>;
  // Per-tensor Σ|w| and Σw², from per-chunk partials summed in order.
  void (*tensor_norms)(const std::vector<at::Tensor>& ws, std::vector<A>& l1, std::vector<A>& l2sq);
  // ‖w_g‖₂ of every group of every tensor in double; tensor t's groups start at offsets[t].
  std::vector<double> (*group_norms)(const std::vector<at::Tensor>& ws, const std::vector<GroupShape>& shapes,
                                     std::vector<int64_t>& offsets);
  // outs = mult·(gradient of the penalty at ws), or with `accumulate` (add_penalty_grad_, mult 1) outs + gradient,
  // returning the penalty's value; without (penalty_backward, which needs the gradient only) its sums are not
  // formed: 0.
  A (*grad_pass)(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& outs, bool accumulate, double l1,
                 double l2, double gl, Grouping grouping, double mult);
  // The prox of ws in place: the elastic-net step, then the group shrink (group coefficient from lr).
  void (*prox)(const std::vector<at::Tensor>& ws, double lr, ElasticStep<A> elastic, double l2, double gl,
               Grouping grouping);
  // prox and grad_pass of the tensors at data[t] (wd[t] read, od[t] written) of numels[t] contiguous elements each,
  // with group lasso gl over the groups shapes[t] (null without); tensor_norms of such tensors.
  void (*prox_table)(void* const* data, const std::vector<int64_t>& numels, double lr, ElasticStep<A> elastic,
                     double l2, double gl, const GroupShape* shapes);
  void (*norms_table)(const void* const* data, const std::vector<int64_t>& numels, std::vector<A>& l1,
                      std::vector<A>& l2sq);
  A (*grad_table)(const void* const* wd, void* const* od, const std::vector<int64_t>& numels, bool accumulate,
                  double l1, double l2, double gl, const GroupShape* shapes, double mult);
};

namespace baseline {
template <typename T>
Passes<T> passes();
}  // namespace baseline

#if defined(__x86_64__)
namespace avx2 {
template <typename T>
Passes<T> passes();
}  // namespace avx2
namespace avx512 {
template <typename T>
Passes<T> passes();
}  // namespace avx512
#endif

// The active instruction set and its name ("baseline", "avx2", "avx512").
Isa active_isa();
const char* isa_name(Isa isa);
// Makes the instruction set named `name` the active one; an error naming the problem when the name is
// unknown or the CPU lacks it.
void set_isa(const char* name);

// The passes of the active instruction set. A variant's own code (its passes() included) runs only once that
// variant is the active one, which it is only on a CPU that supports it.
template <typename T>
const Passes<T>& passes() {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) {
    static const Passes<T> widest = avx512::passes<T>();
    return widest;
  }
  if (isa == Isa::kAvx2) {
    static const Passes<T> wide = avx2::passes<T>();
    return wide;
  }
#endif
  static const Passes<T> base = baseline::passes<T>();
  return base;
}

}  // namespace cpu
}  // namespace regfast
