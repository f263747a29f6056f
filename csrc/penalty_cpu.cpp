// CPU implementations of regfast_C::penalty, penalty_backward and add_penalty_grad_: the value from
// per-tensor and group norms, the gradient in one pass that also sums |w| and w² for the value.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "cpu_ops.h"
#include "cpu_passes.h"
#include "elementwise.h"
#include "groups.h"
#include "tensor_list.h"

namespace regfast {
namespace {

void check_params(at::TensorList params) { check_group(params, "params", c10::kCPU); }

at::Tensor penalty_cpu(at::TensorList params, double l1, double l2, double gl, c10::string_view groups) {
  check_params(params);
  return cpu_ops::penalty(params, l1, l2, gl, parse_grouping(groups));
}

std::vector<at::Tensor> penalty_backward_cpu(const at::Tensor& grad, at::TensorList params, double l1, double l2,
                                             double gl, c10::string_view groups) {
  check_params(params);
  return cpu_ops::penalty_backward(grad, params, l1, l2, gl, parse_grouping(groups));
}

}  // namespace

at::Tensor cpu_ops::penalty(at::TensorList params, double l1, double l2, double gl, Grouping grouping) {
  const auto ws = contiguous_all(params);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_cpu", [&] {
    using A = acc_t<scalar_t>;
    A v = 0;
    if (l1 != 0 || l2 != 0) {
      std::vector<A> v1, v2;
      cpu::passes<scalar_t>().tensor_norms(ws, v1, v2);
      A s1 = 0, s2 = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        s1 += v1[t];
        s2 += v2[t];
      }
      if (l1 != 0) v += static_cast<A>(l1) * s1;
      if (l2 != 0) v += static_cast<A>(l2) * s2;
    }
    if (gl != 0) {
      const auto shapes = shapes_of(ws, grouping);
      std::vector<int64_t> offsets;
      const auto norms = cpu::passes<scalar_t>().group_norms(ws, shapes, offsets);
      double term = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        if (ws[t].numel() == 0) continue;
        const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
        for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) term += root * norms[g];
      }
      v += static_cast<A>(gl * term);
    }
    value = static_cast<double>(v);
  });
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

namespace {

// The gradients penalty_backward returns: one fresh tensor per param, every call. A block above glibc's mmap
// threshold is mapped anew on every call, and one below it often sits in heap memory that glibc gave back to the
// system at the last free: either way fresh pages that the kernel faults in and zeroes on first write, which costs
// more than the gradient pass itself. So outputs of kLarge bytes or more come from OutputCache: blocks that earlier
// outputs freed (a step's grads, set to None or summed into .grad) are handed out again with their pages still
// mapped, matched by size. It holds freed blocks up to the bytes of the largest call's large outputs (one call's
// worth; the longest-held leave first); REGFAST_CPU_OUTPUT_CACHE=0 turns it off.
class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kLarge = size_t{64} << 10;

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: outputs may outlive static destruction
    return *cache;
  }

  bool enabled() const { return enabled_; }

  // A call's large outputs total `bytes`: the cache may hold that much.
  void expect(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = std::max(limit_, bytes);
  }

  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently freed block of that size.
      const auto it = by_size_.find(n);
      if (it != by_size_.end() && !it->second.empty()) {
        const auto block = it->second.back();
        it->second.pop_back();
        p = block->ptr;
        held_ -= n;
        free_.erase(block);
      }
    }
    if (p == nullptr) p = fresh(n);
    return {p, new Block{p, n}, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  OutputCache() {
    const char* env = std::getenv("REGFAST_CPU_OUTPUT_CACHE");
    enabled_ = env == nullptr || std::string(env) != "0";
  }

  // A new block (its pages are faulted in by the first write; asking for transparent huge pages instead made
  // that first write several times slower here, the kernel compacting memory to find them).
  static void* fresh(size_t n) {
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, 64, n) == 0 && p != nullptr, "penalty_backward: out of memory allocating ", n,
                " bytes");
    return p;
  }

  // A freed output's block joins the cache; the longest-held blocks leave it (back to the system) while it holds
  // more than the limit.
  static void give_back(void* ctx) {
    std::unique_ptr<Block> block(static_cast<Block*>(ctx));
    OutputCache& cache = get();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.free_.push_back(*block);
      cache.by_size_[block->bytes].push_back(std::prev(cache.free_.end()));
      cache.held_ += block->bytes;
      while (cache.held_ > cache.limit_ && !cache.free_.empty()) {
        const Block& oldest = cache.free_.front();
        evicted.push_back(oldest.ptr);
        cache.held_ -= oldest.bytes;
        cache.by_size_[oldest.bytes].pop_front();  // the oldest block of its size too
        cache.free_.pop_front();
      }
    }
    for (void* p : evicted) std::free(p);
  }

  std::mutex mutex_;
  std::list<Block> free_;  // oldest first
  std::unordered_map<size_t, std::deque<std::list<Block>::iterator>> by_size_;  // free_'s blocks by size, oldest first
  size_t held_ = 0, limit_ = 0;
  bool enabled_ = true;
};

