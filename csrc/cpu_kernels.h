// The building blocks of the CPU kernels' passes (cpu_passes_impl.h): lane sums, per-tensor norms, group
// norms, and the runs of elements that share a per-group scale.
//
// Each tensor is split into fixed-size chunks of kChunk elements; the (tensor, chunk) work list
// is spread over threads with at::parallel_for (cpu_work_list.h). A reduction writes one partial per
// chunk and the partials are summed in list order afterwards, so results do not depend on the thread
// count. Inside a chunk, sums run over kLanes independent accumulators (one per lane, vectorized by
// the compiler) combined pairwise in a fixed order.
//
// This header is compiled once per instruction set (cpu_passes.h): each translation unit that includes it
// names its variant's namespace in REGFAST_CPU_ISA, REGFAST_CPU_AVX2 (1 or 0) says whether the variant holds
// lane vectors in 32-byte AVX2 registers and converts float16 with F16C, and REGFAST_CPU_AVX512 (1 or 0, with
// REGFAST_CPU_AVX2 1) whether it holds them in 64-byte AVX-512 registers instead. The lane order and the
// operations on each lane are the same in every variant, and so are the results.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_work_list.h"
#include "elementwise.h"
#include "groups.h"
#include "kernel_types.h"
#include "norm_parts.h"

#if !defined(REGFAST_CPU_ISA) || !defined(REGFAST_CPU_AVX2) || !defined(REGFAST_CPU_AVX512)
#error "cpu_kernels.h is compiled per instruction set: define REGFAST_CPU_ISA, REGFAST_CPU_AVX2, REGFAST_CPU_AVX512"
#endif
#if REGFAST_CPU_AVX512 && !REGFAST_CPU_AVX2
#error "the AVX-512 variant has AVX2 and F16C too: REGFAST_CPU_AVX2 1"
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if REGFAST_CPU_AVX2

#include "f16c.h"
#endif

namespace regfast {
namespace cpu {
namespace REGFAST_CPU_ISA {

// The bytes of one vector register that lane vectors are held in.
constexpr int kPieceBytes = REGFAST_CPU_AVX512 ? 64 : REGFAST_CPU_AVX2 ? 32 : 16;

constexpr int kLanes = 16;

// The kLanes values of v summed pairwise, in a fixed order.
template <typename A>
inline A pairwise_total(const A* v) {
  A s[kLanes];
  std::copy(v, v + kLanes, s);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  }
  return s[0];
}

// pairwise_total of lane sums of which only the first n (1 <= n <= kLanes) may be nonzero, the others +0: the same
// additions less those of a +0 (x + 0 is x for a lane sum, never −0), on scalars. Used for chunks shorter than a
// round (small tensors): their lanes, stored one by one, would stall a vector reload on store forwarding.
template <typename A>
inline A leading_total(A* s, int n) {
  int live = n;
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j + width < live; ++j) s[j] += s[j + width];
    live = std::min(live, width);
  }
  return s[0];
}

template <typename A>
struct LaneSum {
  A v[kLanes];

  LaneSum() { std::fill(v, v + kLanes, A(0)); }

  A total() const { return pairwise_total(v); }
};

// Calls body(i, lane) for i in [begin, end): whole rounds of kLanes first, so that the lane
// index is a compile-time pattern the vectorizer maps onto registers, then the tail.
template <typename Body>
inline void lane_loop(int64_t begin, int64_t end, Body&& body) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int j = 0; i < end; ++i, ++j) body(i, j);
}

// How far ahead of a loop's reads and writes their memory is prefetched, in bytes. The hardware prefetcher alone
// leaves a loop that moves few bytes per instruction (16-bit elements: 32 bytes a round) waiting on its loads, and
// a read-only loop needs more bytes in flight than 2 KiB: GPT-2 small, 1 thread, `norms` float32 16.5-23.2 ms at
// 2 KiB, 14.7-15.1 at 8 KiB, bfloat16 10.1-11.7 and 7.6-11.0 (the loops that also write: no change beyond noise).
constexpr int kPrefetchAhead = 8192;

// Prefetches the cache lines of one round of kLanes elements at p, kPrefetchAhead bytes on, into the L2 cache
// (prefetcht1), each line once: a round of 16-bit elements is half a line, so only the round that starts in a line's
// first half prefetches (whatever the alignment, one of a line's two rounds starts there). A prefetch never faults:
// past the end of an allocation it does nothing. Against prefetcht0 at every round, GPT-2 small, builds
// alternating, ms: `norms` bfloat16 one thread 28.0-30.7 -> 22.5-24.4, two threads 15.0-15.5 -> 11.5-13.2, float16
// one thread 27.6-29.1 -> 24.0-24.7; the loops that also write: no change beyond noise.
template <typename T>
__attribute__((always_inline)) inline void prefetch_round(const T* p) {
  const char* const ahead = reinterpret_cast<const char*>(p) + kPrefetchAhead;
  if constexpr (kLanes * sizeof(T) == 32) {
    if ((reinterpret_cast<uintptr_t>(p) & 32) == 0) __builtin_prefetch(ahead, 0, 2);
  } else {
    constexpr int kLines = static_cast<int>(kLanes * sizeof(T) + 63) / 64;
    for (int k = 0; k < kLines; ++k) __builtin_prefetch(ahead + 64 * k, 0, 2);
  }
}

// kLanes values of an element type E, held as vectors of the compiler (GCC/Clang vector extensions) of
// kPieceBytes each: lane j is element j % (kPieceBytes / sizeof(E)) of piece j / (kPieceBytes / sizeof(E)).
// The target keeps vectors of its register width in registers, where a wider vector of the compiler is
// lowered through memory (each accumulator stored and reloaded every round). The arithmetic and its
// rounding are those of kLanes scalar accumulators, lane j staying lane j; comparisons and selects work on
// the pieces (see sign_lanes).
template <typename E>
struct Lanes {
  typedef E Piece __attribute__((vector_size(kPieceBytes)));
  // A piece at any address (one unaligned vector load or store), which may alias E.
  typedef E Unaligned __attribute__((vector_size(kPieceBytes), aligned(alignof(E)), may_alias));
  static constexpr int kPieces = static_cast<int>(kLanes * sizeof(E) / kPieceBytes);
  static constexpr int kPerPiece = static_cast<int>(kPieceBytes / sizeof(E));
  Piece p[kPieces];

