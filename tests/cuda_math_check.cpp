// The CUDA optimizer steps' element math (csrc/optim_math.h) against torch's foreach SGD / AdamW as its CUDA
// kernels round them, on the host: IEEE fma, division and square root round alike on both, and both sides
// are compiled without contraction (-ffp-contract=off, as the kernels with -fmad=false).
//
// torch's side is written the way torch runs it: one pass over all elements per foreach op, each op's result
// stored in A (tests/test_cuda_math.py checks that torch's sources still hold the formulas used here). The
// fused side calls SgdElement / AdamWElement::step per element, as the kernels do. Every case runs several
// steps on the same state, over values of every magnitude with NaN, ±inf, ±0 and subnormals among them.
//
// Prints one line per case and a summary; exits 1 on any difference. Also counts how many elements the CPU
// ATen roundings (v ← fma(w2·g, g, v·β2); w ← w + (s·m)/d) would get wrong, which must be some: the
// comparison sees a one-rounding difference.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "optim_math.h"

using regfast::AdamWElement;
using regfast::Momentum;
using regfast::ProxMode;
using regfast::SgdElement;

namespace {

template <typename A>
bool same_bits(A a, A b) {
  if (a != a && b != b) return true;  // NaN payloads are not compared
  return std::memcmp(&a, &b, sizeof(A)) == 0;
}

template <typename A>
std::vector<A> values(std::mt19937_64& rng, size_t n, double scale) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> e(-30, 10);
  std::vector<A> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<A>(u(rng) * scale * std::ldexp(1.0, e(rng) / 4));
  const A specials[] = {std::numeric_limits<A>::quiet_NaN(), std::numeric_limits<A>::infinity(),
                        -std::numeric_limits<A>::infinity(), A(0), -A(0), std::numeric_limits<A>::denorm_min(),
                        -std::numeric_limits<A>::min(), std::numeric_limits<A>::max()};
  for (size_t k = 0; k < sizeof(specials) / sizeof(A) && 3 * k < n; ++k) out[3 * k] = specials[k];
  return out;
}

// ---- torch's foreach ops on CUDA, one function per op (the formulas of its kernels) ----

// _foreach_add(a, b, alpha): BinaryOpListAlphaFunctor, a + alpha·b, which nvcc contracts.
template <typename A>
void add_alpha(std::vector<A>& a, const std::vector<A>& b, double alpha) {
  const A al = static_cast<A>(alpha);
  for (size_t i = 0; i < a.size(); ++i) a[i] = std::fma(al, b[i], a[i]);
}

template <typename A>
void mul_scalar(std::vector<A>& a, double s) {
  const A c = static_cast<A>(s);
  for (auto& x : a) x = x * c;
}

// _foreach_lerp_(self, end, weight): at::native::lerp, each a·b ± c contracted.
template <typename A>
void lerp(std::vector<A>& self, const std::vector<A>& end, double weight) {
  const A w = static_cast<A>(weight);
  for (size_t i = 0; i < self.size(); ++i) {
    const A s = self[i], e = end[i];
    self[i] = std::abs(w) < A(0.5) ? std::fma(w, e - s, s) : std::fma(-(e - s), A(1) - w, e);
  }
}

// _foreach_addcmul_ / _foreach_addcdiv_ (pointwise_op_impl): input + alpha·op(t1, t2) as std::fma(alpha, op, input)
// for alpha ≠ 1; with alpha = 1, fma(t1, t2, input) for a product and input + t1/t2 for a quotient.
template <typename A>
void addcmul(std::vector<A>& in, const std::vector<A>& t1, const std::vector<A>& t2, double alpha) {
  const A al = static_cast<A>(alpha);
  for (size_t i = 0; i < in.size(); ++i) {
    in[i] = al == A(1) ? std::fma(t1[i], t2[i], in[i]) : std::fma(al, t1[i] * t2[i], in[i]);
  }
}

template <typename A>
void addcdiv(std::vector<A>& in, const std::vector<A>& t1, const std::vector<A>& t2, double alpha) {
  const A al = static_cast<A>(alpha);
  for (size_t i = 0; i < in.size(); ++i) {
    in[i] = al == A(1) ? in[i] + t1[i] / t2[i] : std::fma(al, t1[i] / t2[i], in[i]);
  }
}

