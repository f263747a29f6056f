// The multi-tensor launcher: a chunked (tensor, chunk) work list over a tensor list, no math.
//
// The host builds one WorkItem per chunk of kChunk elements and one TensorMeta per tensor, in
// device memory (no cap on the number of tensors: one launch covers the whole list). Each block
// takes work items in a grid-stride loop and hands them to the functor, which processes
// [begin, end) of its tensor and writes any partial result to the item's own slot, so
// reductions stay deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"

namespace regfast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

template <typename Functor>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const WorkItem* items, int64_t nitems,
                                                                const TensorMeta* meta, Functor f) {
  for (int64_t c = blockIdx.x; c < nitems; c += gridDim.x) {
    const WorkItem item = items[c];
    f(c, item, meta[item.tensor]);
  }
}

template <typename Functor>
void multi_tensor_apply(const WorkItem* items, int64_t nitems, const TensorMeta* meta, Functor f,
                        cudaStream_t stream) {
  if (nitems == 0) return;
  const int blocks = static_cast<int>(nitems < kMaxBlocks ? nitems : kMaxBlocks);
  multi_tensor_kernel<<<blocks, kThreads, 0, stream>>>(items, nitems, meta, f);
}

}  // namespace cuda
}  // namespace regfast
