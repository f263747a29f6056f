// CPU implementations of regfast_C::sgd_step_ and regfast_C::adamw_step_: one pass that reads
// each param, grad and state element once and writes the param and state once, and sums the
// penalty of the new params in the same pass (one partial per chunk, summed in list order, so
// the result does not depend on the thread count).
//
// The scalars are prepared here exactly as the reference (regfast/reference/optim.py) computes
// them: in double from Python floats, in the accumulation dtype from a tensor lr; the loops are
// in optim_cpu_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu_ops.h"
#include "cpu_passes.h"
#include "cpu_work_list.h"
#include "elementwise.h"
#include "groups.h"
#include "optim_common.h"
#include "optim_cpu.h"
#include "optim_cpu_step.h"
#include "tensor_list.h"

namespace regfast {
namespace {

using optim_cpu::AdamWArgs;
using optim_cpu::AdamWTensor;
using optim_cpu::GroupBlock;
using optim_cpu::GroupArray;
using optim_cpu::GroupPack;
using optim_cpu::SgdArgs;
using optim_cpu::SgdTensor;

// Whether ATen's vectorized kernels round a·b + c once here: on x86-64 when torch runs its
// AVX2 / AVX512 kernels (ATEN_CPU_CAPABILITY may lower that), elsewhere always.
bool aten_fuses_fmadd() {
#if defined(__x86_64__)
  return at::get_cpu_capability().rfind("AVX", 0) == 0;
#else
  return true;
#endif
}

void check_params_and_grads(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(!params.empty(), "params must not be empty");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && params[i].scalar_type() == dtype,
                "params must all be CPU tensors of one dtype");
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].scalar_type() == dtype && grads[i].sizes() == params[i].sizes(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
  }
}

// A state list: one CPU tensor per param, of its shape, in the accumulation dtype.
void check_state(at::TensorList state, at::TensorList params, const char* name) {
  TORCH_CHECK(state.size() == params.size(), name, " and params differ in length");
  const auto acc = acc_type(params[0].scalar_type());
  for (size_t i = 0; i < state.size(); ++i) {
    TORCH_CHECK(state[i].device().is_cpu() && state[i].scalar_type() == acc && state[i].sizes() == params[i].sizes(),
                name, "[", i, "] must be a CPU ", acc, " tensor of params[", i, "]'s shape");
  }
}

// The accumulation-dtype value of a 0-dim lr tensor, held as a double (exact).
double lr_value(const at::Tensor& lr_tensor, at::ScalarType acc) {
  TORCH_CHECK(lr_tensor.numel() == 1, "lr_tensor must have one element");
  return lr_tensor.to(at::kCPU, acc).item<double>();
}

// The elastic-net scalars lr·l1 and 1/(1 + 2·lr·l2) as the reference computes them (elementwise.h).
void prox_scalars(bool lr_is_tensor, double lr, double l1, double l2, at::ScalarType acc, double& threshold,
                  double& shrink) {
  if (!lr_is_tensor) {
    elastic_scalars(lr, l1, l2, threshold, shrink);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "regfast_prox_scalars", [&] {
    const auto step = ElasticStep<scalar_t>::from_acc(static_cast<scalar_t>(lr), l1, l2);
    threshold = static_cast<double>(step.threshold);
    shrink = static_cast<double>(step.shrink);
  });
}

// The first lines of a param's arrays.
void prefetch_starts(const optim_cpu::SgdTensor& t) {
  __builtin_prefetch(t.param, 1);
  __builtin_prefetch(t.grad);
  if (t.buffer != nullptr) __builtin_prefetch(t.buffer, 1);
}

void prefetch_starts(const optim_cpu::AdamWTensor& t) {
  __builtin_prefetch(t.param, 1);
  __builtin_prefetch(t.grad);
  __builtin_prefetch(t.exp_avg, 1);
  __builtin_prefetch(t.exp_avg_sq, 1);
}

// Runs the step loop run(args, ts[t], begin, end, sums) over every chunk of the params (ts[t] of numels[t]
// elements); returns l1·Σ|w| + l2·Σw² (in `acc`) from the chunk sums. Loads the first lines of each param's arrays
// kChunksAhead chunks before its first chunk (cpu_work_list.h's prefetch_chunk: a list of small tensors).
template <typename Args, typename Tensor, typename Run>
double chunked_pass(const Args& args, const std::vector<Tensor>& ts, const std::vector<int64_t>& numels,
                    at::ScalarType acc, double l1, double l2, Run run) {
  const bool penalty = args.penalty;
  const cpu::WorkList wl = cpu::make_work_list(numels);
  std::vector<double> sums(penalty ? 2 * wl.chunks.size() : 0);
  const int64_t nchunks = static_cast<int64_t>(wl.chunks.size());
  cpu::for_each_chunk(wl, [&](int64_t c, const cpu::Chunk& ch) {
    if (c + cpu::kChunksAhead < nchunks && wl.chunks[c + cpu::kChunksAhead].begin == 0) {
      prefetch_starts(ts[wl.chunks[c + cpu::kChunksAhead].tensor]);
    }
    run(args, ts[ch.tensor], ch.begin, ch.end, penalty ? sums.data() + 2 * c : nullptr);
  });
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "regfast_step_penalty", [&] {
    scalar_t s1 = 0, s2 = 0, v = 0;
    for (size_t c = 0; c < sums.size(); c += 2) {
      s1 += static_cast<scalar_t>(sums[c]);
      s2 += static_cast<scalar_t>(sums[c + 1]);
    }
    if (l1 != 0) v += static_cast<scalar_t>(l1) * s1;
    if (l2 != 0) v += static_cast<scalar_t>(l2) * s2;
    value = static_cast<double>(v);
  });
  return value;
}

}  // namespace

namespace optim_cpu {

SgdArgs sgd_args(at::ScalarType dtype, double step, bool lr_is_tensor, double momentum, double dampening,
                 bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                 bool compute_penalty) {
  SgdArgs args{};
  args.elem = dtype_of(dtype);
  args.momentum_mode = momentum == 0 ? Momentum::kNone : (init_buffers ? Momentum::kInit : Momentum::kUpdate);
  args.maximize = maximize;
  args.has_weight_decay = weight_decay != 0;
  args.nesterov = nesterov;
  args.lr_is_tensor = lr_is_tensor;
  args.has_l1 = l1 != 0;
  args.penalty = compute_penalty && (l1 != 0 || l2 != 0);
  args.neg_lr = -step;
  args.weight_decay = weight_decay;
  args.momentum = momentum;
  args.keep = 1.0 - dampening;
  prox_scalars(lr_is_tensor, step, l1, l2, acc_type(dtype), args.threshold, args.shrink);
  return args;
}

AdamWArgs adamw_args(at::ScalarType dtype, double step, bool lr_is_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool amsgrad, bool maximize, double l1, double l2, bool prox_lr,
                     bool compute_penalty) {
  const auto acc = acc_type(dtype);
  AdamWArgs args{};
  args.elem = dtype_of(dtype);
  args.prox = l1 == 0 && l2 == 0 ? ProxMode::kNone : (prox_lr ? ProxMode::kLr : ProxMode::kPreconditioned);
  args.maximize = maximize;
  args.amsgrad = amsgrad;
  args.lr_is_tensor = lr_is_tensor;
  args.has_l1 = l1 != 0;
  args.has_l2 = l2 != 0;
  args.penalty = compute_penalty && (l1 != 0 || l2 != 0);
  args.lr = step;
  args.decay = 1.0;
  if (weight_decay != 0) {
    if (lr_is_tensor) {
      AT_DISPATCH_FLOATING_TYPES(acc, "regfast_adamw_decay", [&] {
        args.decay =
            static_cast<double>(scalar_t(1) - static_cast<scalar_t>(step) * static_cast<scalar_t>(weight_decay));
      });
    } else {
      args.decay = 1.0 - step * weight_decay;
    }
  }
  args.beta1_weight = 1.0 - beta1;
  args.beta2 = beta2;
  args.beta2_weight = 1.0 - beta2;
  args.eps = eps;
  args.l1 = l1;
  args.two_l2 = 2.0 * l2;
  prox_scalars(lr_is_tensor, step, l1, l2, acc, args.threshold, args.shrink);
  return args;
}

// The element loops of the steps: a·b + c rounded as ATen rounds it here, on 512-bit vectors where the CPU passes run
// their AVX-512 variant (so never on a CPU without AVX-512, nor with REGFAST_CPU_ISA naming a narrower one).
struct Loops {
  void (*sgd)(const SgdArgs&, const SgdTensor&, int64_t, int64_t, double*);
  void (*adamw)(const AdamWArgs&, const AdamWTensor&, int64_t, int64_t, double*);
};

Loops loops() {
  if (!aten_fuses_fmadd()) return {&rounded_twice::sgd_run, &rounded_twice::adamw_run};
#if defined(__x86_64__)
  if (cpu::active_isa() == cpu::Isa::kAvx512) return {&fused_avx512::sgd_run, &fused_avx512::adamw_run};
#endif
  return {&fused::sgd_run, &fused::adamw_run};
}

double run_sgd(const SgdArgs& args, const std::vector<SgdTensor>& ts, const std::vector<int64_t>& numels,
               at::ScalarType acc, double l1, double l2) {
  return chunked_pass(args, ts, numels, acc, l1, l2, loops().sgd);
}

double run_adamw(const AdamWArgs& args, const std::vector<AdamWTensor>& ts, const std::vector<int64_t>& numels,
                 at::ScalarType acc, double l1, double l2) {
  return chunked_pass(args, ts, numels, acc, l1, l2, loops().adamw);
}

}  // namespace optim_cpu

