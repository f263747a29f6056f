// The group cursors of the CUDA group kernels (csrc/group_cursor.h), on the host: every thread's walk as the
// kernels make it (for_grouped_elements in reduce.cuh: vectors of `width` elements, then the scalar tail, each
// thread starting at its index and stepping by the block; group_piece_kernel in group_norms.cu: one group's
// elements from a piece's start), for many layouts, item ranges and block sizes, against the divisions they
// replace. Prints the number of positions checked, then "OK"; exits 1 at the first wrong one.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "group_cursor.h"

namespace {

struct Meta {
  int64_t ngroups;
  int64_t inner;
};

int64_t checked = 0;

bool fail(const char* what, int64_t outer, int64_t ngroups, int64_t inner, int64_t i) {
  std::printf("FAILED: %s at element %lld of [%lld, %lld, %lld]\n", what, static_cast<long long>(i),
              static_cast<long long>(outer), static_cast<long long>(ngroups), static_cast<long long>(inner));
  return false;
}

// One loop of for_grouped_elements over [first, last) with `width` elements per visit.
bool walk(int64_t first, int64_t last, int64_t width, int64_t threads, int64_t outer, const Meta& m) {
  const int64_t stride = threads * width;
  for (int64_t t = 0; t < threads; ++t) {
    int64_t i = first + t * width;
    if (i >= last) continue;
    regfast::GroupCursor at = regfast::GroupCursor::at(i, m);
    const regfast::GroupCursor step = regfast::GroupCursor::at(stride, m);
    for (; i < last; i += stride) {
      regfast::GroupCursor e = at;  // the elements of the vector: next() from its first
      for (int64_t k = 0; k < width; ++k) {
        const int64_t x = i + k;
        if (e.group != (x / m.inner) % m.ngroups || e.offset != x % m.inner) {
          return fail("group cursor", outer, m.ngroups, m.inner, x);
        }
        ++checked;
        e.next(m);
      }
      at.advance(step, m);
    }
  }
  return true;
}

// group_piece_kernel's walk of group g's elements [j0, j1).
bool walk_group(int64_t g, int64_t j0, int64_t j1, int64_t threads, int64_t outer, const Meta& m) {
  const int64_t row = m.ngroups * m.inner;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t first = j0 + t;
    regfast::RunCursor at = regfast::RunCursor::at(first, m.inner);
    const regfast::RunCursor step = regfast::RunCursor::at(threads, m.inner);
    for (int64_t j = first; j < j1; j += threads) {
      const int64_t want = (j / m.inner) * row + g * m.inner + j % m.inner;
      if (g * m.inner + at.run * row + at.offset != want) return fail("run cursor", outer, m.ngroups, m.inner, j);
      ++checked;
      at.advance(step, m.inner);
    }
  }
  return true;
}

}  // namespace

int main() {
  const int64_t dims[] = {1, 2, 3, 5, 8, 17, 64, 255, 256, 257, 1000};
  const int64_t blocks[] = {1, 7, 32, 256};
  for (int64_t outer : {1, 2, 3, 9}) {
    for (int64_t ngroups : dims) {
      for (int64_t inner : dims) {
        const Meta m{ngroups, inner};
        const int64_t n = outer * ngroups * inner, size = outer * inner;
        for (int64_t threads : blocks) {
          // Item ranges: the whole tensor, one starting and ending off any boundary, and chunk-like pieces.
          const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, n}, {n / 3, n - n / 5}, {n / 2, n}};
          for (const auto& [b, e] : ranges) {
            for (int64_t width : {1, 2, 4, 8}) {
              const int64_t mid = b + (e - b) / width * width;
              if (!walk(b, mid, width, threads, outer, m) || !walk(mid, e, 1, threads, outer, m)) return 1;
            }
          }
          for (int64_t g : {int64_t{0}, ngroups / 2, ngroups - 1}) {
            if (!walk_group(g, 0, size, threads, outer, m) || !walk_group(g, size / 3, size, threads, outer, m)) {
              return 1;
            }
          }
        }
      }
    }
  }
  std::printf("%lld positions\nOK\n", static_cast<long long>(checked));
  return 0;
}
