// The CPU passes for the architecture's baseline instruction set (cpu_passes.h), and the choice of the
// active instruction set.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#define REGFAST_CPU_ISA baseline
#define REGFAST_CPU_AVX2 0
#define REGFAST_CPU_AVX512 0
#include "cpu_passes_impl.h"

namespace regfast {
namespace cpu {
namespace {

// Whether the CPU (and the OS, which must save the 256-bit or 512-bit registers and, for AVX-512, the mask
// registers: __builtin_cpu_supports checks both) supports the instruction set.
bool supported(Isa isa) {
  switch (isa) {
    case Isa::kBaseline:
      return true;
    case Isa::kAvx2:
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      return supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
      return false;
#endif
  }
  return false;
}

Isa parse_isa(const char* name, const char* where) {
  const std::string s(name);
  if (s == "baseline") return Isa::kBaseline;
  if (s == "avx2") {
    TORCH_CHECK(supported(Isa::kAvx2), where, "avx2: this CPU does not support AVX2 and F16C");
    return Isa::kAvx2;
  }
  if (s == "avx512") {
    TORCH_CHECK(supported(Isa::kAvx512), where, "avx512: this CPU does not support AVX-512 F, BW, DQ and VL");
    return Isa::kAvx512;
  }
  TORCH_CHECK(false, where, "unknown CPU instruction set '", s, "': expected 'baseline', 'avx2' or 'avx512'");
}

Isa initial_isa() {
  const char* env = std::getenv("REGFAST_CPU_ISA");
  if (env != nullptr && *env != '\0') return parse_isa(env, "REGFAST_CPU_ISA=");
  if (supported(Isa::kAvx512)) return Isa::kAvx512;
  return supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kBaseline;
}

std::atomic<int>& chosen() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(chosen().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

void set_isa(const char* name) {
  chosen().store(static_cast<int>(parse_isa(name, "set_cpu_isa: ")), std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace regfast