namespace {

// The contiguous tensors of an SGD step (the momentum buffers, or none) and their pointers.
struct SgdTable {
  TensorRefs ws, gs, bs;
  std::vector<SgdTensor> ts;
};

SgdTable sgd_table(at::TensorList params, at::TensorList grads, at::TensorList buffers) {
  SgdTable tb{contiguous_all(params), contiguous_all(grads), contiguous_all(buffers), {}};
  tb.ts.resize(tb.ws.size());
  for (size_t i = 0; i < tb.ws.size(); ++i) {
    tb.ts[i] = {tb.ws[i].data_ptr(), tb.gs[i].const_data_ptr(), tb.bs.empty() ? nullptr : tb.bs[i].data_ptr()};
  }
  return tb;
}

// The one-pass step with the elementwise prox (no group lasso); params and state are checked.
at::Tensor sgd_fused(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                     bool compute_penalty) {
  const auto acc = acc_type(params[0].scalar_type());
  const double step = lr_tensor.has_value() ? lr_value(*lr_tensor, acc) : lr;
  const SgdArgs args = optim_cpu::sgd_args(params[0].scalar_type(), step, lr_tensor.has_value(), momentum, dampening,
                                           nesterov, weight_decay, maximize, init_buffers, l1, l2, compute_penalty);
  const SgdTable tb = sgd_table(params, grads, momentum != 0 ? momentum_buffers : at::TensorList());
  const double value = optim_cpu::run_sgd(args, tb.ts, cpu::numels_of(tb.ws), acc, l1, l2);
  write_back(params, tb.ws);
  if (!tb.bs.empty()) write_back(momentum_buffers, tb.bs);
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

// The contiguous tensors of an AdamW step, the step counts incremented and each param's bias corrections read.
struct AdamWTable {
  TensorRefs ws, gs, m1, m2, mx;
  std::vector<AdamWTensor> ts;
};

AdamWTable adamw_table(const AdamWArgs& args, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2) {
  const auto acc = acc_type(params[0].scalar_type());
  AdamWTable tb{contiguous_all(params), contiguous_all(grads), contiguous_all(exp_avgs), contiguous_all(exp_avg_sqs),
                contiguous_all(args.amsgrad ? max_exp_avg_sqs : at::TensorList()), {}};
  tb.ts.resize(tb.ws.size());
  for (size_t i = 0; i < tb.ws.size(); ++i) {
    tb.ts[i] = {tb.ws[i].data_ptr(), tb.gs[i].const_data_ptr(), tb.m1[i].data_ptr(), tb.m2[i].data_ptr(),
                tb.mx.empty() ? nullptr : tb.mx[i].data_ptr(), 0.0, 0.0};
  }
  for (const auto& s : steps) {
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1, "steps must be one-element CPU tensors");
  }
  const std::optional<at::Tensor> lr_acc =
      args.lr_is_tensor ? std::optional<at::Tensor>(lr_tensor->to(at::kCPU, acc)) : std::nullopt;
  const BiasCorrections bc = bias_corrections(steps, lr_acc, lr, beta1, beta2, at::kCPU);
  for (size_t i = 0; i < tb.ts.size(); ++i) {
    tb.ts[i].step_size = bc.on_host() ? bc.step_size[i] : bc.bc1[i].item<double>();
    tb.ts[i].bc2_sqrt = bc.on_host() ? bc.bc2_sqrt[i] : bc.bc2[i].item<double>();
  }
  return tb;
}

void write_back_adamw(const AdamWTable& tb, at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, bool amsgrad) {
  write_back(params, tb.ws);
  write_back(exp_avgs, tb.m1);
  write_back(exp_avg_sqs, tb.m2);
  if (amsgrad) write_back(max_exp_avg_sqs, tb.mx);
}

// The one-pass step with the elementwise prox (no group lasso); params and state are checked.
at::Tensor adamw_fused(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                       double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                       c10::string_view prox, bool compute_penalty) {
  const auto acc = acc_type(params[0].scalar_type());
  const double step = lr_tensor.has_value() ? lr_value(*lr_tensor, acc) : lr;
  const AdamWArgs args =
      optim_cpu::adamw_args(params[0].scalar_type(), step, lr_tensor.has_value(), beta1, beta2, eps, weight_decay,
                            amsgrad, maximize, l1, l2, prox == "lr", compute_penalty);
  const AdamWTable tb =
      adamw_table(args, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2);
  const double value = optim_cpu::run_adamw(args, tb.ts, cpu::numels_of(tb.ws), acc, l1, l2);
  write_back_adamw(tb, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

// Group passes' blocks: about this many elements each (the block's own arrays fit in L2 with its params and state),
// and at least this many column groups as long as the block stays within kLargestColumnBlock elements: a block of
// columns reads a run of each row, rows a row's length apart, and runs of 64 elements (two cache lines of 16-bit
// params) left the step waiting on memory (2048 × 2048 float16 SGD by columns, one thread: 7.7-8.2 ms per step with
// 64, 5.0-5.4 with 256).
constexpr int64_t kGroupBlockElements = 1 << 15;
constexpr int64_t kMinColumnGroups = 256;
constexpr int64_t kLargestColumnBlock = 1 << 22;
// The SGD and AdamW-lr steps (whole_width) take the column groups of a 16-bit tensor of at most kWholeWidthColumns
// columns in one block of them all, which reads the tensor in order where blocks of 256 columns read runs of 256,
// as long as the block's array (accumulation dtype) stays within kWholeWidthBytes (builds alternating, ms per step:
// 1024 × 768 and three each of 768 × 2304, 768 × 768, 768 × 3072 and 3072 × 768, 22M elements, those of 768 columns
// now whole: float16 SGD 25.8-25.9 → 19.3-20.8 at one thread, 15.3-16.0 → 12.5-12.9 at two; 3072 × 768 float16 SGD
// alone 2.2-2.4 → 1.2, at two threads 1.5-2.0 → 0.9-1.0 on one; 3072 × 1024 float16 SGD 3.4-3.7 → 1.8-2.4). Up to
// 1024 columns at first; up to 4096 since, which takes GPT-2's 768 × 2304 and 768 × 3072 whole too: in a model's
// step every tensor comes from memory, not from the caches as a tensor stepped alone does (GPT-2 small's matrices
// but its embedding by columns, 85.8M elements, builds alternating, ms per step: float16 SGD 157-172 → 127-130 at one
// thread, 89-92 → 68-72 at two; bfloat16 SGD 152-157 → 117 at one; float16 AdamW-lr 245-265 → 152-155 at one;
// 768 × 3072 float16 SGD alone 2.76-2.79 → 2.44-2.48). Larger blocks outgrew the caches (Adam's metric in one block,
// whose two arrays each take that many bytes: 4096 × 1024 float16, 16 MiB each, 12.5 → 26.7 ms; 3072 × 768 float64,
// 18 MiB each, 13.1 → 26.8). Adam's metric takes them on more than one thread only for a tensor of at most its
// share of the call's elements (see adamw_metric_blocks).
constexpr int64_t kWholeWidthColumns = 4096;
constexpr int64_t kWholeWidthBytes = 12 << 20;

// The blocks of groups of tensor t, whole groups each, sized by the shape (and, with whole_width, the accumulation
// dtype's size).
void add_group_blocks(const GroupShape& shape, int64_t t, bool whole_width, size_t acc_size,
                      std::vector<std::pair<int64_t, GroupBlock>>& blocks) {
  const int64_t per_group = shape.group_size();
  int64_t span = std::max<int64_t>(1, kGroupBlockElements / per_group);
  if (shape.inner == 1 && shape.outer > 1) {
    span = std::max(span, std::min(kMinColumnGroups, std::max<int64_t>(1, kLargestColumnBlock / per_group)));
    if (whole_width && shape.ngroups <= kWholeWidthColumns &&
        shape.ngroups * per_group * static_cast<int64_t>(acc_size) <= kWholeWidthBytes) {
      span = shape.ngroups;
    }
  }
  for (int64_t g0 = 0; g0 < shape.ngroups; g0 += span) {
    blocks.push_back({t, {shape.outer, shape.ngroups, shape.inner, g0, std::min(shape.ngroups, g0 + span)}});
  }
}

// Whole tensors of one group (1-D tensors under any grouping; any tensor by "tensor") of at most kPackLargest
// elements go in packs (GroupPack) of at most kPackTensors tensors and kGroupBlockElements elements, two or more
// each: one call of each group pass for the pack where a block of each tensor alone takes one per tensor, with
// every group's bits as in its block (a model's biases and norms' weights). 2,000 one-element float32 tensors with
// group lasso by tensor, one thread, builds alternating, 3 rounds, µs per step: ProxSGD 209-307 → 170-247, Adam's
// metric 419-482 → 270-370, AdamW prox="lr" 296-315 → 189-307 (each round faster); 300 of 768 elements: the same.
// One-element tensors' sums four at a time on a vector's lanes (pack_reduce), against one at a time: ProxSGD
// 279-298 → 156-214, Adam's metric 368-386 → 210-302, AdamW prox="lr" 240-312 → 176-273.
constexpr int64_t kPackLargest = 4096;
constexpr int64_t kPackTensors = 256;

class Packs {
 public:
  static bool packable(const at::Tensor& w, const GroupShape& shape) {
    return shape.ngroups == 1 && w.numel() <= kPackLargest;
  }

  // Tensor t (packable, not empty) to go in a pack.
  void offer(int64_t t, int64_t numel) { offered_.push_back({t, numel}); }

  // The packs of the tensors offered; a lone one to `lone(t)`.
  template <typename Lone>
  void close(Lone&& lone) {
    if (offered_.size() == 1) lone(offered_[0].first);
    if (offered_.size() < 2) return;
    int64_t in_pack = 0;
    for (const auto& [t, n] : offered_) {
      if (first_.empty() || in_pack == kPackTensors || elements_.back() + n > kGroupBlockElements) {
        first_.push_back(static_cast<int64_t>(tensors_.size()));
        elements_.push_back(0);
        in_pack = 0;
      }
      ++in_pack;
      tensors_.push_back(t);
      numels_.push_back(n);
      elements_.back() += n;
    }
    first_.push_back(static_cast<int64_t>(tensors_.size()));
  }

  int64_t size() const { return static_cast<int64_t>(elements_.size()); }
  int64_t elements(int64_t k) const { return elements_[k]; }
  int64_t count(int64_t k) const { return first_[k + 1] - first_[k]; }
  int64_t tensor(int64_t k, int64_t j) const { return tensors_[first_[k] + j]; }

  // Pack k's layout, with params[j] = param(tensor j) (offsets: count + 1, params: count).
  template <typename Param>
  GroupPack layout(int64_t k, int64_t* offsets, void** params, Param&& param) const {
    const int64_t c = count(k);
    offsets[0] = 0;
    for (int64_t j = 0; j < c; ++j) {
      offsets[j + 1] = offsets[j] + numels_[first_[k] + j];
      params[j] = param(tensor(k, j));
    }
    return {c, offsets, params};
  }

 private:
  std::vector<std::pair<int64_t, int64_t>> offered_;  // tensor, elements
  std::vector<int64_t> tensors_, numels_, first_, elements_;
};

const optim_cpu::GroupPasses& group_passes() {
#if defined(__x86_64__)
  if (cpu::active_isa() != cpu::Isa::kBaseline) return optim_cpu::fused::kGroupPasses;
#endif
  return optim_cpu::rounded_twice::kGroupPasses;
}

// The memory of the blocks' own arrays (BlockArrays), kept from step to step. An array of tens of MB from the C
// library comes as fresh pages at every step (a block that large is mapped anew, a smaller one may sit in memory the
// library gave back to the system) that the kernel faults in and zeroes at the first write: Adam's metric with group
// lasso over GPT-2 small's float64 params as whole tensors, one thread, took 150,772 page faults per step (its
// 50257 × 768 embedding one block, two arrays of 309 MB) and 880-950 ms, against 0 and 600-710 ms where the C library
// kept its memory (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11). So arrays of kPooled bytes or more that a step
// frees are kept and handed out again: the smallest held one that fits, if at most twice the size asked for (a small
// array does not take a large one that a later block needs). The pool holds at most twice as many bytes as the
// steps' arrays had in use at once (two param groups' steps of different sizes both find theirs), the longest held
// leaving first; REGFAST_CPU_SCRATCH_CACHE=0 turns it off.
class ScratchPool {
 public:
  static constexpr size_t kPooled = size_t{64} << 10;

  static ScratchPool& get() {
    static ScratchPool* pool = new ScratchPool();  // never destroyed: arrays may be freed during static destruction
    return *pool;
  }

  // An array of at least `bytes` bytes (64-byte aligned); its size in *size, to give back.
  void* take(size_t bytes, size_t* size) {
    *size = bytes;
    if (!enabled_ || bytes < kPooled) return fresh(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = by_size_.lower_bound(bytes);
      if (it != by_size_.end() && it->first / 2 <= bytes) {
        const Held held = *it->second;
        held_.erase(it->second);
        by_size_.erase(it);
        held_bytes_ -= held.size;
        *size = held.size;
        count_in_use(held.size);
        return held.ptr;
      }
    }
    void* const p = fresh(bytes);  // counted once it is there
    std::lock_guard<std::mutex> lock(mutex_);
    count_in_use(bytes);
    return p;
  }

  // An array from take(), with the size it gave, back to the pool (or to the system).
  void give(void* p, size_t size) {
    if (p == nullptr) return;
    if (!enabled_ || size < kPooled) {
      std::free(p);
      return;
    }
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= size;
      held_.push_back({p, size});
      by_size_.emplace(size, std::prev(held_.end()));
      held_bytes_ += size;
      while (held_bytes_ > 2 * peak_) {
        const Held oldest = held_.front();
        auto first = by_size_.lower_bound(oldest.size);
        while (first->second != held_.begin()) ++first;  // its entry is among those of its size
        by_size_.erase(first);
        held_.pop_front();
        held_bytes_ -= oldest.size;
        evicted.push_back(oldest.ptr);
      }
    }
    for (void* q : evicted) std::free(q);
  }

 private:
  struct Held {
    void* ptr;
    size_t size;
  };

  ScratchPool() {
    const char* env = std::getenv("REGFAST_CPU_SCRATCH_CACHE");
    enabled_ = env == nullptr || std::string(env) != "0";
  }

  void count_in_use(size_t bytes) {
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
  }

  static void* fresh(size_t bytes) {
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, 64, std::max<size_t>(bytes, 64)) == 0 && p != nullptr,
                "out of memory allocating ", bytes, " bytes for a step's arrays");
    return p;
  }

