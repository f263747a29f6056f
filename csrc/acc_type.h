// The accumulation type of an element type: double for double, float for every other one
// (float, and half / bfloat16 as ATen, c10 or CUDA spell them). Shared by the CPU and CUDA kernels.
#pragma once

#include <type_traits>

namespace regfast {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace regfast
