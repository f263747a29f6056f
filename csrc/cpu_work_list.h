// The CPU work list: every tensor of a list cut into chunks of kChunk elements, spread over
// threads with at::parallel_for. Reductions write one partial per chunk and sum the partials
// in list order afterwards, so their results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace regfast {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct WorkList {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;  // chunks of tensor t are [first[t], first[t + 1])
};

// The work list of tensors of numels[t] elements each.
inline WorkList make_work_list(const std::vector<int64_t>& numels) {
  WorkList wl;
  size_t total = 0;  // sized once: a list of thousands of small tensors is as many chunks
  for (const int64_t n : numels) total += static_cast<size_t>((n + kChunk - 1) / kChunk);
  wl.chunks.resize(total);
  wl.first.resize(numels.size() + 1);
  size_t c = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    wl.first[t] = static_cast<int64_t>(c);
    const int64_t n = numels[t];
    for (int64_t b = 0; b < n; b += kChunk) wl.chunks[c++] = {static_cast<int64_t>(t), b, std::min(n, b + kChunk)};
  }
  wl.first[numels.size()] = static_cast<int64_t>(c);
  return wl;
}

inline std::vector<int64_t> numels_of(at::TensorList ts) {
  std::vector<int64_t> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.numel());
  return out;
}

inline WorkList make_work_list(const std::vector<at::Tensor>& ts) { return make_work_list(numels_of(ts)); }

// The data of a tensor whose dtype the op has checked to be T (the typed accessors check it again per call);
// read-only (const T) through const_data_ptr, which leaves a copy-on-write storage shared.
template <typename T>
inline T* data_of(const at::Tensor& t) {
  if constexpr (std::is_const_v<T>) {
    return static_cast<T*>(t.const_data_ptr());
  } else {
    return static_cast<T*>(t.data_ptr());
  }
}

// How far ahead a pass over a table of data pointers loads the first line of a later chunk (prefetch_chunk): the
// tensors of a long list of small ones lie anywhere on the heap, a miss each that nothing else overlaps (20,000
// one-element float32 tensors in shuffled order, add_penalty_grad_ on one thread: 89% of its kernel's time on the
// loads and stores of their elements).
constexpr int64_t kChunksAhead = 8;

// The first line of chunk c + kChunksAhead of the tensors of T at data[t], for writing with kWrite.
template <typename T, int kWrite>
inline void prefetch_chunk(const WorkList& wl, int64_t c, const void* const* data) {
  if (c + kChunksAhead < static_cast<int64_t>(wl.chunks.size())) {
    const Chunk& ahead = wl.chunks[c + kChunksAhead];
    __builtin_prefetch(static_cast<const T*>(data[ahead.tensor]) + ahead.begin, kWrite);
  }
}

// The data pointers of tensors read only (const_data_ptr: a copy-on-write storage stays shared).
inline std::vector<const void*> const_data_of(const std::vector<at::Tensor>& ts) {
  std::vector<const void*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].const_data_ptr();
  return out;
}

template <typename F>
void for_each_chunk(const WorkList& wl, F&& f) {
  at::parallel_for(0, static_cast<int64_t>(wl.chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, wl.chunks[c]);
  });
}

// f(t, begin, end) over every element of the tensors of T at data[t], of numels[t] elements each (written), spread
// over threads: a list whose tensors all fit in one chunk goes in runs of whole tensors of about kChunk elements
// together (no work list: for thousands of small tensors building it costs more than their elements), any other in
// the work list's chunks. For elementwise work only: which thread takes which range depends on the thread count.
template <typename T, typename F>
void for_each_range(const std::vector<int64_t>& numels, void* const* data, F&& f) {
  const int64_t n = static_cast<int64_t>(numels.size());
  int64_t total = 0, largest = 0;
  for (const int64_t e : numels) {
    total += e;
    largest = std::max(largest, e);
  }
  if (largest > kChunk) {
    const WorkList wl = make_work_list(numels);
    for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
      prefetch_chunk<T, 1>(wl, c, data);
      f(static_cast<size_t>(ch.tensor), ch.begin, ch.end);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n * kChunk / std::max<int64_t>(total, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t + kChunksAhead < end) __builtin_prefetch(data[t + kChunksAhead], 1);  // as prefetch_chunk
      if (numels[t] != 0) f(static_cast<size_t>(t), int64_t{0}, numels[t]);
    }
  });
}

}  // namespace cpu
}  // namespace regfast