  std::mutex mutex_;
  std::list<Held> held_;                                        // longest held first
  std::multimap<size_t, std::list<Held>::iterator> by_size_;  // held_'s arrays by size
  size_t held_bytes_ = 0, in_use_ = 0, peak_ = 0;
  bool enabled_ = true;
};

// A block's own arrays, reused from block to block (and, through ScratchPool, from step to step) and never zeroed:
// every element is written before it is read.
class BlockArrays {
 public:
  BlockArrays() = default;
  BlockArrays(const BlockArrays&) = delete;
  BlockArrays& operator=(const BlockArrays&) = delete;
  ~BlockArrays() { ScratchPool::get().give(data_, size_); }

  char* get(size_t bytes) {
    if (bytes > size_) {
      ScratchPool& pool = ScratchPool::get();
      pool.give(data_, size_);
      data_ = nullptr;
      size_ = 0;
      data_ = static_cast<char*>(pool.take(bytes, &size_));
    }
    return data_;
  }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
};

// body(arrays, k) for every block k < n (size(k) its elements; a pack is a block here), on the intra-op threads,
// each with its own BlockArrays. On more than one thread the blocks go largest first, each thread taking the next
// from a shared count: a block is whole groups, so one group of a large tensor is one block (GPT-2 small's float64
// 50257 × 768 embedding as one group, a third of Adam's metric step), and at::parallel_for's contiguous halves of
// the list left that block and half the rest to one thread. Which thread runs a block does not change its bits; on
// one thread the blocks go in order.
template <typename Size, typename Body>
void largest_first(int64_t n, Size&& size, Body&& body) {
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (threads > 1) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return size(a) > size(b); });
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    BlockArrays arrays;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(arrays, order[i]);
    }
  });
}

