// The CPU passes for AVX2 + F16C on x86-64 (cpu_passes.h): the same source as cpu_passes_baseline.cpp,
// with lane vectors in 32-byte registers and float16 converted by F16C. Called only where the CPU has both.
//
// Every header is included before the target switch, so that only this variant's own functions (in namespace
// regfast::cpu::avx2) are compiled for AVX2, never an inline function shared with other files: those stay
// baseline code, which the AVX2 loops inline.
#if defined(__x86_64__)

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
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

#define REGFAST_CPU_ISA avx2
#define REGFAST_CPU_AVX2 1
#define REGFAST_CPU_AVX512 0
#include "cpu_passes_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