  // p[0..kLanes) as lanes, and back: one vector load or store per piece (a memcpy of the whole may be
  // lowered to narrower moves through the stack, whose wide reload then waits for the narrow stores).
  __attribute__((always_inline)) static Lanes load(const E* src) {
    Lanes v;
    for (int k = 0; k < kPieces; ++k) v.p[k] = *reinterpret_cast<const Unaligned*>(src + k * kPerPiece);
    return v;
  }
  __attribute__((always_inline)) void store(E* dst) const {
    for (int k = 0; k < kPieces; ++k) *reinterpret_cast<Unaligned*>(dst + k * kPerPiece) = p[k];
  }
};

// A scalar operand of lane operators: converted to E, not deduced from (an int literal stays E).
template <typename E>
struct NoDeduceT {
  using type = E;
};
template <typename E>
using NoDeduce = typename NoDeduceT<E>::type;

#define REGFAST_LANES_BINARY(op)                                                                              \
  template <typename E>                                                                                       \
  __attribute__((always_inline)) inline Lanes<E> operator op(Lanes<E> a, const Lanes<E>& b) {                 \
    for (int k = 0; k < Lanes<E>::kPieces; ++k) a.p[k] = a.p[k] op b.p[k];                                    \
    return a;                                                                                                 \
  }                                                                                                           \
  template <typename E>                                                                                       \
  __attribute__((always_inline)) inline Lanes<E> operator op(Lanes<E> a, NoDeduce<E> b) {                     \
    for (int k = 0; k < Lanes<E>::kPieces; ++k) a.p[k] = a.p[k] op b;                                         \
    return a;                                                                                                 \
  }                                                                                                           \
  template <typename E>                                                                                       \
  __attribute__((always_inline)) inline Lanes<E> operator op(NoDeduce<E> a, Lanes<E> b) {                     \
    for (int k = 0; k < Lanes<E>::kPieces; ++k) b.p[k] = a op b.p[k];                                         \
    return b;                                                                                                 \
  }                                                                                                           \
  template <typename E>                                                                                       \
  __attribute__((always_inline)) inline Lanes<E>& operator op##=(Lanes<E>& a, const Lanes<E>& b) {            \
    for (int k = 0; k < Lanes<E>::kPieces; ++k) a.p[k] = a.p[k] op b.p[k];                                    \
    return a;                                                                                                 \
  }
REGFAST_LANES_BINARY(+)
REGFAST_LANES_BINARY(-)
REGFAST_LANES_BINARY(*)
REGFAST_LANES_BINARY(&)
REGFAST_LANES_BINARY(|)
REGFAST_LANES_BINARY(<<)
REGFAST_LANES_BINARY(>>)
#undef REGFAST_LANES_BINARY

template <typename E>
__attribute__((always_inline)) inline Lanes<E> operator~(Lanes<E> a) {
  for (int k = 0; k < Lanes<E>::kPieces; ++k) a.p[k] = ~a.p[k];
  return a;
}

template <typename E>
__attribute__((always_inline)) inline Lanes<E> operator-(Lanes<E> a) {
  for (int k = 0; k < Lanes<E>::kPieces; ++k) a.p[k] = -a.p[k];
  return a;
}

template <typename A>
using Vec = Lanes<A>;

// The unsigned integer lanes of A's bits.
template <typename A>
using Mask = Lanes<std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>>;

template <typename A>
__attribute__((always_inline)) inline Vec<A> splat(A x) {
  return Vec<A>{} + x;
}

// The bits of a lane vector (or piece) and back.
template <typename To, typename From>
__attribute__((always_inline)) inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &x, sizeof(x));
  return out;
}

// 16-bit floats to float and back on lanes, with the operations of c10's scalar conversions (so the same
// bits, NaN included), in integer and float lane arithmetic. Comparisons are int32 comparisons on the
// pieces; every compared value is below 2^31.
using Bits16 = Lanes<uint16_t>;
using Bits32 = Lanes<uint32_t>;

// Lanes of all ones where `pred` holds for the lanes of x, compared as int32.
template <typename Pred>
__attribute__((always_inline)) inline Bits32 lanes_where(Bits32 x, Pred pred) {
  typedef int32_t Signed __attribute__((vector_size(kPieceBytes)));
  for (int k = 0; k < Bits32::kPieces; ++k) x.p[k] = bits_as<Bits32::Piece>(pred(bits_as<Signed>(x.p[k])));
  return x;
}

// Whether V is a lane vector (its pieces in .p) rather than one piece.
template <typename V, typename = void>
struct HasPieces : std::false_type {};
template <typename V>
struct HasPieces<V, std::void_t<decltype(std::declval<const V&>().p)>> : std::true_type {};

// yes where `mask` is all ones, no where it is zero (a lane vector or a piece, and its mask), piece by piece:
// one byte blend with AVX2; and, and-not, or otherwise (one vpternlog with AVX-512).
template <typename M, typename V>
__attribute__((always_inline)) inline V select_bits(const M& mask, const V& yes, const V& no) {
  if constexpr (HasPieces<V>::value) {
    V out;
    for (int k = 0; k < static_cast<int>(sizeof(yes.p) / sizeof(yes.p[0])); ++k) {
      out.p[k] = select_bits(mask.p[k], yes.p[k], no.p[k]);
    }
    return out;
  } else {
#if REGFAST_CPU_AVX2 && !REGFAST_CPU_AVX512
    static_assert(sizeof(V) == 32 && sizeof(M) == 32, "one AVX2 register");
    return bits_as<V>(_mm256_blendv_epi8(bits_as<__m256i>(no), bits_as<__m256i>(yes), bits_as<__m256i>(mask)));
#else
    return bits_as<V>((mask & bits_as<M>(yes)) | (~mask & bits_as<M>(no)));
#endif
  }
}

// float to c10::BFloat16 (c10::detail::round_to_nearest_even) as 32-bit lanes whose high half is the result:
// NaN becomes 0x7FC0, the rest rounds to nearest even.
__attribute__((always_inline)) inline Bits32 bfloat16_in_high_halves(const Vec<float>& v) {
  const Bits32 u = bits_as<Bits32>(v);
  Bits32 nan;  // all ones where v is NaN: one packed float compare per piece
  for (int k = 0; k < Bits32::kPieces; ++k) nan.p[k] = bits_as<Bits32::Piece>(v.p[k] != v.p[k]);
  const Bits32 rounded = u + (((u >> 16u) & 1u) + 0x7FFFu);
  return select_bits(nan, Bits32{} + 0x7FC00000u, rounded);
}