// t's pointers moved to element `at` (elements of `elem` bytes, states of `acc` bytes).
AdamWTensor offset(const AdamWTensor& t, int64_t at, size_t elem, size_t acc) {
  const auto move = [&](auto* p, size_t size) { return p == nullptr ? p : static_cast<char*>(p) + at * size; };
  AdamWTensor out = t;
  out.param = move(static_cast<char*>(t.param), elem);
  out.grad = static_cast<const char*>(t.grad) + at * elem;
  out.exp_avg = move(static_cast<char*>(t.exp_avg), acc);
  out.exp_avg_sq = move(static_cast<char*>(t.exp_avg_sq), acc);
  out.max_exp_avg_sq = move(static_cast<char*>(t.max_exp_avg_sq), acc);
  return out;
}

// The scalars of an AdamW step with group lasso (AdamWArgs::group), prox "lr" or "preconditioned".
AdamWArgs adamw_group_args(at::ScalarType dtype, const std::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                           double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, double l1,
                           double l2, bool prox_lr) {
  const double step = lr_tensor.has_value() ? lr_value(*lr_tensor, acc_type(dtype)) : lr;
  AdamWArgs args = optim_cpu::adamw_args(dtype, step, lr_tensor.has_value(), beta1, beta2, eps, weight_decay,
                                         amsgrad, maximize, l1, l2, prox_lr, false);
  if (!prox_lr) args.prox = ProxMode::kPreconditioned;
  args.group = true;
  return args;
}

// Large tensors' passes over their elements in order (two_pass_group_steps, metric_passes): their rows in at most
// kColumnChunks chunks; tensors of at least kColumnPassesElements elements, which outgrow the caches; a single group
// as rows of kOneGroupLanes elements.
constexpr int64_t kColumnChunks = 64;
constexpr int64_t kColumnPassesElements = 1 << 22;
constexpr int64_t kOneGroupLanes = 64;

// Rows of a large tensor's passes (two_pass_group_steps, metric_passes) go in at most kColumnChunks chunks fixed by
// its shape, each summed in row order, the chunks' sums then added in order: the same bits for any thread count; a
// chunk goes a piece (about kGroupBlockElements elements, whole rows) at a time.
struct RowPieces {
  int64_t numel, cols, rows, piece_rows, per_chunk, chunks;

  RowPieces(int64_t n, int64_t c)
      : numel(n),
        cols(c),
        rows((n + c - 1) / c),
        piece_rows(std::max<int64_t>(1, kGroupBlockElements / c)),
        per_chunk(std::max((rows + kColumnChunks - 1) / kColumnChunks, piece_rows)),
        chunks((rows + per_chunk - 1) / per_chunk) {}

  int64_t piece() const { return piece_rows * cols; }  // a piece's elements at most

  // body(k, at, n, work) for each piece of chunk k (elements [at, at + n), whole rows of `cols` but for a short last
  // one), the chunks in parallel; `work` holds `arrays` arrays of piece() elements per thread.
  template <typename A, typename Body>
  void each(int arrays, Body&& body) const {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      BlockArrays buffer;
      A* const work = reinterpret_cast<A*>(buffer.get(static_cast<size_t>(arrays * piece()) * sizeof(A)));
      for (int64_t k = begin; k < end; ++k) {
        const int64_t last = std::min(rows, (k + 1) * per_chunk);
        for (int64_t r0 = k * per_chunk; r0 < last; r0 += piece_rows) {
          const int64_t at = r0 * cols;
          body(k, at, std::min(numel, std::min(last, r0 + piece_rows) * cols) - at, work);
        }
      }
    });
  }
};

// Per-chunk sums of `outputs` terms per column ([output][chunk][column]), and their totals per group: per column,
// the chunks in order; one group: every column's total then added in order.
class ColumnSums {
 public:
  ColumnSums(int outputs, int64_t chunks, int64_t cols, bool one_group)
      : chunks_(chunks), cols_(cols), one_group_(one_group), sums_(outputs * chunks * cols, 0.0) {}
  void chunk(int64_t k, double** out, int outputs) {
    for (int o = 0; o < outputs; ++o) out[o] = sums_.data() + (o * chunks_ + k) * cols_;
  }
  // Output o's largest per column over the chunks (NaN as soon as one is): float64 columns only (a float64 tensor as
  // one group stays in a block).
  std::vector<double> largest(int o) const {
    TORCH_INTERNAL_ASSERT(!one_group_, "the largest magnitudes are taken per column");
    const auto max_nan = [](double m, double x) { return (m < x || x != x) ? x : m; };
    std::vector<double> top(static_cast<size_t>(cols_), 0.0);
    for (int64_t k = 0; k < chunks_; ++k) {
      const double* part = sums_.data() + (o * chunks_ + k) * cols_;
      for (int64_t c = 0; c < cols_; ++c) top[c] = max_nan(top[c], part[c]);
    }
    return top;
  }

  std::vector<double> totals(int o) const {
    std::vector<double> total(static_cast<size_t>(cols_), 0.0);
    for (int64_t k = 0; k < chunks_; ++k) {
      const double* part = sums_.data() + (o * chunks_ + k) * cols_;
      for (int64_t c = 0; c < cols_; ++c) total[c] += part[c];
    }
    if (one_group_) {
      double all = 0;
      for (int64_t c = 0; c < cols_; ++c) all += total[c];
      std::fill(total.begin(), total.end(), all);
    }
    return total;
  }

 private:
  int64_t chunks_, cols_;
  bool one_group_;
  std::vector<double> sums_;
};

// The elements of a step's call that forms Adam's metric's floors from scales repeated (RepeatedScales).
constexpr int64_t kFloorRun = 4096;

// The step's calls over n elements seen as rows of `cols` from a row's start, each forming Adam's metric's floors
// from the columns' scales (AdamWTensor::floor_scale): kFloorRun elements a call (whole rows, at least one), the
// scales repeated for that many rows. each(n, f) calls f(e, m, fs) for elements [e, e + m).
class RepeatedScales {
 public:
  RepeatedScales(const double* scale, int64_t cols)
      : per_call_(std::max<int64_t>(1, kFloorRun / cols) * cols), data_(static_cast<size_t>(per_call_)) {
    for (int64_t k = 0; k < per_call_; ++k) data_[k] = scale[k % cols];
  }
  template <typename F>
  void each(int64_t n, F&& f) const {
    for (int64_t e = 0; e < n; e += per_call_) f(e, std::min(per_call_, n - e), data_.data());
  }

 private:
  int64_t per_call_;
  std::vector<double> data_;
};

