// What every kernel shares, CPU and CUDA alike: the element types, the optimizer modes, and the
// host/device qualifier. No torch header, so that the .cu files build with nvcc alone.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define REGFAST_HOST_DEVICE __host__ __device__
#else
#define REGFAST_HOST_DEVICE
#endif

namespace regfast {

// The element types of params (at::ScalarType on the host side: see tensor_list.h's dtype_of).
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// The accumulation type of an element type: double for double, float for every other one
// (float, and half / bfloat16 as ATen, c10 or CUDA spell them).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// SGD's momentum buffer: none, set to the gradient (a param's first step), or updated; kReplay (the CPU steps with
// group lasso in two passes): the buffer as a step left it, read again, with the grad for Nesterov's step;
// kReplayBuffer: the same without Nesterov, whose step is the buffer alone: the grad is not read.
enum class Momentum : int { kNone = 0, kInit = 1, kUpdate = 2, kReplay = 3, kReplayBuffer = 4 };

// AdamW's proximal step: none (no l1, l2), with the scalar step lr, or in Adam's metric.
enum class ProxMode : int { kNone = 0, kLr = 1, kPreconditioned = 2 };

}  // namespace regfast