#if REGFAST_CPU_AVX512
// Each 16-bit element as the high half of a 32-bit lane (vpmovzxwd, then a shift): 16 lanes, one register.
__attribute__((always_inline)) inline Bits32 to_high_halves(const void* p) {
  static_assert(Bits32::kPieces == 1, "16 lanes of 32 bits are one AVX-512 register");
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  Bits32 out;
  out.p[0] = bits_as<Bits32::Piece>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return out;
}

// The high 16 bits of each 32-bit lane, stored in lane order: a shift, then vpmovdw's narrowing.
__attribute__((always_inline)) inline void store_high_halves(void* p, const Bits32& w) {
  const __m512i high = _mm512_srli_epi32(bits_as<__m512i>(w.p[0]), 16);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(high));
}

// c10::Half to float and back with the 16-lane F16C conversions of AVX-512F, c10's bits (f16c.h).
__attribute__((always_inline)) inline Vec<float> lanes_from_half(const c10::Half* p) {
  Vec<float> v;
  v.p[0] = bits_as<Vec<float>::Piece>(f16c::load16(p));
  return v;
}

__attribute__((always_inline)) inline void lanes_to_half(c10::Half* p, const Vec<float>& v) {
  f16c::store16(p, bits_as<__m512>(v.p[0]));
}
#elif REGFAST_CPU_AVX2
// Each 16-bit element as the high half of a 32-bit lane (vpmovzxwd, then a shift), 8 lanes per piece.
__attribute__((always_inline)) inline Bits32 to_high_halves(const void* p) {
  static_assert(Bits32::kPieces == 2, "16 lanes of 32 bits are two AVX2 registers");
  const auto* q = static_cast<const __m128i*>(p);
  Bits32 out;
  for (int k = 0; k < 2; ++k) {
    out.p[k] = bits_as<Bits32::Piece>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + k)), 16));
  }
  return out;
}

// The high 16 bits of each 32-bit lane, stored in lane order: vpackusdw packs within 128-bit halves, the
// permute puts the four 64-bit quarters back in order (no value exceeds 0xFFFF, so nothing saturates).
__attribute__((always_inline)) inline void store_high_halves(void* p, const Bits32& w) {
  const __m256i a = _mm256_srli_epi32(bits_as<__m256i>(w.p[0]), 16);
  const __m256i b = _mm256_srli_epi32(bits_as<__m256i>(w.p[1]), 16);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
}

// c10::Half to float and back with F16C, c10's bits (f16c.h), one piece at a time.
__attribute__((always_inline)) inline Vec<float> lanes_from_half(const c10::Half* p) {
  Vec<float> v;
  for (int k = 0; k < Vec<float>::kPieces; ++k) v.p[k] = bits_as<Vec<float>::Piece>(f16c::load8(p + 8 * k));
  return v;
}

__attribute__((always_inline)) inline void lanes_to_half(c10::Half* p, const Vec<float>& v) {
  for (int k = 0; k < Vec<float>::kPieces; ++k) f16c::store8(p + 8 * k, bits_as<__m256>(v.p[k]));
}
#else
#if defined(__clang__)
#define REGFAST_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define REGFAST_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, Bits16::Piece{__VA_ARGS__})
#endif

// Each 16-bit element as the high half of a 32-bit lane, the low half zero (x86 is little-endian).
__attribute__((always_inline)) inline Bits32 to_high_halves(const void* p) {
  Bits16 h;
  std::memcpy(&h, p, sizeof(h));
  const Bits16::Piece zero{};
  Bits32 out;
  for (int k = 0; k < Bits16::kPieces; ++k) {
    out.p[2 * k] = bits_as<Bits32::Piece>(REGFAST_SHUFFLE(zero, h.p[k], 0, 8, 1, 9, 2, 10, 3, 11));
    out.p[2 * k + 1] = bits_as<Bits32::Piece>(REGFAST_SHUFFLE(zero, h.p[k], 4, 12, 5, 13, 6, 14, 7, 15));
  }
  return out;
}

// The high (or low) 16 bits of each 32-bit lane.
template <bool kHigh>
__attribute__((always_inline)) inline Bits16 halves(const Bits32& w) {
  Bits16 out;
  for (int k = 0; k < Bits16::kPieces; ++k) {
    const auto a = bits_as<Bits16::Piece>(w.p[2 * k]), b = bits_as<Bits16::Piece>(w.p[2 * k + 1]);
    if constexpr (kHigh) {
      out.p[k] = REGFAST_SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
    } else {
      out.p[k] = REGFAST_SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
    }
  }
  return out;
}
#undef REGFAST_SHUFFLE

__attribute__((always_inline)) inline void store_high_halves(void* p, const Bits32& w) {
  const Bits16 h = halves<true>(w);
  std::memcpy(p, &h, sizeof(h));
}

// c10::Half to float (c10::detail::fp16_ieee_to_fp32_value, the build's conversion without F16C).
__attribute__((always_inline)) inline Vec<float> lanes_from_half(const c10::Half* p) {
  const Bits32 w = to_high_halves(p);
  const Bits32 sign = w & 0x80000000u;
  const Bits32 two_w = w + w;
  const Vec<float> exp_scale = bits_as<Vec<float>>(Bits32{} + (15u << 23));
  const Vec<float> normalized = bits_as<Vec<float>>((two_w >> 4u) + (0xE0u << 23)) * exp_scale;
  const Vec<float> denormalized = bits_as<Vec<float>>((two_w >> 17u) | (126u << 23)) - 0.5f;
  const Bits32 small = lanes_where(two_w >> 27u, [](auto x) { return x == 0; });  // two_w < 2^27
  return bits_as<Vec<float>>(sign | bits_as<Bits32>(select_bits(small, denormalized, normalized)));
}