// AdamW's step in Adam's metric with group lasso for a large tensor t (kColumnPassesElements or more) by columns,
// with more rows than kLargestColumnBlock / kMinColumnGroups (whose blocks would hold fewer than kMinColumnGroups
// columns and read a short run of each row, waiting on memory for each), or with float32 / 16-bit params as one
// group (the elements taken as rows of kOneGroupLanes; a one-group block would be the whole tensor on one thread,
// with arrays of its size). A is the accumulation dtype: float, or double for float64 params, whose group norms are
// scaled by each column's largest magnitude first (block_group_norms). Passes over the elements in order
// (RowPieces): the group norms of the params (the floors as group_floors forms them); the step (states updated) with
// ‖u_g‖² and Σ u_i²·a_i (metric_start); the vanishing test where a group is in doubt and each Newton step
// (metric_newton_step), each replaying the step from the states it left (AdamWArgs::replay: the same u and a, the
// grad not read); a last replay rounds u·t/(t + a) into the params. One more read of params and state per pass
// than the blocks, whose arrays come from the caches. One thread, float32 (ms per step, in passes against by
// blocks): 50257 × 768 by columns 121 against 182, 2048 × 2048 as one group 13 against 23; 2048 × 2048 by columns
// stays in blocks of 256 columns (16.7 against 10.4-10.8).
template <typename A>
void metric_passes(const at::Tensor& w, const AdamWTensor& ts, int64_t cols, bool one_group, const AdamWArgs& args,
                   const AdamWArgs& again, const optim_cpu::GroupPasses& passes, DType elem) {
  const RowPieces pieces(w.numel(), cols);
  const size_t elem_size = w.element_size();
  char* const params = static_cast<char*>(ts.param);
  const auto run = optim_cpu::loops().adamw;
  // The group norms as block_group_norms takes them: float64 groups scaled by their largest magnitude first.
  std::vector<double> largest;
  if constexpr (std::is_same_v<A, double>) {
    ColumnSums tops(1, pieces.chunks, cols, one_group);
    pieces.each<A>(0, [&](int64_t k, int64_t at, int64_t n, A*) {
      double* out[1];
      tops.chunk(k, out, 1);
      passes.column_largest(reinterpret_cast<const double*>(params) + at, n, cols, out[0]);
    });
    largest = tops.largest(0);
    for (auto& p : largest) p = p > 0 && std::isfinite(p) ? p : 1.0;
  }
  ColumnSums squares(1, pieces.chunks, cols, one_group);
  pieces.each<float>(1, [&](int64_t k, int64_t at, int64_t n, float* work) {
    double* out[1];
    squares.chunk(k, out, 1);
    passes.column_squares(elem, params + at * elem_size, n, cols, work, largest.empty() ? nullptr : largest.data(),
                          out[0]);
  });
  std::vector<double> norm = squares.totals(0), scale(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) {
    norm[c] = std::sqrt(norm[c]) * (largest.empty() ? 1.0 : largest[c]);
    if (norm[c] == 0) norm[c] = 1.0;
    scale[c] = ts.group_weight / norm[c];
  }
  // The step (or its replay) over [at, at + n), whole rows from a row's start: u and the thresholds into u and a.
  // Float32 / 16-bit params: the floors formed from the params as the step reads them (AdamWTensor::floor_scale;
  // each call kFloorRun elements or a row, their columns' scales repeated), the same bits as column_floors into a
  // first, which read the params alone and left the states to the step (GPT-2 small's 50257 × 768 embedding, one
  // thread, builds alternating, 3 rounds, ms per step: float32 by columns 258-266 → 198-203, bfloat16 as one group
  // 212-228 → 181-184); float64 ones (the floors divided by the norm) by column_floors first.
  std::optional<RepeatedScales> repeated;
  if constexpr (std::is_same_v<A, float>) repeated.emplace(scale.data(), cols);
  const auto step = [&](const AdamWArgs& how, int64_t at, int64_t n, A* u, A* a) {
    if constexpr (std::is_same_v<A, float>) {
      repeated->each(n, [&](int64_t e, int64_t m, const double* fs) {
        AdamWTensor seg = offset(ts, at + e, elem_size, sizeof(A));
        seg.group = a + e;
        seg.work = u + e;
        seg.floor_scale = fs;
        run(how, seg, 0, m, nullptr);
      });
    } else {
      passes.column_floors(elem, params + at * elem_size, scale.data(), norm.data(), ts.group_weight, n, cols, a);
      AdamWTensor seg = offset(ts, at, elem_size, sizeof(A));
      seg.group = a;
      seg.work = u;
      run(how, seg, 0, n, nullptr);
    }
  };
  const int64_t piece = pieces.piece();
  // Each pass: the step (replayed after the first), then its sums (stage: metric_sums).
  const auto sums_pass = [&](const AdamWArgs& how, int stage, int outputs, const double* at_t) {
    ColumnSums sums(outputs, pieces.chunks, cols, one_group);
    pieces.each<A>(2, [&](int64_t k, int64_t at, int64_t n, A* work) {
      step(how, at, n, work, work + piece);
      double* out[3];
      sums.chunk(k, out, outputs);
      passes.metric_sums(elem, stage, work, work + piece, at_t, n, cols, out);
    });
    return sums;
  };
  std::vector<double> tt(static_cast<size_t>(cols));
  std::vector<char> vanishes(static_cast<size_t>(cols));
  optim_cpu::metric_roots<A>(cols, [&](int stage, double* const (&s)[3], const double* at_t) {
    const int outputs = stage == 0 ? 2 : stage == 1 ? 1 : 3;
    const ColumnSums sums = sums_pass(stage == 0 ? args : again, stage, outputs, at_t);
    for (int o = 0; o < outputs; ++o) {
      const std::vector<double> total = sums.totals(o);
      std::copy(total.begin(), total.end(), s[o]);
    }
  }, tt.data(), vanishes.data());
  std::vector<A> root(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) root[c] = static_cast<A>(tt[c]);
  pieces.each<A>(2, [&](int64_t, int64_t at, int64_t n, A* work) {
    step(again, at, n, work, work + piece);
    passes.metric_apply(elem, work, work + piece, root.data(), vanishes.data(), n, cols, params + at * elem_size);
  });
}