// The outputs of penalty_backward: contiguous tensors of each param's shape and dtype, the large ones from
// OutputCache.
std::vector<at::Tensor> fresh_outputs(const std::vector<at::Tensor>& ws) {
  OutputCache& cache = OutputCache::get();
  size_t large = 0;  // bytes of this call's outputs from the cache: it may hold that much once they are freed
  std::vector<at::Tensor> outs;
  outs.reserve(ws.size());
  for (const auto& w : ws) {
    if (cache.enabled() && w.nbytes() >= OutputCache::kLarge) {
      large += w.nbytes();
      outs.push_back(at::detail::empty_generic(w.sizes(), &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                               w.scalar_type(), at::MemoryFormat::Contiguous));
    } else {
      outs.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
    }
  }
  if (large > 0) cache.expect(large);
  return outs;
}

at::Tensor add_penalty_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2, double gl,
                                c10::string_view groups) {
  check_params(params);
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  const Grouping grouping = parse_grouping(groups);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].device() == params[i].device(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
  }
  const auto gs = contiguous_all(grads);
  at::Tensor value = cpu_ops::add_penalty_grad(params, gs, l1, l2, gl, grouping);
  write_back(grads, gs);
  return value;
}

}  // namespace

std::vector<at::Tensor> cpu_ops::penalty_backward(const at::Tensor& grad, at::TensorList params, double l1,
                                                 double l2, double gl, Grouping grouping) {
  const auto ws = contiguous_all(params);
  std::vector<at::Tensor> outs = fresh_outputs(ws);
  const double mult = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_backward_cpu",
                                  [&] {
                                    if (l1 == 0 && l2 == 0 && gl == 0) {
                                      for (auto& o : outs) o.zero_();
                                    } else {
                                      cpu::passes<scalar_t>().grad_pass(ws, outs, false, l1, l2, gl, grouping, mult);
                                    }
                                  });
  // Results take the layout of their param, like the fake kernel's empty_like.
  for (size_t i = 0; i < outs.size(); ++i) {
    if (!params[i].is_contiguous()) outs[i] = at::empty_like(params[i]).copy_(outs[i]);
  }
  return outs;
}

at::Tensor cpu_ops::add_penalty_grad(at::TensorList params, const std::vector<at::Tensor>& grads, double l1,
                                     double l2, double gl, Grouping grouping) {
  const auto ws = contiguous_all(params);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_add_penalty_grad_cpu",
                                  [&] {
                                    value = cpu::passes<scalar_t>().grad_pass(ws, grads, true, l1, l2, gl, grouping,
                                                                              1.0);
                                  });
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

at::Tensor cpu_ops::add_penalty_grad_table(at::ScalarType dtype, const void* const* wd, void* const* od,
                                           const std::vector<int64_t>& numels, double l1, double l2, double gl,
                                           const GroupShape* shapes) {
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "regfast_add_penalty_grad_cpu", [&] {
    value = cpu::passes<scalar_t>().grad_table(wd, od, numels, true, l1, l2, gl, shapes, 1.0);
  });
  return at::scalar_tensor(value, at::TensorOptions().dtype(acc_type(dtype)));
}

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) {
  m.impl("penalty", &penalty_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("add_penalty_grad_", &add_penalty_grad_cpu);
}

}  // namespace regfast
