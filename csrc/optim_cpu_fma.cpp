// The per-element loops of the fused optimizer steps with a·b + c rounded once, compiled for
// AVX2 + FMA on x86-64 (ATen's AVX2 / AVX512 kernels round their fmadd once). optim_cpu.cpp calls
// them only when torch itself runs AVX2 or AVX512 kernels, so the CPU has both extensions.
//
// Every header is included before the target switch: only this file's own functions (internal
// linkage, see optim_cpu_math.h) are compiled for AVX2, never an inline function shared with
// other files (elementwise.h's, for one, stay baseline code that the AVX2 loops inline).
#if defined(__x86_64__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "elementwise.h"
#include "f16c.h"
#include "groups.h"
#include "kernel_types.h"
#include "optim_cpu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define REGFAST_OPTIM_LOOPS avx2_fma
#define REGFAST_OPTIM_F16C 8
#include "optim_cpu_math.h"
#include "optim_cpu_groups.h"

namespace regfast {
namespace optim_cpu {
namespace fused {

void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  sgd_dispatch<true>(args, t, begin, end, sums);
}

void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  adamw_dispatch<true>(args, t, begin, end, sums);
}

const GroupPasses kGroupPasses = {&group_floors_run,   &metric_shrink_run, &round_into_run,  &group_shrink_run,
                                  &column_largest_run, &column_squares_run, &column_floors_run, &metric_sums_run,
                                  &metric_apply_run,   &column_scale_round_run, &pack_floors_run,
                                  &pack_metric_shrink_run, &pack_group_shrink_run};

}  // namespace fused
}  // namespace optim_cpu
}  // namespace regfast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
