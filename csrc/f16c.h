// float16 <-> float for eight elements at a time with F16C, to the bits of c10's scalar conversions: float16 to
// float is exact in both (a signaling NaN comes back quiet in both); float to float16 rounds to nearest even in
// both, a NaN first replaced by the NaN whose conversion is c10's (sign | 0x7E00), where F16C would keep the
// payload. Always inlined into functions compiled for AVX2 + F16C (the CPU passes' AVX2 variant, the optimizer
// steps' F16C loops), the sixteen-element ones into the CPU passes' AVX-512 variant; no out-of-line copy exists.
#pragma once

#if defined(__x86_64__)
#include <c10/util/Half.h>
#include <immintrin.h>

namespace regfast {
namespace f16c {

__attribute__((target("avx2,f16c"), always_inline)) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,f16c"), always_inline)) inline void store8(c10::Half* p, __m256 x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 quiet = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  const __m256 nan = _mm256_or_ps(_mm256_and_ps(x, sign), quiet);
  const __m256 y = _mm256_blendv_ps(x, nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c"), always_inline)) inline __m512 load16(
    const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c"), always_inline)) inline void store16(
    c10::Half* p, __m512 x) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 nan = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(x), sign), _mm512_set1_epi32(0x7FC00000)));
  const __m512 y = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
}

}  // namespace f16c
}  // namespace regfast
#endif