// float to c10::Half (c10::detail::fp16_ieee_from_fp32_value, the build's conversion without F16C).
__attribute__((always_inline)) inline void lanes_to_half(c10::Half* p, const Vec<float>& v) {
  const Vec<float> scale_to_inf = bits_as<Vec<float>>(Bits32{} + (239u << 23));
  const Vec<float> scale_to_zero = bits_as<Vec<float>>(Bits32{} + (17u << 23));
  const Bits32 w = bits_as<Bits32>(v);
  Vec<float> base = (bits_as<Vec<float>>(w & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
  const Bits32 shl1_w = w + w;
  const Bits32 sign = w & 0x80000000u;
  const Bits32 exponent = shl1_w & 0xFF000000u;
  const Bits32 low = lanes_where(exponent >> 24u, [](auto x) { return x < 0x71; });  // bias < 0x71000000
  const Bits32 bias = select_bits(low, Bits32{} + 0x71000000u, exponent);
  base = bits_as<Vec<float>>((bias >> 1u) + 0x07800000u) + base;
  const Bits32 bits = bits_as<Bits32>(base);
  const Bits32 nonsign = ((bits >> 13u) & 0x00007C00u) + (bits & 0x00000FFFu);
  const Bits32 nan = lanes_where(w & 0x7FFFFFFFu, [](auto x) { return x > 0x7F800000; });  // shl1_w > 0xFF000000
  const Bits16 h = halves<false>((sign >> 16u) | select_bits(nan, Bits32{} + 0x7E00u, nonsign));
  std::memcpy(p, &h, sizeof(h));
}
#endif

// c10::BFloat16 to float: the 16 bits are the float's high half.
__attribute__((always_inline)) inline Vec<float> lanes_from_bfloat16(const c10::BFloat16* p) {
  return bits_as<Vec<float>>(to_high_halves(p));
}

__attribute__((always_inline)) inline void lanes_to_bfloat16(c10::BFloat16* p, const Vec<float>& v) {
  store_high_halves(p, bfloat16_in_high_halves(v));
}

// Elements p[0..kLanes) converted to A, as lanes.
template <typename A, typename T>
__attribute__((always_inline)) inline Vec<A> load_lanes(const T* p) {
  Vec<A> v;
  if constexpr (std::is_same_v<A, T>) {
    v = Vec<A>::load(p);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::BFloat16>) {
    v = lanes_from_bfloat16(p);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::Half>) {
    v = lanes_from_half(p);
  } else {
    A a[kLanes];
    for (int j = 0; j < kLanes; ++j) a[j] = static_cast<A>(p[j]);
    std::memcpy(&v, a, sizeof(v));
  }
  return v;
}

template <typename A, typename T>
__attribute__((always_inline)) inline void store_lanes(T* p, const Vec<A>& v) {
  if constexpr (std::is_same_v<A, T>) {
    v.store(p);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::BFloat16>) {
    lanes_to_bfloat16(p, v);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::Half>) {
    lanes_to_half(p, v);
  } else {
    A a[kLanes];
    std::memcpy(a, &v, sizeof(v));
    for (int j = 0; j < kLanes; ++j) p[j] = static_cast<T>(a[j]);
  }
}

// |x| as std::abs: the sign bit cleared (NaN stays NaN).
template <typename A>
__attribute__((always_inline)) inline Vec<A> abs_lanes(const Vec<A>& x) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  return bits_as<Vec<A>>(bits_as<Mask<A>>(x) & (~U(0) >> 1));
}

// sign_of (elementwise.h) on lanes: 1, −1, 0, NaN kept, with the same operations, on the pieces with the
// comparisons' masks (all ones or zero per lane) and bitwise selects: a vector ?: is not lowered to vector
// code on every target.
template <typename A>
__attribute__((always_inline)) inline Vec<A> sign_lanes(Vec<A> w) {
  using Piece = typename Vec<A>::Piece;
  for (int k = 0; k < Vec<A>::kPieces; ++k) {
    const Piece x = w.p[k], zero{};
    const auto pos = x > zero, neg = x < zero, nan = x != x;  // masks: all ones where true
    using M = std::remove_const_t<decltype(pos)>;
    const M one = bits_as<M>(Piece{} + A(1));
    const Piece sign = bits_as<Piece>(pos & one) - bits_as<Piece>(neg & one);
    w.p[k] = select_bits(nan, x, sign);
  }
  return w;
}

// l1·sign(x) on lanes for a finite l1 ≥ 0 from x's bits: x's sign on l1 where x ≠ 0, +0 where x = ±0; exactly
// l1 * sign_lanes(x) wherever x is not NaN (l1·(±1) is ±l1, l1·0 is +0). A NaN x gives ±l1: the caller adds a term
// which is NaN wherever x is (the gradient's linear term scale·x, so that the sum is that NaN, as l1·x + scale·x
// is) or selects x there (grad_run without a linear term). Three bit operations and a compare a piece, for
// sign_lanes' seven and a multiplication.
template <typename A>
__attribute__((always_inline)) inline Vec<A> l1_sign_bits_lanes(Vec<A> x, A l1) {
  using Piece = typename Vec<A>::Piece;
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  const Piece zero{}, magnitude = zero + l1;
  for (int k = 0; k < Vec<A>::kPieces; ++k) {
    const Piece v = x.p[k];
    const auto nonzero = v != zero;  // a mask: all ones where v is not ±0 (a NaN included)
    using M = std::remove_const_t<decltype(nonzero)>;
    const M sign = bits_as<M>(v) & ~(~U(0) >> 1);
    x.p[k] = bits_as<Piece>((sign | bits_as<M>(magnitude)) & nonzero);
  }
  return x;
}

#if defined(__SSE2__)
// x86's packed max or min of two pieces: max(a, b) = a > b ? a : b, min(a, b) = a < b ? a : b (b where either is
// NaN, and where they are equal).
template <bool kMax, typename P>
__attribute__((always_inline)) inline P max_or_min(P a, P b) {
#if REGFAST_CPU_AVX512
  if constexpr (sizeof(P) == 64 && sizeof(a[0]) == 4) {
    const __m512 x = bits_as<__m512>(a), y = bits_as<__m512>(b);
    return bits_as<P>(kMax ? _mm512_max_ps(x, y) : _mm512_min_ps(x, y));
  } else if constexpr (sizeof(P) == 64) {
    const __m512d x = bits_as<__m512d>(a), y = bits_as<__m512d>(b);
    return bits_as<P>(kMax ? _mm512_max_pd(x, y) : _mm512_min_pd(x, y));
  } else
#endif
  if constexpr (sizeof(P) == 32 && sizeof(a[0]) == 4) {
    const __m256 x = bits_as<__m256>(a), y = bits_as<__m256>(b);
    return bits_as<P>(kMax ? _mm256_max_ps(x, y) : _mm256_min_ps(x, y));
  } else if constexpr (sizeof(P) == 32) {
    const __m256d x = bits_as<__m256d>(a), y = bits_as<__m256d>(b);
    return bits_as<P>(kMax ? _mm256_max_pd(x, y) : _mm256_min_pd(x, y));
  } else if constexpr (sizeof(a[0]) == 4) {
    const __m128 x = bits_as<__m128>(a), y = bits_as<__m128>(b);
    return bits_as<P>(kMax ? _mm_max_ps(x, y) : _mm_min_ps(x, y));
  } else {
    const __m128d x = bits_as<__m128d>(a), y = bits_as<__m128d>(b);
    return bits_as<P>(kMax ? _mm_max_pd(x, y) : _mm_min_pd(x, y));
  }
}
#endif

// soft_threshold (elementwise.h) on lanes, with the same selects (on the pieces, as sign_lanes).
template <typename A>
__attribute__((always_inline)) inline Vec<A> soft_threshold_lanes(Vec<A> x, A t) {
  using Piece = typename Vec<A>::Piece;
  const Piece hi = Piece{} + t, lo = -hi;
  for (int k = 0; k < Vec<A>::kPieces; ++k) {
    const Piece v = x.p[k];
    const Piece lower = select_bits(v < lo, lo, v);  // comparisons give masks: all ones where true
    const Piece clamped = select_bits(lower <= hi, lower, hi);
    x.p[k] = v - clamped;
  }
  return x;
}

// soft_threshold_lanes for a threshold t that is not NaN, in x86's max and min (max(a, b) is a > b ? a : b, min(a, b)
// is a < b ? a : b): lower = max(−t, x) is soft_threshold's first select; min(t, lower) its second wherever lower is
// not NaN, and where it is (x NaN) x − min(t, lower) is x's NaN as x − t is. Two instructions a piece for four.
template <typename A>
__attribute__((always_inline)) inline Vec<A> soft_threshold_number_lanes(Vec<A> x, A t) {
#if defined(__SSE2__)
  using Piece = typename Vec<A>::Piece;
  const Piece hi = Piece{} + t, lo = -hi;
  for (int k = 0; k < Vec<A>::kPieces; ++k) x.p[k] = x.p[k] - max_or_min<false>(hi, max_or_min<true>(lo, x.p[k]));
  return x;
#else
  return soft_threshold_lanes<A>(x, t);
#endif
}

// Per-element scale of a run of elements, one value for the run or one per element: element i is
// multiplied by q(i)·(· p(i)), p a power of two that keeps both factors in range (see split_coefficient).
// kUnitPre: p is 1 (no per-group scale), so x·p is x and no multiplication is spent on it.
template <typename A>
struct ConstScale {
  static constexpr bool kUnitPre = false;
  A value, pre;
  A operator()(int64_t) const { return value; }
  A p(int64_t) const { return pre; }
  Vec<A> lanes(int64_t) const { return splat(value); }
  Vec<A> p_lanes(int64_t) const { return splat(pre); }
};

template <typename A>
struct UnitScale {
  static constexpr bool kUnitPre = true;
  A value;
  A operator()(int64_t) const { return value; }
  A p(int64_t) const { return A(1); }
  Vec<A> lanes(int64_t) const { return splat(value); }
  Vec<A> p_lanes(int64_t) const { return splat(A(1)); }
};

template <typename A>
struct RowScale {
  static constexpr bool kUnitPre = false;
  const A* values;  // values[i - offset] is the scale of element i
  const A* pres;    // pres[i - offset] its power-of-two pre-scale
  int64_t offset;
  A operator()(int64_t i) const { return values[i - offset]; }
  A p(int64_t i) const { return pres[i - offset]; }
  Vec<A> lanes(int64_t i) const { return load_lanes<A>(values + (i - offset)); }
  Vec<A> p_lanes(int64_t i) const { return load_lanes<A>(pres + (i - offset)); }
};

// The lane sums of a run of elements live in local arrays and `w` is restrict-qualified, so that
// the compiler knows the loads cannot alias the sums and vectorizes the loop (as in grad_run).
// Whole rounds of kLanes elements run on lane vectors, the tail element by element from lane 0 (as lane_loop).
template <typename T, typename A>
inline void norms_run(const T* __restrict__ w, int64_t begin, int64_t end, LaneSum<A>& abs_sum, LaneSum<A>& sq_sum) {
  Vec<A> v1 = load_lanes<A>(abs_sum.v), v2 = load_lanes<A>(sq_sum.v);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    prefetch_round(w + i);
    const Vec<A> x = load_lanes<A>(w + i);
    v1 += abs_lanes<A>(x);
    v2 += x * x;
  }
  store_lanes<A>(abs_sum.v, v1);
  store_lanes<A>(sq_sum.v, v2);
  for (int j = 0; i < end; ++i, ++j) {
    const A x = static_cast<A>(w[i]);
    abs_sum.v[j] += std::abs(x);
    sq_sum.v[j] += x * x;
  }
}