// AdamW with prox="preconditioned" and group lasso (reference: adamw_step_ with penalty_gradient_scales and
// metric_prox_), one block of groups at a time, each in one visit to its params and state: the group terms of the
// floors from the params before the step (into the block's own array), the one-pass step over the block's runs (which
// floors Adam's denominator with them, applies the elementwise prox and leaves the new values and each element's group
// threshold in the block's arrays), then the Newton steps of the group shrink on those arrays, the results rounded into
// the params (small tensors of one group in packs: Packs); large tensors by long columns or as one group go by
// metric_passes. Over the contiguous tensors ws, from their pointers ts (whose group_weight it sets), with the step's
// scalars args (adamw_group_args).
void adamw_metric_blocks(const AdamWArgs& args, const TensorRefs& ws, std::vector<AdamWTensor>& ts,
                         double group_lasso, Grouping grouping) {
  const auto dtype = ws[0].scalar_type();
  const auto acc = acc_type(dtype);
  const auto& passes = group_passes();
  const DType elem = dtype_of(dtype);
  AdamWArgs again = args;  // the step once more from the moments as it left them (metric_passes)
  again.replay = true;
  // On one thread the column groups of a tensor within the whole-width limits go in one block of them all, as the
  // SGD and AdamW-lr steps take them (GPT-2's matrices as in add_group_blocks' comment, one thread, builds
  // alternating, ms per step: float16 49.8-51.1 → 43.2-45.2, float32 57.2-60.2 → 46.9-50.6, bfloat16 44.9-47.1 →
  // 45.7; 3072 × 1024 float16 alone 8.0-8.4 → 6.1-6.6). On more threads a tensor in one block is computed by one
  // thread: a tensor alone is then slower (3072 × 1024 float16, two threads: 4.7-5.0 → 6.8-7.3; 768 × 3072 5.1-5.4 →
  // 8.0-8.3), a model's many tensors faster (GPT-2 small's matrices but its embedding by columns, two threads, builds
  // alternating, ms per step: float16 224-232 → 165-168, float32 240-249 → 174-176), so there only a tensor of at
  // most 1 / threads of the call's elements goes whole. The results do not depend on a block's width: each
  // column's sums add its rows in order (group_reduce), a column's lane rounds alike in a vector and in the scalar
  // tail, every other step is per element or per group, and the block's flags (a group in doubt, one still
  // stepping) only decide whether a pass runs, each group keeping its own state.
  const int64_t threads = at::get_num_threads();
  int64_t call_elements = 0;
  for (const auto& w : ws) call_elements += w.numel();
  const size_t elem_size = c10::elementSize(dtype), acc_size = c10::elementSize(acc);
  std::vector<std::pair<int64_t, GroupBlock>> blocks;
  Packs packs;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    if (w.numel() == 0) continue;
    const GroupShape shape = group_shape(w, grouping);
    ts[i].group_weight = group_lasso * std::sqrt(static_cast<double>(shape.group_size()));
    const bool large = w.numel() >= kColumnPassesElements;
    const auto passes_of = [&](int64_t cols, bool one_group) {
      if (acc == at::kDouble) {
        metric_passes<double>(w, ts[i], cols, one_group, args, again, passes, elem);
      } else {
        metric_passes<float>(w, ts[i], cols, one_group, args, again, passes, elem);
      }
    };
    // A float64 tensor as one group stays in one block: in passes, each replaying the step from three float64
    // arrays, it measured slower at one thread and about the same at two (GPT-2 small's float64 params as whole
    // tensors, builds alternating, ms per step: one thread 630-734 in a block, 837-927 in passes; two threads 630-665
    // and 592-598); by columns the passes are faster (one thread 1390-1578 → 1077-1104, two 973-1181 → 560-575).
    if (large && shape.ngroups == 1 && acc != at::kDouble) {
      passes_of(kOneGroupLanes, true);
    } else if (large && shape.inner == 1 && shape.outer * kMinColumnGroups > kLargestColumnBlock) {
      passes_of(shape.ngroups, false);
    } else if (Packs::packable(w, shape)) {
      packs.offer(static_cast<int64_t>(i), w.numel());
    } else {
      const bool whole_width = threads == 1 || w.numel() * threads <= call_elements;
      add_group_blocks(shape, static_cast<int64_t>(i), whole_width, acc_size, blocks);
    }
  }
  packs.close([&](int64_t t) { add_group_blocks(group_shape(ws[t], grouping), t, true, acc_size, blocks); });
  const auto run = optim_cpu::loops().adamw;
  const auto nblocks = static_cast<int64_t>(blocks.size());
  const auto size = [&](int64_t k) {
    if (k >= nblocks) return packs.elements(k - nblocks);
    const GroupBlock& b = blocks[k].second;
    return b.outer * (b.g1 - b.g0) * b.inner;
  };
  largest_first(nblocks + packs.size(), size, [&](BlockArrays& arrays, int64_t k) {
    if (k >= nblocks) {  // a pack: its tensors one after another in the arrays
      const int64_t p = k - nblocks, count = packs.count(p), elements = packs.elements(p);
      GroupArray<int64_t> offsets(count + 1);
      GroupArray<void*> params(count);
      GroupArray<double> weight(count);
      const GroupPack pack = packs.layout(p, offsets.data(), params.data(), [&](int64_t t) { return ts[t].param; });
      for (int64_t j = 0; j < count; ++j) weight[j] = ts[packs.tensor(p, j)].group_weight;
      char* const group = arrays.get(2 * elements * acc_size);
      char* const work = group + elements * acc_size;
      passes.pack_floors(elem, pack, weight.data(), group);
      for (int64_t j = 0; j < count; ++j) {
        AdamWTensor run_t = ts[packs.tensor(p, j)];
        run_t.group = group + offsets[j] * acc_size;
        run_t.work = work + offsets[j] * acc_size;
        run(args, run_t, 0, offsets[j + 1] - offsets[j], nullptr);
      }
      passes.pack_metric_shrink(elem, work, group, pack);
      return;
    }
    const AdamWTensor& t = ts[blocks[k].first];
    const GroupBlock& b = blocks[k].second;
    const int64_t span = (b.g1 - b.g0) * b.inner;
    char* const group = arrays.get(2 * b.outer * span * acc_size);
    char* const work = group + b.outer * span * acc_size;
    // Column groups, or one group, of float32 / 16-bit params: the floors formed by the step from each group's
    // weight / ‖w_g‖ (AdamWTensor::floor_scale: a row of the block a call, or kFloorRun elements of the one group
    // with its scale repeated), the same bits as group_floors' floors read from the block's array, one pass over the
    // block fewer (GPT-2 small's matrices but the embedding, one thread, builds alternating, 3 rounds, ms per step: by
    // columns float32 304-311 → 277-284, bfloat16 271-295 → 259-267; as whole tensors float32 307-315 → 283-295,
    // bfloat16 267-275 → 264-274).
    const int64_t ng = b.g1 - b.g0;
    const bool scaled = acc == at::kFloat && (b.inner == 1 || ng == 1);
    GroupArray<double> scales(scaled ? ng : 0);
    passes.group_floors(elem, t.param, group, b, t.group_weight, scaled ? scales.data() : nullptr);
    // A row of column groups a call (cols = ng), or one group's run with its scale repeated (cols = 1).
    std::optional<RepeatedScales> repeated;
    if (scaled) repeated.emplace(scales.data(), b.inner == 1 ? ng : 1);
    for (int64_t o = 0; o < b.outer; ++o) {
      const auto call = [&](int64_t e, int64_t m, const double* fs) {
        AdamWTensor run_t = offset(t, (o * b.ngroups + b.g0) * b.inner + e, elem_size, acc_size);
        run_t.group = group + (o * span + e) * acc_size;
        run_t.work = work + (o * span + e) * acc_size;
        run_t.floor_scale = fs;
        run(args, run_t, 0, m, nullptr);
      };
      if (repeated) {
        repeated->each(span, call);
      } else {
        call(0, span, nullptr);
      }
    }
    passes.metric_shrink(elem, work, group, t.param, b);
  });
}

// The column groups of a large 16-bit tensor t ([outer, ngroups, 1] with at least kColumnChunks rows: groups a
// row's length apart), or its one group (groups "tensor", a 1-D tensor), in two passes over its elements in order,
// where blocks of columns would read a short run of each row (and wait on memory for each) and a one-group block
// would be the whole tensor on one thread (with arrays of its size): the first pass steps (states updated) and
// sums the squares of the unrounded new values per column (one group: per lane of kOneGroupLanes, the elements
// taken as rows of that many); the second steps again from the updated states (step(..., replay = true) computes
// the same values, writing no state), shrinks each group by prox_'s factor max(0, 1 − step·gl·√|g| / ‖u_g‖) and
// rounds into the params. Rows go in chunks fixed by the shape (at most kColumnChunks, each summed piece by piece
// (RowPieces), a piece's rows in order by the group passes' column_squares (the variant's vectors), the pieces' sums
// added in order, then the chunks' sums in order; one group's lanes then added in order): the same bits for any
// thread count. Costs one more read of the param and state (and SGD's grad, with Nesterov's momentum or none) than one
// pass: taken for tensors of at least kColumnPassesElements elements, which outgrow the caches (GPT-2 small's shapes
// in float16, SGD by columns, one thread: 160-170 → 45-47 ms per step; bfloat16 54-66 → 41-42), not for smaller
// ones, whose blocks of columns come from the caches (768 × 3072 float16: 1.6-2.1 ms by blocks, 2.3-2.6 in two
// passes), nor for a few long rows, whose blocks read long runs.
template <typename Step>
void two_pass_group_steps(const at::Tensor& w, void* data, int64_t t, int64_t cols, bool one_group,
                          double shrink_step, double group_lasso, DType elem, const optim_cpu::GroupPasses& passes,
                          Step& step) {
  using A = float;
  const RowPieces pieces(w.numel(), cols);  // the last row short for one group
  ColumnSums sums(1, pieces.chunks, cols, one_group);
  pieces.each<A>(1, [&](int64_t k, int64_t at, int64_t n, A* work) {
    step(t, at, n, work, false);
    double* out[1];
    sums.chunk(k, out, 1);
    passes.column_squares(DType::kFloat, work, n, cols, nullptr, nullptr, out[0]);  // the variant's vectors
  });
  // prox_'s group factors (as prox_pass) from the group norms.
  const std::vector<double> totals = sums.totals(0);
  const int64_t group_size = one_group ? pieces.numel : pieces.rows;
  const double coef = shrink_step * group_lasso * std::sqrt(static_cast<double>(group_size));
  std::vector<A> factor(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) factor[c] = group_shrink_factor<A>(std::sqrt(totals[c]), coef);
  char* const params = static_cast<char*>(data);
  const size_t elem_size = w.element_size();
  pieces.each<A>(1, [&](int64_t, int64_t at, int64_t n, A* work) {
    step(t, at, n, work, true);
    passes.column_scale_round(elem, work, factor.data(), n, cols, params + at * elem_size);
  });
}

// The most memory asked for ahead of a block (LinesAhead): a block's param, grad and momentum in 16 bits and float
// (kGroupBlockElements elements of 8 bytes), cache lines of 64 bytes. Not asked for below kAheadFrom elements in
// blocks (32 MB at 8 bytes each), whose memory a large L3 cache still holds from the step before: asking for lines
// already in the caches costs more than it gives (float16 SGD by rows, one thread, ms per step: 1024 × 512 0.24-0.25
// → 0.29-0.30; 2048 × 1024 1.0-1.2 either way; 4096 × 2048 8.9-9.9 → 6.4-7.1).
constexpr int64_t kLinesAhead = kGroupBlockElements * 8 / 64;
constexpr int64_t kAheadFrom = 1 << 22;

