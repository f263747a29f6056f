// The per-element math of the fused CUDA optimizer steps (optim.cu), compiled for the host too: the CPU
// tests run these very functions against torch's CUDA formulas, bit for bit (tests/test_cuda_math.py).
//
// With l1 = l2 = 0, a float lr and step counts on the host, a step is the one of torch.optim's foreach SGD /
// AdamW on CUDA (the implementation torch picks for CUDA params by default), as torch 2.11 to 2.13 compute
// it: each foreach op is one kernel that rounds to the accumulation dtype A once per operation, with the
// fmas that torch's CUDA kernels perform (explicit std::fma in DeviceAddCmulCdiv.cuh's pointwise_op_impl;
// a + alpha·b and lerp's self + weight·(end − self), which nvcc contracts by default):
//   SGD    g ← −g (maximize);  g ← fma(wd, w, g)                      _foreach_add(grads, params, alpha=wd)
//          b ← g (first step), else b ← fma(1 − dampening, g, b·mom)  _foreach_mul_, _foreach_add_(alpha)
//          g ← fma(mom, b, g) (nesterov), else g ← b
//          w ← fma(−lr, g, w)                                          _foreach_add_(params, grads, alpha=−lr)
//   AdamW  w ← w·(1 − lr·wd)                                           _foreach_mul_ by the host's double
//          m ← lerp(m, g, 1 − β1)                                      _foreach_lerp_ (at::native::lerp)
//          v ← fma(1 − β2, g·g, v·β2)                                  _foreach_mul_, _foreach_addcmul_
//          d ← √v / √(1 − β2ᵗ) + eps  (√max(v_max, v) with amsgrad)    _foreach_sqrt, _div_, _add_
//          w ← fma(−lr/(1 − β1ᵗ), m / d, w)                            _foreach_addcdiv_ with a scalar list
// The scalars are the host's doubles (as torch's Python computes them) rounded to A. The kernels compile
// with -fmad=false, so no a·b + c is fused unless written as an fma here, and IEEE division and square
// root (the nvcc defaults): the host build (-ffp-contract=off) computes the same bits.
//
// A tensor lr (on the device, read by the kernel) follows torch's capturable foreach formulas, as the
// reference does: SGD w ← w + g·(−lr) (a product, then a sum: _foreach_mul, _foreach_add_), AdamW
// w ← w + m / (d / step_size) (_foreach_div, then _foreach_addcdiv_ with value 1: no fma).
// The prox that follows the update (l1, l2) is regfast's own: elementwise.h, in the reference's roundings.
#pragma once

#include <cmath>

#include "elementwise.h"
#include "kernel_types.h"

namespace regfast {

// torch's lerp on CUDA (ATen/native/Lerp.h, as nvcc compiles it): self + weight·(end − self) for
// |weight| < 0.5, else end − (end − self)·(1 − weight); each a·b ± c one fma.
template <typename A>
REGFAST_HOST_DEVICE inline A cuda_lerp(A self, A end, A weight) {
  const A diff = end - self;
  return std::abs(weight) < A(0.5) ? std::fma(weight, diff, self) : std::fma(-diff, A(1) - weight, end);
}

// The constants of an SGD step, in A.
template <typename A>
struct SgdElement {
  A weight_decay, momentum, keep, neg_lr;  // keep: 1 − dampening; neg_lr: −lr
  A threshold, shrink;                     // the elastic-net step (elementwise.h)
  Momentum mode;
  bool has_weight_decay, nesterov, maximize, tensor_lr, has_l1, has_l2;

  // The new value of a param element x with gradient g; *buf is its momentum buffer (unused without momentum).
  REGFAST_HOST_DEVICE A step(A x, A g, A* buf) const {
    if (maximize) g = -g;
    if (has_weight_decay) g = std::fma(weight_decay, x, g);
    if (mode != Momentum::kNone) {
      const A b = mode == Momentum::kInit ? g : std::fma(keep, g, *buf * momentum);
      *buf = b;
      g = nesterov ? std::fma(momentum, b, g) : b;
    }
    x = tensor_lr ? x + g * neg_lr : std::fma(neg_lr, g, x);
    return elastic_step(x, has_l1, threshold, has_l2, shrink);
  }
};

// The constants of an AdamW step, in A; step_size (−lr/(1 − β1ᵗ)) and bc2_sqrt (√(1 − β2ᵗ)) per tensor.
template <typename A>
struct AdamWElement {
  A decay, beta1_weight, beta2, beta2_weight, eps;  // decay: 1 − lr·wd; the weights: 1 − β1, 1 − β2
  A step_size, bc2_sqrt;
  A lr, l1, two_l2, threshold, shrink;  // the prox: lr, l1, 2·l2 and the elastic-net step of step lr
  ProxMode prox;
  bool has_weight_decay, maximize, amsgrad, tensor_lr, has_l1, has_l2;

  // The new value of a param element x with gradient g, updating its moments m, v and (amsgrad) v_max.
  REGFAST_HOST_DEVICE A step(A x, A g, A& m, A& v, A& v_max) const {
    // prox="preconditioned": the size of the penalty's gradient at x, the floor of Adam's denominator.
    const A floor = (has_l2 ? two_l2 * std::abs(x) : A(0)) + l1;
    if (has_weight_decay) x = x * decay;
    if (maximize) g = -g;
    m = cuda_lerp(m, g, beta1_weight);
    v = std::fma(beta2_weight, g * g, v * beta2);
    A second = v;
    if (amsgrad) {
      second = maximum(v_max, v);
      v_max = second;
    }
    A denom = std::sqrt(second) / bc2_sqrt + eps;
    // A NaN denominator stays NaN (the comparison is false).
    if (prox == ProxMode::kPreconditioned && denom < floor) denom = floor;
    x = tensor_lr ? x + m / (denom / step_size) : std::fma(step_size, m / denom, x);
    if (prox == ProxMode::kLr) return elastic_step(x, has_l1, threshold, has_l2, shrink);
    if (prox == ProxMode::kPreconditioned) {
      const A step = tensor_lr ? lr / denom : (A(1) / denom) * lr;
      if (has_l1) x = soft_threshold(x, step * l1);
      if (has_l2) x = x * (A(1) / (step * two_l2 + A(1)));
    }
    return x;
  }
};

}  // namespace regfast