// Σ|w| and Σw² of a run of n < kLanes elements (a chunk shorter than a round) as norms_run and LaneSum::total
// give them: element j is lane j's only term.
template <typename T, typename A>
inline void short_norms(const T* w, int n, A& l1, A& l2sq) {
  A s1[kLanes], s2[kLanes];
  for (int j = 0; j < n; ++j) {
    const A x = static_cast<A>(w[j]);
    s1[j] = std::abs(x);
    s2[j] = x * x;
  }
  l1 = leading_total(s1, n);
  l2sq = leading_total(s2, n);
}

// Parts of a group's square sum (see norm_parts.h): three for double, one otherwise.
template <typename A>
constexpr int kParts = std::is_same_v<A, double> ? 3 : 1;

// The square sums below take a round of elements through lane vectors first (16-bit ones converted there) for
// every element type but double: GPT-2 small at half scale, 1 thread, add_penalty_grad_ with row groups, float32
// 37.5 ms staged against 47.5 read element by element, float64 134 against 80.
template <typename T>
constexpr bool kStagedSquares = sizeof(T) < 8;

// sumsq_run over a run of 1 <= n < kLanes elements (a small tensor's group): element j is lane j's only term, the
// lanes' total as leading_total takes it (the same additions less those of a +0). Its own function, called where a
// group is that short: as a branch inside sumsq_run it cost the 16-bit loop its code (bfloat16 GPT-2 small by rows,
// add_penalty_grad_ with group lasso, one thread: 67 → 140 ms). 2,000 one-element tensors, builds alternating, 2
// rounds, µs per call: add_penalty_grad_ 241-256 → 197-216, prox_ 161-164 → 121-131.
template <typename A, typename T, typename F>
bool short_sumsq(const T* __restrict__ w, int64_t begin, int64_t end, F f, double* out) {
  const int n = static_cast<int>(end - begin);
  double s[kLanes];
  bool flag = false;
  for (int j = 0; j < n; ++j) {
    const double u = static_cast<double>(f(static_cast<A>(w[begin + j])));
    s[j] = u * u;
    if constexpr (kParts<A> > 1) flag = flag || out_of_range(u);
  }
  *out = leading_total(s, n);
  return flag;
}