struct SgdCase {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

struct AdamWCase {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
};

// torch/optim/sgd.py's _multi_tensor_sgd, one step (bufs empty on the first step with momentum).
template <typename A>
void torch_sgd(const SgdCase& c, std::vector<A>& w, std::vector<A> g, std::vector<A>& buf, bool first) {
  if (c.maximize) {
    for (auto& x : g) x = -x;
  }
  if (c.weight_decay != 0) add_alpha(g, w, c.weight_decay);
  if (c.momentum != 0) {
    if (first) {
      buf = g;
    } else {
      mul_scalar(buf, c.momentum);
      add_alpha(buf, g, 1 - c.dampening);
    }
    if (c.nesterov) {
      add_alpha(g, buf, c.momentum);
    } else {
      g = buf;
    }
  }
  add_alpha(w, g, -c.lr);
}

// torch/optim/adam.py's _multi_tensor_adam with decoupled weight decay (AdamW), step counts on the host.
template <typename A>
void torch_adamw(const AdamWCase& c, double t, std::vector<A>& w, std::vector<A> g, std::vector<A>& m,
                 std::vector<A>& v, std::vector<A>& v_max) {
  if (c.maximize) {
    for (auto& x : g) x = -x;
  }
  if (c.weight_decay != 0) mul_scalar(w, 1 - c.lr * c.weight_decay);
  lerp(m, g, 1 - c.beta1);
  mul_scalar(v, c.beta2);
  addcmul(v, g, g, 1 - c.beta2);
  const double bc1 = 1 - std::pow(c.beta1, t), bc2 = 1 - std::pow(c.beta2, t);
  const double step_size = (c.lr / bc1) * -1, bc2_sqrt = std::pow(bc2, 0.5);
  std::vector<A> denom(v.size());
  if (c.amsgrad) {
    for (size_t i = 0; i < v.size(); ++i) v_max[i] = regfast::maximum(v_max[i], v[i]);  // _foreach_maximum_
  }
  const std::vector<A>& second = c.amsgrad ? v_max : v;
  for (size_t i = 0; i < v.size(); ++i) denom[i] = std::sqrt(second[i]);
  const A b2 = static_cast<A>(bc2_sqrt), e = static_cast<A>(c.eps);
  for (auto& d : denom) d = d / b2;
  for (auto& d : denom) d = d + e;
  addcdiv(w, m, denom, step_size);
}

template <typename A>
int check_sgd(std::mt19937_64& rng, const SgdCase& c, size_t n, int steps) {
  std::vector<A> w = values<A>(rng, n, 1.0), w2 = w, buf, buf2(n, A(0));
  SgdElement<A> e{static_cast<A>(c.weight_decay),
                  static_cast<A>(c.momentum),
                  static_cast<A>(1 - c.dampening),
                  static_cast<A>(-c.lr),
                  A(0),
                  A(1),
                  Momentum::kNone,
                  c.weight_decay != 0,
                  c.nesterov,
                  c.maximize,
                  false,
                  false,
                  false};
  int bad = 0;
  for (int s = 0; s < steps; ++s) {
    const std::vector<A> g = values<A>(rng, n, 0.1);
    torch_sgd(c, w, g, buf, s == 0);
    e.mode = c.momentum == 0 ? Momentum::kNone : (s == 0 ? Momentum::kInit : Momentum::kUpdate);
    for (size_t i = 0; i < n; ++i) w2[i] = e.step(w2[i], g[i], &buf2[i]);
    for (size_t i = 0; i < n; ++i) {
      bad += !same_bits(w[i], w2[i]);
      if (c.momentum != 0) bad += !same_bits(buf[i], buf2[i]);
    }
  }
  return bad;
}

template <typename A>
int check_adamw(std::mt19937_64& rng, const AdamWCase& c, size_t n, int steps, long& cpu_rounding) {
  std::vector<A> w = values<A>(rng, n, 1.0), w2 = w;
  std::vector<A> m(n, A(0)), v(n, A(0)), v_max(n, A(0)), m2 = m, v2 = v, v_max2 = v_max;
  AdamWElement<A> e{static_cast<A>(1 - c.lr * c.weight_decay),
                    static_cast<A>(1 - c.beta1),
                    static_cast<A>(c.beta2),
                    static_cast<A>(1 - c.beta2),
                    static_cast<A>(c.eps),
                    A(0),
                    A(0),
                    static_cast<A>(c.lr),
                    A(0),
                    A(0),
                    A(0),
                    A(1),
                    ProxMode::kNone,
                    c.weight_decay != 0,
                    c.maximize,
                    c.amsgrad,
                    false,
                    false,
                    false};
  int bad = 0;
  for (int s = 1; s <= steps; ++s) {
    const std::vector<A> g = values<A>(rng, n, 0.1);
    const std::vector<A> v_before = v;
    torch_adamw(c, double(s), w, g, m, v, v_max);
    e.step_size = static_cast<A>((c.lr / (1 - std::pow(c.beta1, double(s)))) * -1);
    e.bc2_sqrt = static_cast<A>(std::pow(1 - std::pow(c.beta2, double(s)), 0.5));
    for (size_t i = 0; i < n; ++i) w2[i] = e.step(w2[i], g[i], m2[i], v2[i], v_max2[i]);
    for (size_t i = 0; i < n; ++i) {
      bad += !same_bits(w[i], w2[i]) + !same_bits(m[i], m2[i]) + !same_bits(v[i], v2[i]);
      if (c.amsgrad) bad += !same_bits(v_max[i], v_max2[i]);
      // The CPU ATen rounding of the second moment, for the sensitivity count.
      const A gi = c.maximize ? -g[i] : g[i];
      const A cpu_v = std::fma(static_cast<A>(1 - c.beta2) * gi, gi, v_before[i] * static_cast<A>(c.beta2));
      cpu_rounding += !same_bits(cpu_v, v[i]);
    }
  }
  return bad;
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261203);
  int failures = 0;
  long cpu_rounding = 0;
  const SgdCase sgd_cases[] = {
      {0.1, 0, 0, 0, false, false},     {0.05, 0.9, 0, 0, false, false}, {0.05, 0.9, 0.1, 1e-2, false, false},
      {0.01, 0.9, 0, 1e-4, true, false}, {0.3, 0.5, 0.5, 0.1, false, true}, {1e-3, 0.99, 0, 0, true, true}};
  for (const auto& c : sgd_cases) {
    const int f = check_sgd<float>(rng, c, 4099, 6), d = check_sgd<double>(rng, c, 4099, 6);
    std::printf("sgd lr=%g momentum=%g dampening=%g wd=%g nesterov=%d maximize=%d: float %d, double %d differ\n",
                c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, c.maximize, f, d);
    failures += f + d;
  }
  const AdamWCase adamw_cases[] = {{1e-3, 0.9, 0.999, 1e-8, 1e-2, false, false},
                                   {1e-2, 0.9, 0.999, 1e-8, 0, false, false},
                                   {3e-4, 0.8, 0.95, 1e-6, 0.1, true, false},
                                   {1e-3, 0.3, 0.6, 1e-8, 1e-2, false, true},
                                   {5e-2, 0.0, 0.0, 1e-3, 1e-2, true, true}};
  for (const auto& c : adamw_cases) {
    const int f = check_adamw<float>(rng, c, 4099, 8, cpu_rounding);
    const int d = check_adamw<double>(rng, c, 4099, 8, cpu_rounding);
    std::printf("adamw lr=%g betas=(%g, %g) eps=%g wd=%g amsgrad=%d maximize=%d: float %d, double %d differ\n", c.lr,
                c.beta1, c.beta2, c.eps, c.weight_decay, c.amsgrad, c.maximize, f, d);
    failures += f + d;
  }
  std::printf("second moments the CPU ATen rounding would give otherwise: %ld\n", cpu_rounding);
  std::printf("%s\n", failures == 0 && cpu_rounding > 0 ? "OK" : "FAILED");
  return failures == 0 && cpu_rounding > 0 ? 0 : 1;
}
