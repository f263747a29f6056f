// fp32 (fp64 for fp64) block and warp reductions, element conversions and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise.h"
#include "group_cursor.h"
#include "kernel_types.h"
#include "multi_tensor.cuh"

namespace regfast {
namespace cuda {

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) {
  return static_cast<A>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, valid in thread 0; a fixed tree, so the result is deterministic.
// Every thread of the block must call it; `shared` holds kThreads / 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Block-reduces a thread's two sums and stores them as work item c's partials, partials[c] and
// partials[nitems + c]. Every thread of the block must call it.
template <typename A>
__device__ __forceinline__ void store_partial_pair(A s1, A s2, A* shared, A* partials, int64_t c, int64_t nitems) {
  s1 = block_sum(s1, shared);
  s2 = block_sum(s2, shared);
  if (threadIdx.x == 0) {
    partials[c] = s1;
    partials[nitems + c] = s2;
  }
}

// A tensor lr (Step, OptimScalars): the device value at lr_ptr, else the host-read value `lr`.
template <typename A, typename S>
__device__ __forceinline__ A tensor_lr_of(const S& s) {
  return s.lr_ptr != nullptr ? *static_cast<const A*>(s.lr_ptr) : static_cast<A>(s.lr);
}

// The elastic-net step of a proximal step: from a tensor lr, else the host's scalars.
template <typename A>
__device__ __forceinline__ ElasticStep<A> elastic_of(const Step& s) {
  if (s.tensor_lr) return ElasticStep<A>::from_acc(tensor_lr_of<A>(s), s.l1, s.l2);
  return ElasticStep<A>::from_double(s.threshold, s.shrink, s.l1 != 0, s.l2 != 0);
}

// Elements per 16-byte vector, and whether [begin, end) of these pointers can use 16-byte accesses.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ bool vec_ok(const void* a, const void* b, int64_t begin) {
  return (reinterpret_cast<uintptr_t>(a) % 16 == 0) && (b == nullptr || reinterpret_cast<uintptr_t>(b) % 16 == 0) &&
         begin % kVec<T> == 0;
}

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

// n accumulation values at p, 16-byte aligned, in 16-byte loads and stores (n·sizeof(A) a multiple of 16):
// the optimizer states beside a vector of kVec<T> param elements.
template <int N, typename A>
__device__ __forceinline__ void load_acc_vec(const A* p, A (&out)[N]) {
  static_assert(N * sizeof(A) % 16 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < N / kVec<A>; ++k) {
    const Vec<A> piece = reinterpret_cast<const Vec<A>*>(p)[k];
#pragma unroll
    for (int e = 0; e < kVec<A>; ++e) out[k * kVec<A> + e] = piece.v[e];
  }
}

template <int N, typename A>
__device__ __forceinline__ void store_acc_vec(A* p, const A (&in)[N]) {
  static_assert(N * sizeof(A) % 16 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < N / kVec<A>; ++k) {
    Vec<A> piece;
#pragma unroll
    for (int e = 0; e < kVec<A>; ++e) piece.v[e] = in[k * kVec<A> + e];
    reinterpret_cast<Vec<A>*>(p)[k] = piece;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls op(i) for every i in [begin, end) with i a multiple of kVec<T> handled kVec elements at a
// time through 16-byte loads (op_vec(i)) when `aligned`, then the scalar tail.
template <typename T, typename OpVec, typename Op>
__device__ __forceinline__ void for_elements(int64_t begin, int64_t end, bool aligned, OpVec op_vec, Op op) {
  int64_t i = begin;
  if (aligned) {
    const int64_t nvec = (end - begin) / kVec<T>;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) op_vec(begin + v * kVec<T>);
    i = begin + nvec * kVec<T>;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) op(j);
}

// for_elements with the group of each element: op_vec(i, at) and op(i, at) get the cursor of element i (the
// first of a vector), when `grouped`, else a zero one. Each of the two loops sets a thread's cursor up once (its
// divisions) and advances it along the thread's stride: no division per vector or element.
template <typename T, typename OpVec, typename Op>
__device__ __forceinline__ void for_grouped_elements(int64_t begin, int64_t end, bool aligned, bool grouped,
                                                     const TensorMeta& m, OpVec op_vec, Op op) {
  auto loop = [&](int64_t first, int64_t last, int64_t width, auto body) {
    const int64_t stride = static_cast<int64_t>(blockDim.x) * width;
    int64_t i = first + threadIdx.x * width;
    if (i >= last) return;
    GroupCursor at = grouped ? GroupCursor::at(i, m) : GroupCursor{0, 0};
    const GroupCursor step = grouped ? GroupCursor::at(stride, m) : GroupCursor{0, 0};
    for (; i < last; i += stride) {
      body(i, at);
      if (grouped) at.advance(step, m);
    }
  };
  int64_t i = begin;
  if (aligned) {
    i = begin + (end - begin) / kVec<T> * kVec<T>;
    loop(begin, i, kVec<T>, op_vec);
  }
  loop(i, end, 1, op);
}

// Per-tensor sums of per-item partials: out[t] = Σ partials[c] over tensor t's items [first[t], first[t + 1]),
// for nvalues rows of partials (row k at k·stride, its sums at k·out_stride). One block per tensor, the blocks
// striding over the tensors: thread j sums items first[t] + j, + j + kThreads, … in order, and the threads'
// sums meet in block_sum's fixed tree, so the order depends on neither the grid nor timing. Launched with
// kThreads threads per block.
template <typename A>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const A* partials, int64_t stride,
                                                                const int64_t* first, int64_t ntensors, A* out,
                                                                int64_t out_stride, int nvalues) {
  __shared__ A shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < ntensors; t += gridDim.x) {
    const int64_t begin = first[t], end = first[t + 1];
    for (int k = 0; k < nvalues; ++k) {
      A acc = 0;
      for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) acc += partials[k * stride + c];
      acc = block_sum(acc, shared);
      if (threadIdx.x == 0) out[k * out_stride + t] = acc;
    }
  }
}

}  // namespace cuda
}  // namespace regfast

// Runs the statement with scalar_t bound to the element type of `dtype`.
#define REGFAST_DISPATCH(dtype, ...)                          \
  switch (dtype) {                                            \
    case ::regfast::DType::kHalf: {                     \
      using scalar_t = __half;                                \
      __VA_ARGS__;                                            \
      break;                                                  \
    }                                                         \
    case ::regfast::DType::kBFloat16: {                 \
      using scalar_t = __nv_bfloat16;                         \
      __VA_ARGS__;                                            \
      break;                                                  \
    }                                                         \
    case ::regfast::DType::kFloat: {                    \
      using scalar_t = float;                                 \
      __VA_ARGS__;                                            \
      break;                                                  \
    }                                                         \
    case ::regfast::DType::kDouble: {                   \
      using scalar_t = double;                                \
      __VA_ARGS__;                                            \
      break;                                                  \
    }                                                         \
  }