// Σ f(w)² over a run in lane order (see norms_run), unscaled, into *out; for double also whether an
// element is out of range (then the run is summed again by parts, see square_parts_run).
template <typename A, typename T, typename F>
inline bool sumsq_run(const T* __restrict__ w, int64_t begin, int64_t end, F f, double* out) {
  double s[kLanes] = {}, flags[kLanes] = {};
  auto add = [&](A x, int j) {
    const double u = static_cast<double>(f(x));
    s[j] += u * u;
    if constexpr (kParts<A> > 1) flags[j] += out_of_range(u) ? 1.0 : 0.0;
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    prefetch_round(w + i);
    if constexpr (kStagedSquares<T>) {
      A x[kLanes];
      store_lanes<A>(x, load_lanes<A>(w + i));
      for (int j = 0; j < kLanes; ++j) add(x[j], j);
    } else {
      for (int j = 0; j < kLanes; ++j) add(static_cast<A>(w[i + j]), j);
    }
  }
  for (int j = 0; i < end; ++i, ++j) add(static_cast<A>(w[i]), j);
  *out = pairwise_total(s);
  return kParts<A> > 1 && pairwise_total(flags) != 0;
}

// Σ f(w)² over a run by parts (see kParts), into out[0], out[stride], out[2·stride].
template <typename A, typename T, typename F>
inline void square_parts_run(const T* __restrict__ w, int64_t begin, int64_t end, F f, double* out, int64_t stride) {
  constexpr int kP = kParts<A>;
  double parts[kP][kLanes] = {};
  lane_loop(begin, end, [&](int64_t i, int j) {
    add_square<kP>(&parts[0][j], kLanes, static_cast<double>(f(static_cast<A>(w[i]))));
  });
  for (int p = 0; p < kP; ++p) out[p * stride] = pairwise_total(parts[p]);
}

// The identity as group_norms' f, on elements and on lanes.
struct Identity {
  template <typename X>
  X operator()(X x) const {
    return x;
  }
};

// The elastic step as group_norms' f, on elements and on lanes (the same results, see soft_threshold_number_lanes).
template <typename A>
struct ElasticLanes {
  ElasticStep<A> step;
  A operator()(A x) const { return step(x); }
  Vec<A> operator()(Vec<A> x) const {
    if (step.has_l1) {
      const A t = step.threshold;
      x = t == t ? soft_threshold_number_lanes<A>(x, t) : soft_threshold_lanes<A>(x, t);
    }
    if (step.has_l2) x = x * step.shrink;
    return x;
  }
};

// o += x_j² in double, lane by lane: each float lane widened (exactly), squared and added, the operations of the
// element loop (u = double(x); out += u·u), on vectors.
__attribute__((always_inline)) inline void add_squares(Lanes<double>& o, const Vec<float>& x) {
  using D = Lanes<double>;
  static_assert(D::kPieces == 2 * Vec<float>::kPieces, "two double pieces per float piece");
  for (int k = 0; k < Vec<float>::kPieces; ++k) {
    D::Piece u[2];
#if REGFAST_CPU_AVX512
    const __m512 v = bits_as<__m512>(x.p[k]);
    u[0] = bits_as<D::Piece>(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    u[1] = bits_as<D::Piece>(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif REGFAST_CPU_AVX2
    const __m256 v = bits_as<__m256>(x.p[k]);
    u[0] = bits_as<D::Piece>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    u[1] = bits_as<D::Piece>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
    typedef float Half __attribute__((vector_size(kPieceBytes / 2)));
    Half h[2];
    std::memcpy(h, &x.p[k], sizeof(h));
    for (int i = 0; i < 2; ++i) u[i] = __builtin_convertvector(h[i], D::Piece);
#endif
    o.p[2 * k] = o.p[2 * k] + u[0] * u[0];
    o.p[2 * k + 1] = o.p[2 * k + 1] + u[1] * u[1];
  }
}

// Whether column_squares runs on vectors: elements accumulated in float whose f takes lanes.
template <typename A, typename F>
constexpr bool kColumnLanes = std::is_same_v<A, float> && std::is_invocable_v<F, Vec<float>>;

// out[m] += f(w[r, m])² for rows r = 0..kRows-1 of a run of rows, in row order, a round of columns at a time:
// each column's sum stays in a register across the rows (the same additions, in the same order, as row by row).
template <int kRows, typename A, typename T, typename F>
__attribute__((always_inline)) inline void column_square_rows(const T* __restrict__ w, double* __restrict__ out,
                                                             int64_t m_len, F f) {
  int64_t m = 0;
  for (; m + kLanes <= m_len; m += kLanes) {
    Lanes<double> o = Lanes<double>::load(out + m);
    for (int r = 0; r < kRows; ++r) {
      prefetch_round(w + r * m_len + m);
      add_squares(o, f(load_lanes<A>(w + r * m_len + m)));
    }
    o.store(out + m);
  }
  for (; m < m_len; ++m) {
    double acc = out[m];
    for (int r = 0; r < kRows; ++r) {
      const double u = static_cast<double>(f(static_cast<A>(w[r * m_len + m])));
      acc += u * u;
    }
    out[m] = acc;
  }
}

// out[m] += f(w[r, m])² for the rows r of a run of `rows` rows of m_len columns, unscaled, row after row; for double
// also whether an element is out of range (a count in lanes, as in sumsq_run, so that the loop vectorizes). Its own
// function so that the restrict parameters reach the vectorizer. With kColumnLanes, four rows at a time on vectors
// (column_square_rows): the compiler leaves the element loop below scalar, the columns' sums being in memory.
template <typename A, typename T, typename F>
__attribute__((noinline)) bool column_squares(const T* __restrict__ w, int64_t rows, double* __restrict__ out,
                                              int64_t m_len, F f) {
  if constexpr (kColumnLanes<A, F>) {
    int64_t r = 0;
    // Rows of a page or more: four streams. Shorter rows share pages, whose hardware prefetch then sees four
    // interleaved streams and falls behind (measured slower than row by row).
    if (m_len * static_cast<int64_t>(sizeof(T)) >= 4096) {
      for (; r + 4 <= rows; r += 4) column_square_rows<4, A>(w + r * m_len, out, m_len, f);
    }
    for (; r < rows; ++r) column_square_rows<1, A>(w + r * m_len, out, m_len, f);
    return false;
  } else {
    double flags[kLanes] = {};
    auto add = [&](A x, int64_t m, int j) {
      const double u = static_cast<double>(f(x));
      out[m] += u * u;
      if constexpr (kParts<A> > 1) flags[j] += out_of_range(u) ? 1.0 : 0.0;
    };
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = w + r * m_len;
      int64_t m = 0;
      for (; m + kLanes <= m_len; m += kLanes) {
        prefetch_round(row + m);
        if constexpr (kStagedSquares<T>) {
          A x[kLanes];
          store_lanes<A>(x, load_lanes<A>(row + m));
          for (int j = 0; j < kLanes; ++j) add(x[j], m + j, j);
        } else {
          for (int j = 0; j < kLanes; ++j) add(static_cast<A>(row[m + j]), m + j, j);
        }
      }
      for (int j = 0; m < m_len; ++m, ++j) add(static_cast<A>(row[m]), m, j);
    }
    return kParts<A> > 1 && pairwise_total(flags) != 0;
  }
}

// Per-tensor Σ|w| and Σw², from per-chunk partials summed in order.
template <typename T>
void tensor_norms(const void* const* data, const std::vector<int64_t>& numels, std::vector<acc_t<T>>& l1,
                  std::vector<acc_t<T>>& l2sq) {
  using A = acc_t<T>;
  const WorkList wl = make_work_list(numels);
  std::vector<A> p1(wl.chunks.size()), p2(wl.chunks.size());
  for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
    prefetch_chunk<T, 0>(wl, c, data);
    const T* w = static_cast<const T*>(data[ch.tensor]);
    if (ch.end - ch.begin < kLanes) {
      short_norms(w + ch.begin, static_cast<int>(ch.end - ch.begin), p1[c], p2[c]);
      return;
    }
    LaneSum<A> s1, s2;
    norms_run(w, ch.begin, ch.end, s1, s2);
    p1[c] = s1.total();
    p2[c] = s2.total();
  });
  l1.assign(numels.size(), A(0));
  l2sq.assign(numels.size(), A(0));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t c = wl.first[t]; c < wl.first[t + 1]; ++c) {
      l1[t] += p1[c];
      l2sq[t] += p2[c];
    }
  }
}