// A step with group lasso and the scalar prox step (SGD, AdamW with prox="lr"), one block of groups at a time, each in
// one visit to its params and state: step(t, at, n, work, false) runs the one-pass step (the elementwise prox included)
// over n elements of tensor t from element `at`, its new values into `work`; then the group shrink with step lr/(1 +
// 2·lr·l2) on the block's array (reference: prox_step_ after the step), rounded into the params. Column groups and
// single groups of large 16-bit params go by two_pass_group_steps; small tensors of one group in packs (Packs: their
// steps one after another into the pack's array, then one shrink of them all). For 16-bit params, ahead(t, at, n,
// lines) adds the memory the step of those elements reads to `lines`, and the shrink of each block asks for the next
// block's when that block is one run of elements (rows, a whole tensor; at most kLinesAhead lines): the step and the
// shrink otherwise take turns on one core, the memory idle during the shrink (50257 × 768 float16 SGD by rows, one
// thread, builds alternating: 36-42 → 27-33 ms per step). Float32 params, whose blocks take half as much again,
// measured slower with it and do not ask; nor does AdamW (its `ahead` adds nothing), slower with it too.
template <typename Step, typename Ahead>
void blockwise_group_steps(const TensorRefs& ws, const std::vector<void*>& data, Grouping grouping,
                           double shrink_step, double group_lasso, Step&& step, Ahead&& ahead) {
  const auto dtype = ws[0].scalar_type();
  const auto acc = acc_type(dtype);
  const size_t acc_size = c10::elementSize(acc);
  const DType elem = dtype_of(dtype);
  const auto& passes = group_passes();
  const bool narrow = acc != dtype;
  std::vector<std::pair<int64_t, GroupBlock>> blocks;
  Packs packs;
  for (size_t i = 0; i < ws.size(); ++i) {
    if (ws[i].numel() == 0) continue;
    const GroupShape shape = group_shape(ws[i], grouping);
    const bool large = narrow && ws[i].numel() >= kColumnPassesElements;
    if (large && shape.ngroups == 1) {
      two_pass_group_steps(ws[i], data[i], static_cast<int64_t>(i), kOneGroupLanes, true, shrink_step, group_lasso,
                           elem, passes, step);
    } else if (large && shape.inner == 1 && shape.outer >= kColumnChunks) {
      two_pass_group_steps(ws[i], data[i], static_cast<int64_t>(i), shape.ngroups, false, shrink_step, group_lasso,
                           elem, passes, step);
    } else if (Packs::packable(ws[i], shape)) {
      packs.offer(static_cast<int64_t>(i), ws[i].numel());
    } else {
      add_group_blocks(shape, static_cast<int64_t>(i), true, acc_size, blocks);
    }
  }
  packs.close([&](int64_t t) { add_group_blocks(group_shape(ws[t], grouping), t, true, acc_size, blocks); });
  int64_t in_blocks = 0;
  for (const auto& [t, b] : blocks) in_blocks += b.outer * (b.g1 - b.g0) * b.inner;
  const bool ask_ahead = narrow && in_blocks >= kAheadFrom;
  const auto nblocks = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, nblocks + packs.size(), 1, [&](int64_t begin, int64_t end) {
    BlockArrays arrays;
    for (int64_t k = begin; k < end; ++k) {
      if (k >= nblocks) {  // a pack: its tensors' steps one after another in the array, then their shrinks
        const int64_t p = k - nblocks, count = packs.count(p);
        GroupArray<int64_t> offsets(count + 1);
        GroupArray<void*> params(count);
        const GroupPack pack = packs.layout(p, offsets.data(), params.data(), [&](int64_t t) { return data[t]; });
        char* const work = arrays.get(packs.elements(p) * acc_size);
        for (int64_t j = 0; j < count; ++j) {
          step(packs.tensor(p, j), 0, offsets[j + 1] - offsets[j], work + offsets[j] * acc_size, false);
        }
        passes.pack_group_shrink(elem, work, pack, shrink_step * group_lasso);
        continue;
      }
      const int64_t t = blocks[k].first;
      const GroupBlock& b = blocks[k].second;
      const int64_t span = (b.g1 - b.g0) * b.inner;
      char* const work = arrays.get(b.outer * span * acc_size);
      for (int64_t o = 0; o < b.outer; ++o) {
        step(t, (o * b.ngroups + b.g0) * b.inner, span, work + o * span * acc_size, false);
      }
      optim_cpu::LinesAhead lines;
      if (ask_ahead && k + 1 < std::min(end, nblocks) && blocks[k + 1].second.outer == 1) {
        const GroupBlock& next = blocks[k + 1].second;
        ahead(blocks[k + 1].first, next.g0 * next.inner, (next.g1 - next.g0) * next.inner, lines);
        lines.limit(kLinesAhead);
      }
      passes.group_shrink(elem, work, data[t], b, shrink_step * group_lasso,
                          lines.total > 0 ? &lines : nullptr);
    }
  });
}

// The group shrink's step lr/(1 + 2·lr·l2) as the reference computes it: in double from a float lr, in the
// accumulation dtype from a tensor one.
double group_shrink_step(const std::optional<at::Tensor>& lr_tensor, double lr, double l2, at::ScalarType acc) {
  if (!lr_tensor.has_value()) return l2 != 0 ? lr / (1 + 2 * lr * l2) : lr;
  at::Tensor step = lr_tensor->to(at::kCPU, acc);
  if (l2 != 0) step = step / step.mul(2).mul(l2).add(1);
  return step.item<double>();
}

// Whether the steps with group lasso and the scalar prox step go block by block (blockwise_group_steps): for 16-bit
// params, whose steps otherwise round float copies back; for float32 / float64 params where every group's elements
// are contiguous and a group fits in the caches. Other groups of float32 / float64 params (columns, a whole large
// tensor) are stepped in place and then shrunk by prox_'s group passes: both stream through whole rows with every
// thread, where a block of columns reads a short run of each row and a block of one large group has one thread.
constexpr int64_t kBlockwiseLargestGroup = 1 << 16;

bool blockwise(at::TensorList params, Grouping grouping) {
  if (acc_type(params[0].scalar_type()) != params[0].scalar_type()) return true;
  return std::all_of(params.begin(), params.end(), [&](const at::Tensor& t) {
    if (t.numel() == 0) return true;
    const GroupShape shape = group_shape(t, grouping);
    return shape.outer == 1 && shape.group_size() <= kBlockwiseLargestGroup;
  });
}

// The data pointers of ts's params.
template <typename Tensor>
std::vector<void*> param_data(const std::vector<Tensor>& ts) {
  std::vector<void*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) out[i] = ts[i].param;
  return out;
}

// SGD with group lasso over the contiguous tensors ws from their pointers ts (blockwise_group_steps).
void sgd_group_blocks(const SgdArgs& args, const TensorRefs& ws, const std::vector<SgdTensor>& ts,
                      double shrink_step, double group_lasso, Grouping grouping) {
  SgdArgs again = args;  // the step once more from the buffers as it left them (two_pass_group_steps)
  if (again.momentum_mode != Momentum::kNone) {
    again.momentum_mode = args.nesterov ? Momentum::kReplay : Momentum::kReplayBuffer;  // without Nesterov, no grad
  }
  const auto run = optim_cpu::loops().sgd;
  const auto dtype = ws[0].scalar_type();
  const size_t elem = c10::elementSize(dtype), acc_size = c10::elementSize(acc_type(dtype));
  // Tensor t's param, grad and momentum from element `at`.
  const auto segment = [&](int64_t t, int64_t at, void* work) {
    return SgdTensor{static_cast<char*>(ts[t].param) + at * elem, static_cast<const char*>(ts[t].grad) + at * elem,
                     ts[t].buffer == nullptr ? nullptr : static_cast<char*>(ts[t].buffer) + at * acc_size, work};
  };
  blockwise_group_steps(ws, param_data(ts), grouping, shrink_step, group_lasso,
                        [&](int64_t t, int64_t at, int64_t n, void* work, bool replay) {
                          run(replay ? again : args, segment(t, at, work), 0, n, nullptr);
                        },
                        [&](int64_t t, int64_t at, int64_t n, optim_cpu::LinesAhead& lines) {
                          const SgdTensor seg = segment(t, at, nullptr);
                          lines.add(seg.param, n * elem);
                          lines.add(seg.grad, n * elem);
                          lines.add(seg.buffer, n * acc_size);  // null without momentum: nothing added
                        });
}

