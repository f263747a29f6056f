// Group norms without overflow or underflow, for the CPU and CUDA kernels alike.
//
// ‖u‖₂ is summed as Σu² in double. The squares of float, half and bfloat16 values and their sums
// stay within double's range, so one part suffices. double values are summed in three parts by
// magnitude, each scaled so that no square or sum leaves double's range (Blue's algorithm, as in
// LAPACK's dnrm2): |u| < 2^-511 scaled by 2^537, |u| > 2^486 by 2^-538, the rest (NaN included)
// unscaled. norm_from_parts combines them.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_types.h"  // REGFAST_HOST_DEVICE; no torch header, so the .cu files build with nvcc alone

namespace regfast {

constexpr double kSmallSquare = 0x1p-511, kBigSquare = 0x1p486, kUpSmall = 0x1p537, kDownBig = 0x1p-538;

// Whether a nonzero |u| is outside [2^-511, 2^486], where its unscaled square would leave double's range.
REGFAST_HOST_DEVICE inline bool out_of_range(double u) {
  const double a = ::fabs(u);
  const bool big = a > kBigSquare, small = a < kSmallSquare, nonzero = a != 0;
  return big | (small & nonzero);  // bitwise: no branch, so the loops using it vectorize
}

// Adds u² to the kParts parts s[0] (small), s[stride] (unscaled), s[2·stride] (big); one part: s[0].
template <int kParts>
REGFAST_HOST_DEVICE inline void add_square(double* s, int64_t stride, double u) {
  if constexpr (kParts == 1) {
    s[0] += u * u;
  } else {
    const double a = ::fabs(u), lo = u * kUpSmall, hi = u * kDownBig;
    const bool small = a < kSmallSquare, big = a > kBigSquare;
    s[0] += small ? lo * lo : 0.0;
    s[stride] += small || big ? 0.0 : u * u;
    s[2 * stride] += big ? hi * hi : 0.0;
  }
}

// ‖u‖₂ from the parts of its square sum: one part (s[0]) or three (small, unscaled, big).
REGFAST_HOST_DEVICE inline double norm_from_parts(double small, double mid, double big, int parts) {
  if (parts == 1) return ::sqrt(small);
  if (small != small || mid != mid || big != big) return small + mid + big;  // NaN
  if (big > 0) return ::sqrt(big + (mid * kDownBig) * kDownBig) / kDownBig;
  if (small > 0) {
    const double lo = ::sqrt(small) / kUpSmall;
    if (mid == 0) return lo;
    const double m = ::sqrt(mid), hi = m > lo ? m : lo, low = m > lo ? lo : m;
    return hi * ::sqrt(1 + (low / hi) * (low / hi));
  }
  return ::sqrt(mid);
}

}  // namespace regfast