template <typename T>
void tensor_norms(const std::vector<at::Tensor>& ts, std::vector<acc_t<T>>& l1, std::vector<acc_t<T>>& l2sq) {
  tensor_norms<T>(const_data_of(ts).data(), numels_of(ts), l1, l2sq);
}

// ‖f(w_g)‖₂ of every group of every tensor, concatenated, in double: tensor t's groups start at offsets[t].
// No overflow or underflow for any finite input (see kParts).
//
// Stage 1 writes partials for fixed pieces of each tensor; stage 2 sums them in a fixed order:
//   outer == 1, inner <= kChunk: pieces are runs of whole groups, one partial per group;
//   outer == 1, inner > kChunk: each group is split into kChunk pieces, one partial per piece;
//   outer > 1: pieces are runs of whole rows [o, :, :] of about kRowPiece elements, one partial per (piece,
//   column): a partial per kChunk elements would write (and read back) a double per column every few rows.
constexpr int64_t kRowPiece = int64_t(1) << 18;

template <typename T, typename F>
std::vector<double> group_norms(const void* const* data, const std::vector<int64_t>& numels,
                                const std::vector<GroupShape>& shapes, F f, std::vector<int64_t>& offsets) {
  using A = acc_t<T>;
  constexpr int kP = kParts<A>;
  struct Piece {
    int64_t tensor, begin, end, slot;  // begin/end: groups, flat elements or rows, by the tensor's kind
  };
  enum Kind { kWholeGroups, kSplitGroups, kRows };
  const size_t nt = numels.size();
  if (std::all_of(numels.begin(), numels.end(), [](int64_t n) { return n == 0; })) {
    offsets.assign(nt + 1, 0);
    return {};
  }
  std::vector<Kind> kinds(nt);
  std::vector<int64_t> slot_base(nt), splits(nt, 1);
  std::vector<Piece> pieces;
  int64_t slots = 0, groups = 0;
  offsets.assign(nt + 1, 0);
  for (size_t t = 0; t < nt; ++t) {
    offsets[t] = groups;
    slot_base[t] = slots;
    if (numels[t] == 0) continue;
    const GroupShape& s = shapes[t];
    groups += s.ngroups;
    const auto ti = static_cast<int64_t>(t);
    if (s.outer == 1 && s.inner <= kChunk) {
      kinds[t] = kWholeGroups;
      const int64_t per_piece = std::max<int64_t>(1, kChunk / s.inner);
      for (int64_t g = 0; g < s.ngroups; g += per_piece) pieces.push_back({ti, g, std::min(s.ngroups, g + per_piece), slots + g});
      slots += s.ngroups;
    } else if (s.outer == 1) {
      kinds[t] = kSplitGroups;
      splits[t] = (s.inner + kChunk - 1) / kChunk;
      for (int64_t g = 0; g < s.ngroups; ++g) {
        for (int64_t p = 0; p < splits[t]; ++p) {
          const int64_t b = g * s.inner + p * kChunk;
          pieces.push_back({ti, b, std::min(b + kChunk, (g + 1) * s.inner), slots + g * splits[t] + p});
        }
      }
      slots += s.ngroups * splits[t];
    } else {
      kinds[t] = kRows;
      const int64_t rows = std::max<int64_t>(1, kRowPiece / s.row_length());
      splits[t] = (s.outer + rows - 1) / rows;
      for (int64_t p = 0; p < splits[t]; ++p) {
        pieces.push_back({ti, p * rows, std::min(s.outer, (p + 1) * rows), slots + p * s.row_length()});
      }
      slots += splits[t] * s.row_length();
    }
  }
  offsets[nt] = groups;

  // Part-major: part p of slot i at partial[p·slots + i]. Stage 1a sums every piece unscaled into the
  // middle part and flags the pieces with an out-of-range element (double only); stage 1b sums those
  // pieces again by parts. The small and big parts exist only if a piece was flagged.
  std::vector<double> partial(slots, 0.0);
  std::vector<char> flagged(pieces.size(), 0);
  auto run_piece = [&](int64_t q, bool by_parts) {
    const Piece& pc = pieces[q];
    const T* w = static_cast<const T*>(data[pc.tensor]);
    const GroupShape& s = shapes[pc.tensor];
    double* base = partial.data();  // stage 1a: the middle part only; stage 1b: all parts
    bool flag = false;
    switch (kinds[pc.tensor]) {
      case kWholeGroups:
        for (int64_t g = pc.begin; g < pc.end; ++g) {
          double* out = base + pc.slot + g - pc.begin;
          if (by_parts) square_parts_run<A>(w, g * s.inner, (g + 1) * s.inner, f, out, slots);
          else if (s.inner < kLanes) flag |= short_sumsq<A>(w, g * s.inner, (g + 1) * s.inner, f, out);
          else flag |= sumsq_run<A>(w, g * s.inner, (g + 1) * s.inner, f, out);
        }
        break;
      case kSplitGroups:
        if (by_parts) square_parts_run<A>(w, pc.begin, pc.end, f, base + pc.slot, slots);
        else flag = sumsq_run<A>(w, pc.begin, pc.end, f, base + pc.slot);
        break;
      case kRows: {
        const int64_t m_len = s.row_length();
        if (by_parts) {
          for (int p = 0; p < kP; ++p) std::fill_n(base + p * slots + pc.slot, m_len, 0.0);
          for (int64_t o = pc.begin; o < pc.end; ++o) {
            for (int64_t m = 0; m < m_len; ++m) {
              add_square<kP>(base + pc.slot + m, slots, static_cast<double>(f(static_cast<A>(w[o * m_len + m]))));
            }
          }
        } else {
          flag = column_squares<A>(w + pc.begin * m_len, pc.end - pc.begin, base + pc.slot, m_len, f);
        }
        break;
      }
    }
    flagged[q] = flag ? 1 : 0;
  };
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) run_piece(q, false);
  });
  int parts = 1;
  if (kP > 1 && std::find(flagged.begin(), flagged.end(), 1) != flagged.end()) {
    std::vector<double> middle = std::move(partial);
    partial.assign(slots * kP, 0.0);
    std::copy(middle.begin(), middle.end(), partial.begin() + slots);
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        if (flagged[q]) run_piece(q, true);
      }
    });
    parts = kP;
  }

  std::vector<double> norms(groups, 0.0);
  at::parallel_for(0, static_cast<int64_t>(nt), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (numels[t] == 0) continue;
      const GroupShape& s = shapes[t];
      const double* p = partial.data() + slot_base[t];
      if (kinds[t] == kRows) {
        // Pieces in the outer loop, so that each piece's row of partials is read in order; each group's
        // sum still runs over the pieces in order, then over k.
        std::vector<double> acc(parts * s.ngroups, 0.0);
        for (int i = 0; i < parts; ++i) {
          const double* part = p + i * slots;
          double* sums = acc.data() + i * s.ngroups;
          for (int64_t q = 0; q < splits[t]; ++q) {
            const double* row = part + q * s.row_length();
            for (int64_t k = 0; k < s.inner; ++k) {
              for (int64_t g = 0; g < s.ngroups; ++g) sums[g] += row[g * s.inner + k];
            }
          }
        }
        for (int64_t g = 0; g < s.ngroups; ++g) {
          double sums[3] = {};
          for (int i = 0; i < parts; ++i) sums[i] = acc[i * s.ngroups + g];
          norms[offsets[t] + g] = norm_from_parts(sums[0], sums[1], sums[2], parts);
        }
        continue;
      }
      for (int64_t g = 0; g < s.ngroups; ++g) {
        double acc[3] = {};
        for (int i = 0; i < parts; ++i) {
          for (int64_t q = 0; q < splits[t]; ++q) acc[i] += p[i * slots + g * splits[t] + q];
        }
        norms[offsets[t] + g] = norm_from_parts(acc[0], acc[1], acc[2], parts);
      }
    }
  });
  return norms;
}

