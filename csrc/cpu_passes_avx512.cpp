// The CPU passes for AVX-512 on x86-64 (cpu_passes.h): the same source as cpu_passes_baseline.cpp, with lane
// vectors in 64-byte registers (a round of 16 float lanes is one register) and float16 converted 16 elements at a
// time. AVX-512 F, BW, DQ and VL, with AVX2 and F16C; called only where the CPU and the OS support them all.
// Compiled without FMA contraction (-ffp-contract=off, as every variant), so the arithmetic is the others'.
//
// Every header is included before the target switch, so that only this variant's own functions (in namespace
// regfast::cpu::avx512) are compiled for AVX-512, never an inline function shared with other files: those stay
// baseline code, which the AVX-512 loops inline.
#if defined(__x86_64__)

// GCC 12's AVX-512 intrinsics fill their unused merge operand with _mm512_undefined_*(), which its
// -Wmaybe-uninitialized then reports at every inlined use (packed max and min, the float16 conversions).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_passes.h"
#include "cpu_work_list.h"
#include "elementwise.h"
#include "f16c.h"
#include "groups.h"
#include "kernel_types.h"
#include "norm_parts.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")
#endif

#define REGFAST_CPU_ISA avx512
#define REGFAST_CPU_AVX2 1
#define REGFAST_CPU_AVX512 1
#include "cpu_passes_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
