// Where an element's group is, found without a division per element: the cursors of the CUDA group kernels
// (prox.cu, penalty.cu, group_norms.cu), host-device so that tests/group_cursor_check.cpp runs them on the host.
//
// A tensor with groups is laid out [outer, ngroups, inner] (TensorMeta's ngroups and inner): element i is in
// group (i / inner) % ngroups, at position i % inner of its run of `inner` elements. A kernel's thread visits
// i, i + s, i + 2s, …: the cursors are set up with divisions once and then only add and compare.
#pragma once

#include <cstdint>

#include "kernel_types.h"  // REGFAST_HOST_DEVICE

namespace regfast {

// The group of element i, and its position in its run, then of the elements after it.
struct GroupCursor {
  int64_t group;
  int64_t offset;

  template <typename Meta>
  REGFAST_HOST_DEVICE static GroupCursor at(int64_t i, const Meta& m) {
    const int64_t run = i / m.inner;
    return {run % m.ngroups, i - run * m.inner};
  }
  // To element i + 1.
  template <typename Meta>
  REGFAST_HOST_DEVICE void next(const Meta& m) {
    if (++offset == m.inner) {
      offset = 0;
      if (++group == m.ngroups) group = 0;
    }
  }
  // To element i + s, with step = at(s, m) (whole groups mod ngroups, elements within a run): both parts are
  // reduced, so one carry and one wrap at most.
  template <typename Meta>
  REGFAST_HOST_DEVICE void advance(const GroupCursor& step, const Meta& m) {
    offset += step.offset;
    group += step.group;
    if (offset >= m.inner) {
      offset -= m.inner;
      ++group;
    }
    if (group >= m.ngroups) group -= m.ngroups;
  }
};

// Element j of one group, in the group's own order: (j / inner, j % inner), at offset
// (j / inner)·ngroups·inner + j % inner from the group's first element.
struct RunCursor {
  int64_t run;
  int64_t offset;

  REGFAST_HOST_DEVICE static RunCursor at(int64_t j, int64_t inner) {
    const int64_t run = j / inner;
    return {run, j - run * inner};
  }
  // To element j + s (step = at(s, inner)).
  REGFAST_HOST_DEVICE void advance(const RunCursor& step, int64_t inner) {
    run += step.run;
    offset += step.offset;
    if (offset >= inner) {
      offset -= inner;
      ++run;
    }
  }
};

}  // namespace regfast