template <typename T, typename F>
std::vector<double> group_norms(const std::vector<at::Tensor>& ts, const std::vector<GroupShape>& shapes, F f,
                                std::vector<int64_t>& offsets) {
  return group_norms<T>(const_data_of(ts).data(), numels_of(ts), shapes, f, offsets);
}

// Calls body(b, e, scale) over the runs of chunk [begin, end) that share a scale accessor:
// no per-group scale (`scales` empty: `fixed` everywhere, pre-scale 1), one group at a time
// (outer == 1), or one row of columns at a time with a per-column scale (outer > 1; `scales` then
// holds one value per column of the row, i.e. per (g, k)). `pres` is laid out as `scales`.
template <typename A, typename Body>
void for_scale_runs(const GroupShape& s, const A* scales, const A* pres, A fixed, int64_t begin, int64_t end,
                    Body&& body) {
  if (scales == nullptr) {
    body(begin, end, UnitScale<A>{fixed});
    return;
  }
  if (s.outer == 1) {
    for (int64_t i = begin; i < end;) {
      const int64_t g = i / s.inner;
      const int64_t e = std::min(end, (g + 1) * s.inner);
      body(i, e, ConstScale<A>{scales[g], pres[g]});
      i = e;
    }
    return;
  }
  const int64_t m_len = s.row_length();
  for (int64_t i = begin; i < end;) {
    const int64_t row_start = i - i % m_len;
    const int64_t e = std::min(end, row_start + m_len);
    body(i, e, RowScale<A>{scales, pres, row_start});
    i = e;
  }
}

// Per-group values turned into the layout for_scale_runs reads: per group when outer == 1,
// per column (g, k) of a row when outer > 1 (where every tensor's groups are runs, per_group itself).
template <typename A>
std::vector<A> expand_scales(std::vector<A> per_group, const std::vector<int64_t>& offsets,
                             const std::vector<GroupShape>& shapes, const std::vector<int64_t>& numels,
                             std::vector<int64_t>& scale_offsets) {
  bool runs = true;
  for (size_t t = 0; t < numels.size() && runs; ++t) runs = numels[t] == 0 || shapes[t].outer == 1;
  if (runs) {
    scale_offsets.assign(offsets.begin(), offsets.begin() + static_cast<std::ptrdiff_t>(numels.size()));
    return per_group;
  }
  std::vector<A> out;
  scale_offsets.assign(numels.size(), 0);
  for (size_t t = 0; t < numels.size(); ++t) {
    scale_offsets[t] = static_cast<int64_t>(out.size());
    if (numels[t] == 0) continue;
    const GroupShape& s = shapes[t];
    const A* g = per_group.data() + offsets[t];
    if (s.outer == 1) {
      out.insert(out.end(), g, g + s.ngroups);
    } else {
      for (int64_t j = 0; j < s.ngroups; ++j) out.insert(out.end(), s.inner, g[j]);
    }
  }
  return out;
}

}  // namespace REGFAST_CPU_ISA
}  // namespace cpu
}  // namespace regfast
