// The per-element loops of the fused optimizer steps with a·b + c rounded once (optim_cpu_fma.cpp),
// compiled for AVX-512 F/BW/DQ/VL with FMA on x86-64, vectorized on 512 bits. optim_cpu.cpp calls
// them where torch itself runs AVX2 or AVX512 kernels and the CPU passes run their AVX-512 variant
// (cpu_passes.h: the CPU and the OS support AVX-512, and REGFAST_CPU_ISA did not choose another).
//
// Every header is included before the target switch: only this file's own functions (internal
// linkage, see optim_cpu_math.h) are compiled for AVX2, never an inline function shared with
// other files (elementwise.h's, for one, stay baseline code that the AVX-512 loops inline).
#if defined(__x86_64__)

// GCC 12's AVX-512 intrinsics fill their unused merge operand with _mm512_undefined_*(), which its
// -Wmaybe-uninitialized then reports at every inlined use.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "elementwise.h"
#include "f16c.h"
#include "kernel_types.h"
#include "optim_cpu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#endif

#define REGFAST_OPTIM_LOOPS avx512_fma
#define REGFAST_OPTIM_F16C 16
#include "optim_cpu_math.h"

namespace regfast {
namespace optim_cpu {
namespace fused_avx512 {

void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  sgd_dispatch<true>(args, t, begin, end, sums);
}

void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  adamw_dispatch<true>(args, t, begin, end, sums);
}

}  // namespace fused_avx512
}  // namespace optim_cpu
}  // namespace regfast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