// SGD with group lasso: see blockwise_group_steps. Params and state are checked.
at::Tensor sgd_group(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                     double group_lasso, c10::string_view groups, bool compute_penalty) {
  const Grouping grouping = parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto dtype = params[0].scalar_type();
  const auto acc = acc_type(dtype);
  const double step = lr_tensor.has_value() ? lr_value(*lr_tensor, acc) : lr;
  const SgdArgs args = optim_cpu::sgd_args(dtype, step, lr_tensor.has_value(), momentum, dampening, nesterov,
                                           weight_decay, maximize, init_buffers, l1, l2, false);
  const SgdTable tb = sgd_table(params, grads, momentum != 0 ? momentum_buffers : at::TensorList());
  sgd_group_blocks(args, tb.ws, tb.ts, group_shrink_step(lr_tensor, lr, l2, acc), group_lasso, grouping);
  write_back(params, tb.ws);
  if (!tb.bs.empty()) write_back(momentum_buffers, tb.bs);
  if (compute_penalty) return call_penalty(params, l1, l2, group_lasso, groups);
  return at::zeros({}, params[0].options().dtype(acc));
}

// AdamW with prox="lr" and group lasso over the contiguous tensors ws from their pointers ts
// (blockwise_group_steps).
void adamw_lr_blocks(const AdamWArgs& args, const TensorRefs& ws, const std::vector<AdamWTensor>& ts,
                     double shrink_step, double group_lasso, Grouping grouping) {
  AdamWArgs again = args;  // the step once more from the moments as it left them (two_pass_group_steps)
  again.replay = true;
  const auto run = optim_cpu::loops().adamw;
  const auto dtype = ws[0].scalar_type();
  const size_t elem = c10::elementSize(dtype), acc_size = c10::elementSize(acc_type(dtype));
  blockwise_group_steps(ws, param_data(ts), grouping, shrink_step, group_lasso,
                        [&](int64_t t, int64_t at, int64_t n, void* work, bool replay) {
                          AdamWTensor seg = offset(ts[t], at, elem, acc_size);
                          seg.work = work;
                          run(replay ? again : args, seg, 0, n, nullptr);
                        },
                        [](int64_t, int64_t, int64_t, optim_cpu::LinesAhead&) {});
}

// AdamW with group lasso after the op's table: in Adam's metric (adamw_metric_blocks) or with the scalar prox step
// (adamw_lr_blocks, where blockwise). Params and state are checked.
at::Tensor adamw_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool amsgrad, bool maximize, double l1, double l2, double group_lasso,
                       c10::string_view groups, bool prox_lr, bool compute_penalty) {
  const Grouping grouping = parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto dtype = params[0].scalar_type();
  const auto acc = acc_type(dtype);
  const AdamWArgs args = adamw_group_args(dtype, lr_tensor, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                          l1, l2, prox_lr);
  AdamWTable tb =
      adamw_table(args, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2);
  if (prox_lr) {
    adamw_lr_blocks(args, tb.ws, tb.ts, group_shrink_step(lr_tensor, lr, l2, acc), group_lasso, grouping);
  } else {
    adamw_metric_blocks(args, tb.ws, tb.ts, group_lasso, grouping);
  }
  write_back_adamw(tb, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  if (compute_penalty) return call_penalty(params, l1, l2, group_lasso, groups);
  return at::zeros({}, params[0].options().dtype(acc));
}

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        const std::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                        bool nesterov, double weight_decay, bool maximize, bool init_buffers, double l1, double l2,
                        double group_lasso, c10::string_view groups, bool compute_penalty) {
  check_params_and_grads(params, grads);
  if (momentum != 0) check_state(momentum_buffers, params, "momentum_buffers");
  if (group_lasso == 0) {
    return sgd_fused(params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov, weight_decay,
                     maximize, init_buffers, l1, l2, compute_penalty);
  }
  if (blockwise(params, parse_grouping(groups))) {
    return sgd_group(params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov, weight_decay,
                     maximize, init_buffers, l1, l2, group_lasso, groups, compute_penalty);
  }
  return step_then_group_shrink(
      params, grads,
      [&](at::TensorList ps, at::TensorList gs) {
        sgd_fused(ps, gs, momentum_buffers, lr_tensor, lr, momentum, dampening, nesterov, weight_decay, maximize,
                  init_buffers, l1, l2, false);
      },
      lr_tensor, lr, l1, l2, group_lasso, groups, compute_penalty);
}

at::Tensor adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                          const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                          double eps, double weight_decay, bool amsgrad, bool maximize, double l1, double l2,
                          double group_lasso, c10::string_view groups, c10::string_view prox, bool compute_penalty) {
  check_params_and_grads(params, grads);
  check_state(exp_avgs, params, "exp_avgs");
  check_state(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) check_state(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size(), "steps and params differ in length");
  TORCH_CHECK(prox == "lr" || prox == "preconditioned", "prox must be 'lr' or 'preconditioned', got '",
              std::string(prox), "'");
  if (group_lasso == 0) {
    return adamw_fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                       weight_decay, amsgrad, maximize, l1, l2, prox, compute_penalty);
  }
  if (prox == "preconditioned") {
    return adamw_group(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                       weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, false, compute_penalty);
  }
  if (blockwise(params, parse_grouping(groups))) {
    return adamw_group(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                       weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, true, compute_penalty);
  }
  return step_then_group_shrink(
      params, grads,
      [&](at::TensorList ps, at::TensorList gs) {
        adamw_fused(ps, gs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr, beta1, beta2, eps,
                    weight_decay, amsgrad, maximize, l1, l2, prox, false);
      },
      lr_tensor, lr, l1, l2, group_lasso, groups, compute_penalty);
}

}  // namespace

namespace optim_cpu {

at::Tensor sgd_group_step(const SgdArgs& args, const TensorRefs& params, const TensorRefs& grads,
                          const std::vector<SgdTensor>& ts, double lr, double l1, double l2, double group_lasso,
                          c10::string_view groups, bool compute_penalty) {
  const Grouping grouping = parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc = acc_type(params[0].scalar_type());
  if (!blockwise(params, grouping)) {
    return step_then_group_shrink(
        params, grads,
        [&](at::TensorList ps, at::TensorList gs) {  // the params themselves (contiguous float32 / float64)
          std::vector<SgdTensor> at(ts.size());
          for (size_t i = 0; i < ts.size(); ++i) at[i] = {ps[i].data_ptr(), gs[i].const_data_ptr(), ts[i].buffer};
          run_sgd(args, at, cpu::numels_of(ps), acc, l1, l2);
        },
        std::nullopt, lr, l1, l2, group_lasso, groups, compute_penalty);
  }
  sgd_group_blocks(args, params, ts, group_shrink_step(std::nullopt, lr, l2, acc), group_lasso, grouping);
  if (compute_penalty) return call_penalty(params, l1, l2, group_lasso, groups);
  return at::Tensor();
}

at::Tensor adamw_group_step(const AdamWArgs& args, const TensorRefs& params, const TensorRefs& grads,
                            std::vector<AdamWTensor>& ts, bool prox_lr, double lr, double l1, double l2,
                            double group_lasso, c10::string_view groups, bool compute_penalty) {
  const Grouping grouping = parse_grouping(groups);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc = acc_type(params[0].scalar_type());
  AdamWArgs grouped = args;  // as adamw_group_args makes them
  grouped.group = true;
  if (!prox_lr) {
    grouped.prox = ProxMode::kPreconditioned;
    adamw_metric_blocks(grouped, params, ts, group_lasso, grouping);
  } else if (blockwise(params, grouping)) {
    adamw_lr_blocks(grouped, params, ts, group_shrink_step(std::nullopt, lr, l2, acc), group_lasso, grouping);
  } else {
    return step_then_group_shrink(
        params, grads,
        [&](at::TensorList ps, at::TensorList gs) {  // the params themselves (contiguous float32 / float64)
          std::vector<AdamWTensor> at = ts;
          for (size_t i = 0; i < ts.size(); ++i) {
            at[i].param = ps[i].data_ptr();
            at[i].grad = gs[i].const_data_ptr();
          }
          run_adamw(args, at, cpu::numels_of(ps), acc, l1, l2);
        },
        std::nullopt, lr, l1, l2, group_lasso, groups, compute_penalty);
  }
  if (compute_penalty) return call_penalty(params, l1, l2, group_lasso, groups);
  return at::Tensor();
}

}  // namespace optim_cpu

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
}

}  // namespace regfast
