// The host path of norms, add_penalty_grad_ and prox_ in one C++ walk over the caller's list.
//
// For a model of thousands of small tensors the host work is the whole cost of a call: checking
// every tensor, dropping repeats, grouping by (device, dtype), converting lists, dispatching. Here
// one pass over the Python list does all of it, with no Python step per tensor; then each group's
// regfast_C kernel runs (below autograd: the caller is eager code under no_grad), and the version
// counters of the written tensors are bumped, as the op would.
//
// The walk takes only what it can prove valid without a message of its own: plain tensors (the
// types the caller passes), dense, of a floating dtype, on a device whose backend is the extension,
// grads present and matching their params, written tensors contiguous and not inference tensors.
// Anything else returns None before anything is written, and the Python path (regfast.api) runs:
// it gives the same results, and raises the errors regfast documents.
#include "host_path.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "lookahead.h"
#include "optim_common.h"
#include "optim_cpu_step.h"
#include "tensor_list.h"
#ifdef REGFAST_WITH_CUDA
#include "cuda_tables.h"
#endif

namespace regfast {
namespace host {
namespace {

// What a launcher in Python (Triton) reads of each tensor of a list (wrap_walked): its data pointer (the
// writable one, which un-shares a copy-on-write storage, for a list the call writes) and whether it is contiguous.
struct Listed {
  std::vector<int64_t> addresses;
  bool dense = true;

  void add(const at::Tensor& t, bool written) {
    const void* data = written ? t.data_ptr() : t.const_data_ptr();
    addresses.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(data)));
    dense = dense && t.is_contiguous();
  }
};

// One (device, dtype) group of a call: its tensors, their grads, their positions among the distinct tensors.
struct Group {
  at::Device device;
  at::ScalarType dtype;
  TensorRefs params;  // borrowed from the caller's objects, as are grads and states (see kernels())
  TensorRefs grads;
  std::vector<int64_t> index;
  std::vector<TensorRefs> states;  // optimizer steps: one list per state of the plan
  int64_t elements = 0;            // Σ numel of params
  // A public call's CPU group (Needs::table): each param's data pointer and numel, and its grad's data pointer when
  // the call writes grads, read by the walk; `table` stays true while every param of the group is contiguous.
  bool table = false;
  std::vector<void*> grad_data;
  std::vector<GroupShape> shapes;  // with group lasso (Needs::grouping)
  // Optimizer steps on the CPU: per param its numel and the data pointers of the param, its grad and each
  // state (`stride` pointers), read by the walk when every one of them can be used in place (`direct`).
  bool direct = false;
  size_t stride = 0;
  std::vector<void*> data;
  std::vector<int64_t> numels;
  // A flat plan (walk_flat): the states live in one buffer per state and group (states[j] holds it), and
  // each param's state is a view of it at the param's offset (its step count at its index in the group).
  bool flat = false;
  std::vector<void*> flat_data;
  std::vector<int64_t> offsets, indices;
  int64_t total = 0, size = 0;  // Σ numel, and number, of the group's params, with a grad or not
  // A walk for a launcher in Python (`listed`): per list (params, grads if read, then each state) what wrap_walked
  // hands it, read while the walk checks each tensor; each param's numel, and with `list_dims` its dims (list_param).
  std::vector<Listed> listed;
  std::vector<int64_t> sizes, dims;
  bool list_dims = false;

  // A param of a walk for a launcher in Python: its pointer, its numel, and for a call with group lasso (`list_dims`)
  // per param the dims that the group tables are keyed on (regfast.triton.launcher.DIMS): dim, numel, shape[0],
  // shape[1] (0 where absent), prod(shape[1:]), prod(shape[2:]), read while the walk has the tensor at hand rather
  // than in a second pass. Only group lasso reads them: for a call without it they would be 48 bytes per param made
  // and freed on every call (a megabyte at 20,000 params, which the allocator gave back to the system each time).
  void list_param(const at::Tensor& t, int64_t numel, bool written) {
    listed[0].add(t, written);
    sizes.push_back(numel);
    if (!list_dims) return;
    const auto shape = t.sizes();
    const auto d = static_cast<int64_t>(shape.size());
    int64_t rest = 1, rest2 = 1;
    for (int64_t i = 1; i < d; ++i) rest *= shape[i];
    for (int64_t i = 2; i < d; ++i) rest2 *= shape[i];
    dims.insert(dims.end(), {d, numel, d > 0 ? shape[0] : 0, d > 1 ? shape[1] : 0, rest, rest2});
  }

  // The data of state j of the i-th param of the table.
  void* state_data(size_t i, size_t j, size_t counts) const {
    if (!flat) return data[i * stride + 2 + j];
    const int64_t bytes = j == counts ? 4 * indices[i] : offsets[i] * (dtype == at::kDouble ? 8 : 4);
    return static_cast<char*>(flat_data[j]) + bytes;
  }
};

// What a call reads and writes, for the checks of the walk.
struct Needs {
  bool grads;         // read p.grad (and write it)
  bool write_params;  // params are written in place
  bool table = false;  // CPU groups: read the data pointers and numels into the group's table (Group::table)
  const Grouping* grouping = nullptr;  // with `table`, for group lasso: each param's group shape too (Group::shapes)
};

// The tensor types a walk takes (torch.Tensor, nn.Parameter, nn.Buffer: subclasses take the Python
// path) and the devices whose backend is the extension.
struct Allowed {
  PyObject* types;  // a tuple of types
  bool cpu;
  bool cuda;
};

// t's device, built from its two bytes. With TensorImpl::device()'s own copy, the build kept it on the stack byte by
// byte and read it back as one 16-bit word, which waits for both byte stores (measured: a fifth of prox_'s walk's
// samples sat on that load in a perf profile at 2,000 tensors, none after this).
at::Device tensor_device(const at::Tensor& t) {
  const at::Device d = t.unsafeGetTensorImpl()->device();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  static_assert(sizeof(at::Device) == 2, "Device is its type and index bytes");
  const auto bits = static_cast<uint16_t>(static_cast<uint8_t>(d.type()) | static_cast<uint8_t>(d.index()) << 8);
  at::Device out(at::kCPU);
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#else
  return d;
#endif
}

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Two shapes are equal (inline: the shapes of a model's small tensors are a few dims).
bool same_sizes(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// t.grad, read from the tensor's autograd metadata itself (the cast that torch's own get_autograd_meta makes) rather
// than through TensorImpl::grad's two calls out of line, the second a virtual one; Tensor::grad would first ask
// whether t is a leaf, to warn when an undefined grad of a non-leaf is read, which costs as much again. The public
// calls' walk declines an undefined grad (the Python path then reads p.grad, warning where torch warns); an
// optimizer's params are leaves.
const at::Tensor& grad_of(const at::Tensor& t) {
  static const at::Tensor undefined;
  const c10::AutogradMetaInterface* meta = t.unsafeGetTensorImpl()->autograd_meta();
  return meta != nullptr ? static_cast<const torch::autograd::AutogradMeta*>(meta)->grad_ : undefined;
}

// A tensor to write in place: contiguous (so stored once) and, outside inference mode, not an inference tensor.
bool writable(const at::Tensor& t) {
  return t.is_contiguous() && (!t.is_inference() || c10::InferenceMode::is_enabled());
}

// `t` has a grad to write in place: dense, of its dtype, device and shape.
bool grad_fits(const at::Tensor& t) {
  const at::Tensor& g = grad_of(t);
  return g.defined() && g.layout() == at::kStrided && g.scalar_type() == t.scalar_type() && g.device() == t.device() &&
         same_sizes(g.sizes(), t.sizes()) && writable(g);
}

// Open addressing on object addresses: drops repeats in O(1) per tensor.
class Seen {
 public:
  explicit Seen(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, nullptr);
  }

  // True the first time `p` is offered.
  bool insert(PyObject* p) {
    const size_t mask = slots_.size() - 1;
    size_t i = (reinterpret_cast<uintptr_t>(p) >> 4) * 0x9E3779B97F4A7C15ull >> 7 & mask;
    while (slots_[i] != nullptr) {
      if (slots_[i] == p) return false;
      i = (i + 1) & mask;
    }
    slots_[i] = p;
    return true;
  }

 private:
  std::vector<PyObject*> slots_;
};

// The walks are compiled flattened (every inline function they call inlined into them: TensorImpl's accessors
// included, which the compiler otherwise calls out of line): their per-tensor checks are most of a small
// tensor's cost.
//
// The walk: every check, repeats dropped, groups formed. False (nothing touched) when the call is not
// one it takes; `first` is then meaningless.
__attribute__((flatten))
bool walk(PyObject* list, const Allowed& allowed, Needs needs, std::vector<Group>& groups, int64_t& count,
          at::Tensor& first, bool listed = false, bool dims = false) {
  if (!PyList_Check(list) && !PyTuple_Check(list)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
  if (n == 0) return false;
  PyObject** items = PySequence_Fast_ITEMS(list);
  Seen seen(static_cast<size_t>(n));
  // The grads' StorageImpls are loaded ahead too where the walk reads their data pointers.
  Lookahead ahead(items, n, allowed.types, nullptr, listed || (needs.grads && needs.table), needs.grads,
                  listed || needs.table);
  count = 0;
  for (Py_ssize_t k = 0; k < n; ++k) {
    ahead.at(k);
    PyObject* obj = items[k];
    if (!THPVariable_Check(obj) || !plain_type(obj, allowed.types)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.layout() != at::kStrided || !floating(t.scalar_type())) return false;
    const at::Device device = tensor_device(t);
    if (!(device.is_cpu() ? allowed.cpu : device.is_cuda() && allowed.cuda)) return false;
    if (needs.write_params && !writable(t)) return false;
    if (needs.grads && !grad_fits(t)) return false;
    if (!seen.insert(obj)) continue;
    if (count == 0) first = t;
    Group* group = nullptr;
    for (auto& candidate : groups) {
      if (candidate.device == device && candidate.dtype == t.scalar_type()) {
        group = &candidate;
        break;
      }
    }
    if (group == nullptr) {
      groups.push_back(Group{device, t.scalar_type(), {}, {}, {}, {}});
      groups.back().params.reserve(static_cast<size_t>(n));
      if (needs.grads) groups.back().grads.reserve(static_cast<size_t>(n));
      if (needs.table && device.is_cpu()) {
        groups.back().table = true;
        groups.back().data.reserve(static_cast<size_t>(n));
        groups.back().numels.reserve(static_cast<size_t>(n));
        if (needs.grads) groups.back().grad_data.reserve(static_cast<size_t>(n));
        if (needs.grouping != nullptr) groups.back().shapes.reserve(static_cast<size_t>(n));
      }
      if (listed) {
        groups.back().listed.resize(needs.grads ? 2 : 1);
        for (auto& l : groups.back().listed) l.addresses.reserve(static_cast<size_t>(n));
        groups.back().sizes.reserve(static_cast<size_t>(n));
        groups.back().list_dims = dims;
        if (dims) groups.back().dims.reserve(6 * static_cast<size_t>(n));
      }
      group = &groups.back();
    }
    group->params.borrow(t);
    const int64_t numel = t.numel();
    group->elements += numel;
    if (group->table) {
      group->table = t.is_contiguous();  // else the op's path, which works on a contiguous copy
      group->data.push_back(needs.write_params ? t.data_ptr() : const_cast<void*>(t.const_data_ptr()));
      group->numels.push_back(numel);
      if (needs.grads) group->grad_data.push_back(grad_of(t).data_ptr());
      if (needs.grouping != nullptr) {
        group->shapes.push_back(numel ? group_shape(t, *needs.grouping) : GroupShape{1, 1, 0});
      }
    }
    if (needs.grads) group->grads.borrow(grad_of(t));
    if (listed) {
      group->list_param(t, numel, needs.write_params);
      if (needs.grads) group->listed[1].add(grad_of(t), true);
    }
    group->index.push_back(count++);
  }
  return true;
}

Group& group_of(std::vector<Group>& groups, const at::Device& device, at::ScalarType dtype, size_t nstates,
                size_t n, bool listed, bool dims) {
  for (auto& candidate : groups) {
    if (candidate.device == device && candidate.dtype == dtype) return candidate;
  }
  groups.push_back(Group{device, dtype, {}, {}, {}, {}});
  Group& group = groups.back();
  group.params.reserve(n);
  group.grads.reserve(n);
  group.states.resize(nstates);
  for (auto& s : group.states) s.reserve(n);
  if (listed) {
    group.listed.resize(2 + nstates);
    for (auto& l : group.listed) l.addresses.reserve(n);
    group.sizes.reserve(n);
    group.list_dims = dims;
    if (dims) group.dims.reserve(6 * n);
  } else if (device.is_cpu()) {
    group.direct = true;
    group.stride = 2 + nstates;
    group.data.reserve(group.stride * n);
    group.numels.reserve(n);
  }
  return group;
}

// The states of an optimizer step's plan: tuples of state tensors, one per param, and which of them
// holds the step counts (one-element float32 tensors; the others have their param's shape in its
// accumulation dtype).
struct PlanStates {
  std::vector<PyObject*> tuples;
  size_t counts = SIZE_MAX;
};

// The walk of an optimizer step over a param group with a plan: `list` (the group's params) must hold
// exactly the plan's params, each with a grad matching it, and each state tensor of the plan must still
// fit its param. Groups by (device, dtype) in order of first appearance, as the Python path does. CPU
// groups whose tensors can all be used in place get their data tables in the same pass.
__attribute__((flatten))
bool walk_plan(PyObject* list, PyObject* planned, const PlanStates& states, const Allowed& allowed,
               std::vector<Group>& groups, bool listed = false, bool dims = false) {
  if (!PyList_Check(list) || !PyTuple_Check(planned)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (n == 0 || n != PyTuple_GET_SIZE(planned)) return false;
  for (PyObject* s : states.tuples) {
    if (!PyTuple_Check(s) || PyTuple_GET_SIZE(s) != n) return false;
  }
  const size_t nstates = states.tuples.size();
  Lookahead ahead(PySequence_Fast_ITEMS(list), n, allowed.types, &states.tuples, true);  // reads data pointers
  for (Py_ssize_t k = 0; k < n; ++k) {
    ahead.at(k);
    PyObject* obj = PyList_GET_ITEM(list, k);
    if (obj != PyTuple_GET_ITEM(planned, k) || !THPVariable_Check(obj) || !plain_type(obj, allowed.types)) {
      return false;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    const auto dtype = t.scalar_type();
    if (t.layout() != at::kStrided || !floating(dtype)) return false;
    const at::Device device = tensor_device(t);
    if (!(device.is_cpu() ? allowed.cpu : device.is_cuda() && allowed.cuda)) return false;
    const at::Tensor& g = grad_of(t);
    const auto sizes = t.sizes();
    if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != dtype || g.device() != device ||
        !same_sizes(g.sizes(), sizes)) {
      return false;
    }
    Group& group = group_of(groups, device, dtype, nstates, static_cast<size_t>(n), listed, dims);
    group.params.borrow(t);
    group.elements += t.numel();
    group.grads.borrow(g);
    if (listed) {
      group.list_param(t, t.numel(), true);
      group.listed[1].add(g, false);
    }
    if (group.direct) {
      group.direct = writable(t) && g.is_contiguous();
      if (group.direct) {
        group.data.push_back(t.data_ptr());
        group.data.push_back(const_cast<void*>(g.const_data_ptr()));
        __builtin_prefetch(group.data.end()[-2], 1);  // for the kernels, which run after the walk
        __builtin_prefetch(group.data.end()[-1]);
        group.numels.push_back(t.numel());
      }
    }
    const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    for (size_t j = 0; j < nstates; ++j) {
      PyObject* so = PyTuple_GET_ITEM(states.tuples[j], k);
      if (!THPVariable_Check(so)) return false;
      const at::Tensor& s = THPVariable_Unpack(so);
      if (j == states.counts) {
        if (group.direct) {
          group.direct = s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1 &&
                         !s.is_inference() && s.layout() == at::kStrided;
        }
      } else if (s.layout() != at::kStrided || s.scalar_type() != acc || s.device() != device ||
                 !same_sizes(s.sizes(), sizes)) {
        return false;
      } else if (group.direct) {
        group.direct = writable(s);
      }
      if (group.direct) group.data.push_back(s.data_ptr());
      if (listed) {
        if (s.layout() != at::kStrided || !s.has_storage()) return false;
        group.listed[2 + j].add(s, true);
      }
      group.states[j].borrow(s);
    }
  }
  return true;
}

// The walk of an optimizer step over a CPU param group with a flat plan: `list` must hold exactly the plan's
// params, each of the plan's numel (`numels`, an int64 tensor), plain, contiguous and writable; a param
// without a grad is skipped (as the Python path skips it), a grad must match its param. `flats` holds, per
// state, a tuple of the flat buffers of the dtype groups in order of first appearance (the counts, at
// index `counts`, one float32 per param of the group); each must still be the plan's size. Reads no state
// tensor of a param: the states are views that the optimizer made and only load_state_dict replaces.
// `listed`: the walk of a flat plan for a launcher in Python (plan_groups_flat): params on any device the
// backends allow, grouped by (device, dtype), each buffer on its group's device (the counts on the CPU or there);
// each group lists its params' and grads' pointers and the positions of its params with a grad in `index`.
__attribute__((flatten))
bool walk_flat(PyObject* list, PyObject* planned, PyObject* numels_obj, const std::vector<PyObject*>& flats,
               size_t counts, const Allowed& allowed, std::vector<Group>& groups, bool listed = false,
               bool dims = false) {
  if (!(allowed.cpu || (listed && allowed.cuda)) || !PyList_Check(list) || !PyTuple_Check(planned) ||
      !THPVariable_Check(numels_obj)) {
    return false;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (n == 0 || n != PyTuple_GET_SIZE(planned)) return false;
  const at::Tensor& numels = THPVariable_Unpack(numels_obj);
  if (!numels.device().is_cpu() || numels.scalar_type() != at::kLong || numels.numel() != n ||
      !numels.is_contiguous()) {
    return false;
  }
  const int64_t* expected = numels.const_data_ptr<int64_t>();
  const size_t nstates = flats.size();
  Lookahead ahead(PySequence_Fast_ITEMS(list), n, allowed.types, nullptr, true);  // reads the grads' data pointers
  for (Py_ssize_t k = 0; k < n; ++k) {
    ahead.at(k);
    PyObject* obj = PyList_GET_ITEM(list, k);
    if (obj != PyTuple_GET_ITEM(planned, k) || !THPVariable_Check(obj) || !plain_type(obj, allowed.types)) {
      return false;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    const auto dtype = t.scalar_type();
    const at::Device device = tensor_device(t);
    if (t.layout() != at::kStrided || !floating(dtype) || !writable(t) || t.numel() != expected[k] ||
        !(device.is_cpu() ? allowed.cpu : listed && device.is_cuda() && allowed.cuda)) {
      return false;
    }
    Group* group = &group_of(groups, device, dtype, nstates, static_cast<size_t>(n), listed, dims);
    if (!group->flat) {  // new: param and grad per param in its table, the states in flat_data
      group->flat = true;
      group->stride = 2;
      group->offsets.reserve(static_cast<size_t>(n));
      group->indices.reserve(static_cast<size_t>(n));
    }
    const int64_t offset = group->total, index = group->size;
    group->total += expected[k];
    group->size += 1;
    const at::Tensor& g = grad_of(t);
    if (!g.defined()) continue;
    if (g.layout() != at::kStrided || g.scalar_type() != dtype || g.device() != device ||
        !same_sizes(g.sizes(), t.sizes()) || !g.is_contiguous()) {
      return false;
    }
    group->params.borrow(t);
    group->grads.borrow(g);
    group->elements += expected[k];
    if (listed) {
      group->list_param(t, expected[k], true);
      group->listed[1].add(g, false);
      group->index.push_back(k);
    } else {
      group->data.push_back(t.data_ptr());
      group->data.push_back(const_cast<void*>(g.const_data_ptr()));
      __builtin_prefetch(group->data.end()[-2], 1);  // for the kernels, which run after the walk
      __builtin_prefetch(group->data.end()[-1]);
      group->numels.push_back(expected[k]);
    }
    group->offsets.push_back(offset);
    group->indices.push_back(index);
  }
  for (size_t j = 0; j < nstates; ++j) {
    PyObject* tuple = flats[j];
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != static_cast<Py_ssize_t>(groups.size())) return false;
    for (size_t b = 0; b < groups.size(); ++b) {
      Group& group = groups[b];
      PyObject* so = PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(b));
      if (!THPVariable_Check(so)) return false;
      const at::Tensor& s = THPVariable_Unpack(so);
      const auto want = j == counts ? at::kFloat : (group.dtype == at::kDouble ? at::kDouble : at::kFloat);
      const bool placed = s.device() == group.device || (j == counts && s.device().is_cpu());
      if (s.layout() != at::kStrided || s.scalar_type() != want || !placed || !writable(s) || s.dim() != 1 ||
          s.numel() != (j == counts ? group.size : group.total)) {
        return false;
      }
      group.flat_data.push_back(s.data_ptr());
      group.states[j].borrow(s);
    }
  }
  return true;
}

bool parse_allowed(PyObject* types, int cpu, int cuda, Allowed& allowed) {
  if (!PyTuple_Check(types)) {
    PyErr_SetString(PyExc_TypeError, "types must be a tuple of types");
    return false;
  }
  allowed = {types, cpu != 0, cuda != 0};
  return true;
}

// float64 if any group is, else float32: the dtype of a call's totals.
at::ScalarType result_dtype(const std::vector<Group>& groups) {
  for (const auto& g : groups) {
    if (g.dtype == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void bump(at::TensorList ts) {
  const size_t n = ts.size();
  for (size_t i = 0; i < n; ++i) {
    if (i + Lookahead::kDistance < n) prefetch_version_counter(ts[i + Lookahead::kDistance]);
    torch::autograd::impl::bump_version(ts[i]);
  }
}

PyObject* wrap_list(at::TensorList ts) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(ts.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < ts.size(); ++i) PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), THPVariable_Wrap(ts[i]));
  return out;
}

// The attributes of a Walked list (regfast._common.Walked), as interned strings made once: setting an attribute by
// its C string makes and interns the string on every call.
enum Attr { kAddresses, kDims, kSizes, kDense, kFlat, kShared, kAttrs };

PyObject* attr_name(Attr a) {
  static PyObject* const* names = [] {
    static PyObject* made[kAttrs];
    const char* const text[kAttrs] = {"addresses", "dims", "sizes", "dense", "flat", "shared"};
    for (int i = 0; i < kAttrs; ++i) made[i] = PyUnicode_InternFromString(text[i]);
    return made;
  }();
  return names[a];
}

// Sets attribute `a` of `obj` to `value`, stealing the reference; false (an exception set) on failure.
bool set_attr(PyObject* obj, Attr a, PyObject* value) {
  if (value == nullptr) return false;
  PyObject* name = attr_name(a);
  const int rc = name != nullptr ? PyObject_SetAttr(obj, name, value) : (PyErr_NoMemory(), -1);
  Py_DECREF(value);
  return rc == 0;
}

// The tuple (a, b, c), taking the three references; null (and the others released) when one of them is null.
PyObject* triple(PyObject* a, PyObject* b, PyObject* c) {
  PyObject* out = a != nullptr && b != nullptr && c != nullptr ? PyTuple_New(3) : nullptr;
  if (out == nullptr) {
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    return nullptr;
  }
  PyTuple_SET_ITEM(out, 0, a);
  PyTuple_SET_ITEM(out, 1, b);
  PyTuple_SET_ITEM(out, 2, c);
  return out;
}

PyObject* int64_bytes(const std::vector<int64_t>& values) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(values.data()),
                                   static_cast<Py_ssize_t>(values.size() * sizeof(int64_t)));
}

// A list for a launcher that builds its device tables in Python (Triton): with a list subclass `type`
// (regfast._common.Walked), one of them holding the tensors `ts` (list `which` of group `g`: 0 its params, 1 their
// grads, then the states), with what the walk read of them as the attributes `addresses`, and for the params `sizes`
// and `dims` (native int64 bytes), `dense` and `flat` (a view over step counts, or null: see consecutive_counts),
// `shared` false; else a plain list. `source`, when not null, is a list or tuple of the objects of `ts` in order
// (the caller's own, whole): they are taken from it rather than found again from each tensor.
PyObject* wrap_walked(at::TensorList ts, PyObject* type, const Group& g, size_t which, PyObject* flat = nullptr,
                      PyObject* source = nullptr) {
  if (type == Py_None || which >= g.listed.size()) return wrap_list(ts);
  PyObject* out = source != nullptr ? PyObject_CallOneArg(type, source) : PyObject_CallNoArgs(type);
  if (out == nullptr) return nullptr;
  if (source == nullptr) {  // each tensor's object appended straight, without a plain list to copy
    for (const auto& t : ts) {
      PyObject* item = THPVariable_Wrap(t);
      const int rc = item != nullptr ? PyList_Append(out, item) : -1;
      Py_XDECREF(item);
      if (rc != 0) {
        Py_DECREF(out);
        return nullptr;
      }
    }
  }
  const Listed& l = g.listed[which];
  const bool params = which == 0;
  if (!set_attr(out, kAddresses, int64_bytes(l.addresses)) ||
      !set_attr(out, kDims, params && g.list_dims ? int64_bytes(g.dims) : Py_NewRef(Py_None)) ||
      !set_attr(out, kSizes, params ? int64_bytes(g.sizes) : Py_NewRef(Py_None)) ||
      !set_attr(out, kDense, PyBool_FromLong(l.dense)) ||
      !set_attr(out, kFlat, flat != nullptr ? Py_NewRef(flat) : Py_NewRef(Py_None)) ||
      !set_attr(out, kShared, Py_NewRef(Py_False))) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

// Tensors `ts` (not views of one buffer) that a launcher in Python reads only through their addresses, as
// `by_address(first, count, addresses, None, False)` (regfast._common.ByAddress): no list of their objects.
PyObject* by_address_of(const TensorRefs& ts, const Listed& listed, PyObject* by_address) {
  PyObject* bytes = int64_bytes(listed.addresses);
  if (bytes == nullptr) return nullptr;
  // "N" takes both new references.
  return PyObject_CallFunction(by_address, "NnNOO", THPVariable_Wrap(ts[0]), static_cast<Py_ssize_t>(ts.size()), bytes,
                               Py_None, Py_False);
}

// Step counts that are consecutive elements of one float32 CPU storage (as an optimizer's plan keeps them): a view
// over all of them, which counts them with one add; else an undefined tensor.
at::Tensor consecutive_counts(at::TensorList counts) {
  if (counts.empty()) return {};
  const at::Tensor& first = counts[0];
  if (!first.has_storage()) return {};
  const c10::StorageImpl* storage = first.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  const int64_t offset = first.storage_offset();
  for (size_t i = 0; i < counts.size(); ++i) {
    const at::Tensor& s = counts[i];
    if (!s.device().is_cpu() || s.scalar_type() != at::kFloat || s.layout() != at::kStrided || s.numel() != 1 ||
        s.is_inference() || !s.has_storage() ||
        s.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl() != storage ||
        s.storage_offset() != offset + static_cast<int64_t>(i)) {
      return {};
    }
  }
  return first.as_strided({static_cast<int64_t>(counts.size())}, {1});
}

// The kernels of a call run with the interpreter lock released only when their work dwarfs the cost of
// taking a reference to every tensor of the groups (a borrowed tensor is safe only while the lock keeps
// other threads from dropping the caller's objects): below that, releasing buys nothing. With the lock held,
// no kernel may copy a tensor on a worker thread of at::parallel_for (a copy of a borrowed tensor takes the
// lock, which this thread holds while it waits for the workers); the CPU kernels read data pointers only.
class KernelScope {
 public:
  explicit KernelScope(std::vector<Group>& groups) {
    int64_t elements = 0, tensors = 0;  // counted by the walk, which read every tensor already
    for (const auto& g : groups) {
      elements += g.elements;
      tensors += static_cast<int64_t>(g.params.size());
    }
    if (elements >= std::max<int64_t>(int64_t{1} << 20, 1024 * tensors)) {
      for (auto& g : groups) {
        g.params.own_all();
        g.grads.own_all();
        for (auto& s : g.states) s.own_all();
      }
      release_.emplace();
    }
  }

 private:
  std::optional<pybind11::gil_scoped_release> release_;
  at::AutoDispatchBelowADInplaceOrView below_autograd_;
  at::NoGradGuard no_grad_;
};

// A CPU group runs its op's work without the op (cpu_ops.h: the walk made the op's checks), unless a profiler
// (or any RecordFunction observer) listens: then through the dispatcher, which records the op.
bool direct_on(const at::Device& device) { return device.is_cpu() && !at::hasCallbacks(); }

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A group's positions in the list as an index tensor on `device`: on a CUDA device a cached device table
// (cuda_tables.h: no copy for a list seen before, valid inside a graph capture), elsewhere a plain tensor.
at::Tensor index_on(const std::vector<int64_t>& index, const at::Device& device) {
#ifdef REGFAST_WITH_CUDA
  if (device.is_cuda()) return device_table(index, device);
#endif
  return at::tensor(index, at::TensorOptions().dtype(at::kLong)).to(device);
}

// A call of penalty_walk or add_penalty_grad_walk: its arguments (params, types, cpu, cuda, l1, l2, group_lasso,
// groups) and what the walk found.
struct PenaltyCall {
  double l1 = 0, l2 = 0, gl = 0;
  std::string groups;
  Grouping parsed = Grouping::kRow;
  std::vector<Group> walked;
  int64_t count = 0;
  at::Tensor first;

  // 1 when the walk takes the call (with the grads where `grads`), 0 when it declines, −1 with a Python error set
  // where `args` are not those arguments.
  int walk_args(PyObject* args, bool grads) {
    PyObject *list = nullptr, *types = nullptr;
    int cpu = 0, cuda = 0;
    const char* grouping = nullptr;
    Allowed allowed{};
    if (!PyArg_ParseTuple(args, "OO!ppddds", &list, &PyTuple_Type, &types, &cpu, &cuda, &l1, &l2, &gl, &grouping) ||
        !parse_allowed(types, cpu, cuda, allowed)) {
      return -1;
    }
    groups = grouping;
    parsed = parse_grouping(groups);
    return walk(list, allowed, Needs{grads, false, grads, gl != 0 ? &parsed : nullptr}, walked, count, first) ? 1 : 0;
  }
};

}  // namespace

// The gradient of penalty_walk's value: one autograd node for the whole list, made by torch's C++ custom function
// (torch::autograd::Function: what a Python torch.autograd.Function records, without its Python step per tensor;
// its node saves the tensors as torch saves them, with the version check, the saved-tensor hooks, the release after
// a backward without retain_graph and their messages, and compiled autograd calls it). Its backward, per (device,
// dtype) group of the saved tensors in order of first appearance (the walk's groups): the value's grad in the
// group's accumulation dtype on its device (what the Python path's .to() of each group's value passes back), then
// the group's penalty_backward: the differentiable op regfast::penalty_backward where the backward builds a graph
// (create_graph), else the kernel.
struct PenaltyFunction : public torch::autograd::Function<PenaltyFunction> {
  // `value`: the walk's value of the distinct tensors `params`, returned as the function's output.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList params, const at::Tensor* value,
                            double l1, double l2, double gl, const std::string& groups) {
    ctx->save_for_backward(params.vec());
    ctx->saved_data["l1"] = l1;
    ctx->saved_data["l2"] = l2;
    ctx->saved_data["gl"] = gl;
    ctx->saved_data["groups"] = groups;
    return *value;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list params = ctx->get_saved_variables();
    const size_t n = params.size();
    torch::autograd::variable_list out(n + 5);  // one per forward argument: the tensors, then the others
    if (grads.empty() || !grads[0].defined()) return out;
    const double l1 = ctx->saved_data["l1"].toDouble(), l2 = ctx->saved_data["l2"].toDouble();
    const double gl = ctx->saved_data["gl"].toDouble();
    const std::string groups = ctx->saved_data["groups"].toStringRef();
    std::vector<size_t> part(n);  // each tensor's (device, dtype) group, numbered in order of first appearance
    std::vector<std::pair<at::Device, at::ScalarType>> kinds;
    for (size_t i = 0; i < n; ++i) {
      const std::pair<at::Device, at::ScalarType> kind{params[i].device(), params[i].scalar_type()};
      const auto found = std::find(kinds.begin(), kinds.end(), kind);
      part[i] = static_cast<size_t>(found - kinds.begin());
      if (found == kinds.end()) kinds.push_back(kind);
    }
    static const auto kernel = op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, double, double, double,
                                                          c10::string_view)>("regfast_C::penalty_backward");
    for (size_t k = 0; k < kinds.size(); ++k) {
      std::vector<size_t> index;
      for (size_t i = 0; i < n; ++i) {
        if (part[i] == k && ctx->needs_input_grad(i)) index.push_back(i);
      }
      if (index.empty()) continue;
      std::vector<at::Tensor> ws;
      for (size_t i = 0; i < n; ++i) {
        if (part[i] == k) ws.push_back(params[i]);
      }
      const auto [device, dtype] = kinds[k];
      const at::Tensor grad = grads[0].to(device, dtype == at::kDouble ? at::kDouble : at::kFloat);
      std::vector<at::Tensor> result;
      if (at::GradMode::is_enabled()) {
        static const auto differentiable = op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, double,
                                                                      double, double, c10::string_view)>(
            "regfast::penalty_backward");
        result = differentiable.call(grad, ws, l1, l2, gl, groups);
      } else if (direct_on(device)) {
        result = cpu_ops::penalty_backward(grad, ws, l1, l2, gl, parse_grouping(groups));
      } else {
        result = kernel.call(grad, ws, l1, l2, gl, groups);
      }
      for (size_t i = 0, j = 0; i < n; ++i) {
        if (part[i] == k) out[i] = std::move(result[j++]);
      }
    }
    return out;
  }
};

PyObject* penalty(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PenaltyCall c;
  if (const int walked = c.walk_args(args, false); walked <= 0) {
    if (walked < 0) return nullptr;
    Py_RETURN_NONE;
  }
  bool graph = false;
  if (at::GradMode::is_enabled()) {
    for (const auto& g : c.walked) {
      for (const auto& t : g.params) graph = graph || t.requires_grad();
    }
  }
  static const auto penalty_op =
      op<at::Tensor(at::TensorList, double, double, double, c10::string_view)>("regfast_C::penalty");
  const std::string& grouping = c.groups;
  at::Tensor total;
  {
    KernelScope scope(c.walked);
    const auto dtype = result_dtype(c.walked);
    for (const auto& g : c.walked) {  // each group's value added in order, as regfast.api's _total adds them
      at::Tensor value = direct_on(g.device) ? cpu_ops::penalty(g.params, c.l1, c.l2, c.gl, c.parsed)
                                             : penalty_op.call(g.params, c.l1, c.l2, c.gl, grouping);
      value = value.to(c.first.device(), dtype);
      total = total.defined() ? total + value : value;
    }
  }
  if (graph) {  // the tensors in the order of the walk's count, each group's in order
    std::vector<at::Tensor> distinct(static_cast<size_t>(c.count));
    for (const auto& g : c.walked) {
      for (size_t j = 0; j < g.params.size(); ++j) distinct[static_cast<size_t>(g.index[j])] = g.params[j];
    }
    total = PenaltyFunction::apply(at::TensorList(distinct), &total, c.l1, c.l2, c.gl, grouping);
  }
  return THPVariable_Wrap(total);
  END_HANDLE_TH_ERRORS
}

PyObject* norms(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr;
  int cpu = 0, cuda = 0;
  if (!PyArg_ParseTuple(args, "OO!pp", &list, &PyTuple_Type, &types, &cpu, &cuda)) return nullptr;
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  std::vector<Group> groups;
  int64_t count = 0;
  at::Tensor first;
  if (!walk(list, allowed, Needs{false, false, true}, groups, count, first)) Py_RETURN_NONE;
  static const auto norms_op = op<std::tuple<at::Tensor, at::Tensor>(at::TensorList)>("regfast_C::norms");
  auto norms_of = [&](const Group& g) {
    if (!direct_on(g.device)) return norms_op.call(g.params);
    return g.table ? cpu_ops::norms_table(g.dtype, g.data.data(), g.numels) : cpu_ops::norms(g.params);
  };
  at::Tensor per_l1, per_l2sq;
  {
    KernelScope scope(groups);
    if (groups.size() == 1) {
      std::tie(per_l1, per_l2sq) = norms_of(groups[0]);
    } else {
      const auto dtype = result_dtype(groups);
      const auto options = at::TensorOptions().device(first.device()).dtype(dtype);
      per_l1 = at::empty({count}, options);
      per_l2sq = at::empty({count}, options);
      for (const auto& g : groups) {
        const auto [a, b] = norms_of(g);
        const at::Tensor index = index_on(g.index, first.device());
        per_l1.index_copy_(0, index, a.to(first.device(), dtype));
        per_l2sq.index_copy_(0, index, b.to(first.device(), dtype));
      }
    }
  }
  return Py_BuildValue("(NN)", THPVariable_Wrap(per_l1), THPVariable_Wrap(per_l2sq));
  END_HANDLE_TH_ERRORS
}

PyObject* add_penalty_grad(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PenaltyCall c;
  if (const int walked = c.walk_args(args, true); walked <= 0) {
    if (walked < 0) return nullptr;
    Py_RETURN_NONE;
  }
  static const auto grad_op = op<at::Tensor(at::TensorList, at::TensorList, double, double, double, c10::string_view)>(
      "regfast_C::add_penalty_grad_");
  const std::string& grouping = c.groups;
  at::Tensor total;
  {
    KernelScope scope(c.walked);
    const auto dtype = result_dtype(c.walked);
    for (const auto& g : c.walked) {
      // The walk's grads are contiguous and match their params, as cpu_ops::add_penalty_grad takes them.
      at::Tensor value;
      if (!direct_on(g.device)) {
        value = grad_op.call(g.params, g.grads, c.l1, c.l2, c.gl, grouping);
      } else if (g.table) {
        value = cpu_ops::add_penalty_grad_table(g.dtype, g.data.data(), g.grad_data.data(), g.numels, c.l1, c.l2,
                                                c.gl, g.shapes.data());
      } else {
        value = cpu_ops::add_penalty_grad(g.params, g.grads, c.l1, c.l2, c.gl, c.parsed);
      }
      value = value.to(c.first.device(), dtype);
      total = total.defined() ? total + value : value;
    }
    for (const auto& g : c.walked) bump(g.grads);
  }
  return THPVariable_Wrap(total);
  END_HANDLE_TH_ERRORS
}

PyObject* prox(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr, *lr_obj = nullptr;
  int cpu = 0, cuda = 0;
  double lr = 0, l1 = 0, l2 = 0, gl = 0;
  const char* groups_arg = nullptr;
  if (!PyArg_ParseTuple(args, "OO!ppOdddds", &list, &PyTuple_Type, &types, &cpu, &cuda, &lr_obj, &lr, &l1, &l2, &gl,
                        &groups_arg)) {
    return nullptr;
  }
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  std::optional<at::Tensor> lr_tensor;
  if (lr_obj != Py_None) {
    if (!THPVariable_Check(lr_obj)) Py_RETURN_NONE;
    lr_tensor = THPVariable_Unpack(lr_obj);
  }
  std::vector<Group> groups;
  int64_t count = 0;
  at::Tensor first;
  // A CPU group's prox runs on the data pointers (and with group lasso the group shapes) the walk read
  // (cpu_ops::prox_table): for thousands of small tensors, reading each tensor again costs more than its elements.
  const std::string grouping(groups_arg);
  const Grouping parsed = parse_grouping(grouping);
  if (!walk(list, allowed, Needs{false, true, true, gl != 0 ? &parsed : nullptr}, groups, count, first)) {
    Py_RETURN_NONE;
  }
  static const auto prox_op =
      op<void(at::TensorList, const std::optional<at::Tensor>&, double, double, double, double, c10::string_view)>(
          "regfast_C::prox_");
  {
    KernelScope scope(groups);
    for (const auto& g : groups) {
      // A tensor lr in the group's accumulation dtype (as regfast._common.lr_step); the op reads it where it
      // lies, and a CUDA op moves it to the params' device itself (refusing a CPU lr inside a graph capture).
      std::optional<at::Tensor> step;
      if (lr_tensor.has_value()) step = lr_tensor->to(g.dtype == at::kDouble ? at::kDouble : at::kFloat);
      if (direct_on(g.device) && g.table) {
        cpu_ops::prox_table(g.dtype, g.data.data(), g.numels, step, lr, l1, l2, gl, g.shapes.data());
      } else if (direct_on(g.device)) {
        cpu_ops::prox(g.params, step, lr, l1, l2, gl, parsed);
      } else {
        prox_op.call(g.params, step, lr, l1, l2, gl, grouping);
      }
    }
    for (const auto& g : groups) bump(g.params);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* host_bias_table(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* counts_obj = nullptr;
  double lr = 0, beta1 = 0, beta2 = 0;
  int wide = 0;
  if (!PyArg_ParseTuple(args, "Odddp", &counts_obj, &lr, &beta1, &beta2, &wide)) return nullptr;
  if (!THPVariable_Check(counts_obj)) Py_RETURN_NONE;
  const at::Tensor& counts = THPVariable_Unpack(counts_obj);
  if (!counts.device().is_cpu() || counts.scalar_type() != at::kFloat || counts.layout() != at::kStrided ||
      counts.dim() != 1 || !writable(counts) || counts.requires_grad()) {
    Py_RETURN_NONE;
  }
  const int64_t n = counts.numel();
  at::Tensor table = at::empty({2 * n}, at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat));
  float* count = counts.data_ptr<float>();
  HostCounts host{lr, beta1, beta2};
  auto fill = [&](auto* out) {
    for (int64_t i = 0; i < n; ++i) {
      host.next(count[i]);
      using T = std::remove_pointer_t<decltype(out)>;
      out[i] = static_cast<T>(host.step_size);
      out[n + i] = static_cast<T>(host.bc2_sqrt);
    }
  };
  if (wide) {
    fill(table.data_ptr<double>());
  } else {
    fill(table.data_ptr<float>());
  }
  if (!counts.is_inference()) torch::autograd::impl::bump_version(counts);  // an inference tensor has none
  return THPVariable_Wrap(std::move(table));
  END_HANDLE_TH_ERRORS
}

PyObject* digest(PyObject*, PyObject* arg) {
  if (!PyBytes_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "digest takes bytes");
    return nullptr;
  }
  const auto* data = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(arg));
  const auto size = static_cast<size_t>(PyBytes_GET_SIZE(arg));
  // Four independent lanes of multiply-adds over the 8-byte words (then the last bytes), mixed at the end.
  constexpr uint64_t kOdd = 0x9E3779B97F4A7C15ULL;
  uint64_t lane[4] = {1, 2, 3, 4};
  size_t i = 0;
  auto word = [data](size_t at) {
    uint64_t w = 0;
    std::memcpy(&w, data + at, sizeof w);
    return w;
  };
  for (; i + 32 <= size; i += 32) {
    for (size_t j = 0; j < 4; ++j) lane[j] = (lane[j] + word(i + 8 * j)) * kOdd;
  }
  for (; i + 8 <= size; i += 8) lane[0] = (lane[0] + word(i)) * kOdd;
  if (i < size) {
    uint64_t w = 0;
    std::memcpy(&w, data + i, size - i);
    lane[1] = (lane[1] + w) * kOdd;
  }
  uint64_t h = size;
  for (const uint64_t l : lane) h = (h ^ (l >> 29) ^ l) * kOdd;
  return PyLong_FromUnsignedLongLong(h ^ (h >> 32));
}

PyObject* bump_versions(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  // Each tensor's object, its TensorImpl's version-counter field and the counter itself are loaded 16, 8 and 4
  // tensors ahead: a long list's objects lie anywhere on the heap.
  constexpr Py_ssize_t kAhead = 4;
  for (Py_ssize_t a = 0; a < PyTuple_GET_SIZE(args); ++a) {  // every list checked before any bump
    PyObject* list = PyTuple_GET_ITEM(args, a);
    bool tensors = PyList_Check(list) || PyTuple_Check(list);
    for (Py_ssize_t k = 0; tensors && k < PySequence_Fast_GET_SIZE(list); ++k) {
      tensors = THPVariable_Check(PySequence_Fast_ITEMS(list)[k]);
    }
    if (!tensors) {
      PyErr_SetString(PyExc_TypeError, "bump_versions takes lists or tuples of tensors");
      return nullptr;
    }
  }
  for (Py_ssize_t a = 0; a < PyTuple_GET_SIZE(args); ++a) {
    PyObject* list = PyTuple_GET_ITEM(args, a);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
    PyObject** items = PySequence_Fast_ITEMS(list);
    for (Py_ssize_t k = -4 * kAhead; k < n; ++k) {
      if (k + 4 * kAhead < n) __builtin_prefetch(items[k + 4 * kAhead]);
      if (const Py_ssize_t j = k + 2 * kAhead; 0 <= j && j < n) {
        __builtin_prefetch(&THPVariable_Unpack(items[j]).unsafeGetTensorImpl()->version_counter());
      }
      if (const Py_ssize_t j = k + kAhead; 0 <= j && j < n) prefetch_version_counter(THPVariable_Unpack(items[j]));
      if (k < 0) continue;
      const at::Tensor& t = THPVariable_Unpack(items[k]);
      if (!t.is_inference()) torch::autograd::impl::bump_version(t);  // an inference tensor has no counter
    }
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

__attribute__((flatten))
PyObject* grads_ready(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr;
  if (!PyArg_ParseTuple(args, "OO!", &list, &PyTuple_Type, &types)) return nullptr;
  // The walk's checks of each tensor and its grad, without its grouping: repeats and groups do not matter here.
  if (!PyList_Check(list) && !PyTuple_Check(list)) Py_RETURN_NONE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
  PyObject** items = PySequence_Fast_ITEMS(list);
  Lookahead ahead(items, n, types, nullptr, false, true, false);  // reads no data pointer
  for (Py_ssize_t k = 0; k < n; ++k) {
    ahead.at(k);
    PyObject* obj = items[k];
    if (!THPVariable_Check(obj) || !plain_type(obj, types)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.layout() != at::kStrided || !floating(t.scalar_type()) || !grad_fits(t)) Py_RETURN_NONE;
  }
  if (n == 0) Py_RETURN_NONE;
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* groups(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr, *listed = Py_None, *by_address = Py_None;
  int cpu = 0, cuda = 0, grads = 0, write_params = 0, dims = 1;
  if (!PyArg_ParseTuple(args, "OO!pppp|OpO", &list, &PyTuple_Type, &types, &cpu, &cuda, &grads, &write_params,
                        &listed, &dims, &by_address)) {
    return nullptr;
  }
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  std::vector<Group> groups;
  int64_t count = 0;
  at::Tensor first;
  if (!walk(list, allowed, Needs{grads != 0, write_params != 0}, groups, count, first, listed != Py_None, dims != 0)) {
    Py_RETURN_NONE;
  }
  // With a type `by_address` (regfast._common.ByAddress) every group launches from Python, and the walk bumps the
  // version counters of what the call writes (the grads, or the params) itself, from its own references, rather than
  // the launcher after the launch through the lists' objects; the grads come by their addresses (the launch reads
  // nothing else of them): a list of them would take each grad's Python object, which nothing else of the call reads
  // (a line from memory per grad in a trained model's order), and once more to free it.
  const bool bumps = listed != Py_None && by_address != Py_None;
  const bool grads_by_address = grads && bumps;
  for (const auto& g : groups) {
    if (grads_by_address) bump(g.grads);
    if (bumps && write_params) bump(g.params);
  }
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(groups.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < groups.size(); ++i) {
    const Group& g = groups[i];
    PyObject* index = Py_None;
    if (groups.size() > 1) {
      index = PyTuple_New(static_cast<Py_ssize_t>(g.index.size()));
      if (index == nullptr) break;
      for (size_t j = 0; j < g.index.size(); ++j) {
        PyTuple_SET_ITEM(index, static_cast<Py_ssize_t>(j), PyLong_FromLongLong(g.index[j]));
      }
    } else {
      Py_INCREF(index);
    }
    // One group of every tensor once: the caller's list is the group's params.
    PyObject* whole = groups.size() == 1 && count == PySequence_Fast_GET_SIZE(list) ? list : nullptr;
    PyObject* params = wrap_walked(g.params, listed, g, 0, nullptr, whole);
    PyObject* grad_list = nullptr;
    if (params != nullptr && grads_by_address) {
      grad_list = by_address_of(g.grads, g.listed[1], by_address);
    } else if (params != nullptr) {
      grad_list = grads ? wrap_walked(g.grads, listed, g, 1) : Py_NewRef(Py_None);
    }
    PyObject* item = triple(params, grad_list, index);
    if (item == nullptr) break;
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  if (PyErr_Occurred()) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyObject* plan_groups(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr, *planned = nullptr, *state_tuples = nullptr, *listed = Py_None;
  int cpu = 0, cuda = 0, dims = 1;
  Py_ssize_t counts = -1;
  if (!PyArg_ParseTuple(args, "OO!ppOO!n|Op", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned, &PyTuple_Type,
                        &state_tuples, &counts, &listed, &dims)) {
    return nullptr;
  }
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  // The walk takes the states in use; an empty tuple stands for a state the step does not keep.
  const Py_ssize_t nstates = PyTuple_GET_SIZE(state_tuples);
  PlanStates states;
  std::vector<Py_ssize_t> position(static_cast<size_t>(nstates), -1);
  for (Py_ssize_t j = 0; j < nstates; ++j) {
    PyObject* s = PyTuple_GET_ITEM(state_tuples, j);
    if (!PyTuple_Check(s)) Py_RETURN_NONE;
    if (PyTuple_GET_SIZE(s) == 0) continue;
    position[static_cast<size_t>(j)] = static_cast<Py_ssize_t>(states.tuples.size());
    if (j == counts) states.counts = states.tuples.size();
    states.tuples.push_back(s);
  }
  std::vector<Group> groups;
  if (!walk_plan(list, planned, states, allowed, groups, listed != Py_None, dims != 0)) Py_RETURN_NONE;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(groups.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < groups.size(); ++i) {
    const Group& g = groups[i];
    PyObject* lists = PyTuple_New(nstates);
    if (lists == nullptr) break;
    for (Py_ssize_t j = 0; j < nstates; ++j) {
      const Py_ssize_t at = position[static_cast<size_t>(j)];
      PyObject* l = nullptr;
      if (at < 0) {
        l = PyList_New(0);
      } else {
        const TensorRefs& state = g.states[static_cast<size_t>(at)];
        // Step counts are the only state the step may keep off the params' device; the others are written.
        PyObject* flat = nullptr;
        if (j == counts && listed != Py_None) {
          const at::Tensor view = consecutive_counts(state);
          if (view.defined()) flat = THPVariable_Wrap(view);
        }
        l = wrap_walked(state, listed, g, 2 + static_cast<size_t>(at), flat,
                        groups.size() == 1 ? PyTuple_GET_ITEM(state_tuples, j) : nullptr);
        Py_XDECREF(flat);
      }
      if (l == nullptr) break;
      PyTuple_SET_ITEM(lists, j, l);
    }
    // A failed state list left an exception and a null slot, which the tuple's release skips.
    PyObject* whole = groups.size() == 1 ? list : nullptr;
    PyObject* params =
        PyErr_Occurred() ? nullptr : wrap_walked(g.params, listed, g, 0, nullptr, whole);
    PyObject* grads = params == nullptr ? nullptr : wrap_walked(g.grads, listed, g, 1);
    PyObject* item = triple(params, grads, lists);
    if (item == nullptr) break;
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  if (PyErr_Occurred()) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
  END_HANDLE_TH_ERRORS
}

namespace {

// A list of `tuple[k]` for each k of `index`, or `tuple` itself (copied by the caller's type) when that is all of
// it in order: a new reference, or null with an exception set.
PyObject* pick(PyObject* tuple, const std::vector<int64_t>& index) {
  const auto n = static_cast<Py_ssize_t>(index.size());
  if (n == PyTuple_GET_SIZE(tuple)) return Py_NewRef(tuple);
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyList_SET_ITEM(out, i, Py_NewRef(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(index[static_cast<size_t>(i)]))));
  }
  return out;
}

// The state list j of a flat plan's group for a launcher in Python: the plan's state tensors of the group's params
// with a grad (from `tuple`, one per param of the plan), as a `type` list whose addresses are those of their views
// in the group's flat buffer; with `flat` the buffer itself when it holds exactly these counts, and `shared` (the
// views share the buffer's version counter). With a type `by_address` (regfast._common.ByAddress), the launcher
// reads the views only through their addresses: then they come as `by_address(first view, count, addresses, flat,
// True)`, which holds no list of the views (for counts, only when `flat` is the buffer: others are added one by one).
PyObject* flat_state_list(const Group& g, size_t j, bool is_counts, PyObject* tuple, PyObject* buffer,
                          PyObject* type, PyObject* by_address) {
  // Host counts only (as Walked says): counts on the device are read through their pointers.
  const bool whole = is_counts && static_cast<int64_t>(g.index.size()) == g.size &&
                     THPVariable_Unpack(buffer).device().is_cpu();
  const bool light = by_address != Py_None && (whole || !is_counts);
  PyObject* out = nullptr;
  if (!light) {
    PyObject* objects = pick(tuple, g.index);
    if (objects == nullptr) return nullptr;
    out = PyObject_CallOneArg(type, objects);
    Py_DECREF(objects);
    if (out == nullptr) return nullptr;
  }
  const int64_t itemsize = is_counts ? 4 : (g.dtype == at::kDouble ? 8 : 4);
  const auto base = static_cast<int64_t>(reinterpret_cast<intptr_t>(g.flat_data[j]));
  std::vector<int64_t> addresses(g.offsets.size());
  for (size_t i = 0; i < addresses.size(); ++i) {  // an empty view's data pointer is null, as data_ptr() says
    addresses[i] = !is_counts && g.sizes[i] == 0 ? 0 : base + itemsize * (is_counts ? g.indices[i] : g.offsets[i]);
  }
  if (light) {
    PyObject* bytes = int64_bytes(addresses);
    if (bytes == nullptr) return nullptr;
    out = PyObject_CallFunction(by_address, "OnOOO", PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(g.index[0])),
                                static_cast<Py_ssize_t>(g.index.size()), bytes, whole ? buffer : Py_None, Py_True);
    Py_DECREF(bytes);
    return out;
  }
  if (!set_attr(out, kAddresses, int64_bytes(addresses)) || !set_attr(out, kSizes, Py_NewRef(Py_None)) ||
      !set_attr(out, kDims, Py_NewRef(Py_None)) || !set_attr(out, kDense, Py_NewRef(Py_True)) ||
      !set_attr(out, kFlat, Py_NewRef(whole ? buffer : Py_None)) || !set_attr(out, kShared, Py_NewRef(Py_True))) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

}  // namespace

PyObject* plan_groups_flat(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *list = nullptr, *types = nullptr, *planned = nullptr, *numels = nullptr, *flats = nullptr,
           *state_tuples = nullptr, *listed = nullptr, *by_address = Py_None;
  int cpu = 0, cuda = 0, grads_by_address = 0, dims = 1;
  Py_ssize_t counts = -1;
  if (!PyArg_ParseTuple(args, "OO!ppOOO!O!nO|Opp", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned, &numels,
                        &PyTuple_Type, &flats, &PyTuple_Type, &state_tuples, &counts, &listed, &by_address,
                        &grads_by_address, &dims)) {
    return nullptr;
  }
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  const Py_ssize_t nstates = PyTuple_GET_SIZE(flats);
  if (PyTuple_GET_SIZE(state_tuples) != nstates || !PyList_Check(list)) Py_RETURN_NONE;
  // The states in use: an empty tuple (of buffers and of tensors) stands for a state the step does not keep.
  std::vector<PyObject*> buffers;
  std::vector<Py_ssize_t> position(static_cast<size_t>(nstates), -1);
  size_t in_use_counts = SIZE_MAX;
  for (Py_ssize_t j = 0; j < nstates; ++j) {
    PyObject* b = PyTuple_GET_ITEM(flats, j);
    PyObject* s = PyTuple_GET_ITEM(state_tuples, j);
    if (!PyTuple_Check(b) || !PyTuple_Check(s)) Py_RETURN_NONE;
    if (PyTuple_GET_SIZE(b) == 0) continue;
    if (PyTuple_GET_SIZE(s) != PyList_GET_SIZE(list)) Py_RETURN_NONE;
    position[static_cast<size_t>(j)] = static_cast<Py_ssize_t>(buffers.size());
    if (j == counts) in_use_counts = buffers.size();
    buffers.push_back(b);
  }
  std::vector<Group> groups;
  if (!walk_flat(list, planned, numels, buffers, in_use_counts, allowed, groups, true, dims != 0)) Py_RETURN_NONE;
  // States by their addresses: the walk bumps the params it steps and each state's buffer (whose version counter its
  // views share) itself, from its own references, rather than the launcher after the launch through the lists.
  if (by_address != Py_None) {
    for (const auto& g : groups) {
      if (g.params.empty()) continue;
      bump(g.params);
      for (const auto& buffer : g.states) bump(buffer);
    }
  }
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (size_t b = 0; b < groups.size(); ++b) {
    const Group& g = groups[b];
    if (g.params.empty()) continue;  // no param of the group has a grad: nothing to step
    const bool whole = groups.size() == 1 && static_cast<int64_t>(g.index.size()) == g.size;
    PyObject* lists = PyTuple_New(nstates);
    if (lists == nullptr) break;
    for (Py_ssize_t j = 0; j < nstates; ++j) {
      const Py_ssize_t at = position[static_cast<size_t>(j)];
      PyObject* l = at < 0 ? PyList_New(0)
                           : flat_state_list(g, static_cast<size_t>(at), j == counts, PyTuple_GET_ITEM(state_tuples, j),
                                             PyTuple_GET_ITEM(PyTuple_GET_ITEM(flats, j), static_cast<Py_ssize_t>(b)),
                                             listed, by_address);
      if (l == nullptr) break;
      PyTuple_SET_ITEM(lists, j, l);
    }
    // A failed state list left an exception and a null slot, which the tuple's release skips.
    PyObject* params =
        PyErr_Occurred() ? nullptr
                         : wrap_walked(g.params, listed, g, 0, nullptr, whole ? list : nullptr);
    PyObject* grads = nullptr;
    if (params != nullptr && grads_by_address && by_address != Py_None) {
      grads = by_address_of(g.grads, g.listed[1], by_address);  // a launch that reads the grads' addresses alone
    } else if (params != nullptr) {
      grads = wrap_walked(g.grads, listed, g, 1);
    }
    PyObject* item = triple(params, grads, lists);
    if (item == nullptr) break;
    const int rc = PyList_Append(out, item);
    Py_DECREF(item);
    if (rc != 0) break;
  }
  if (PyErr_Occurred()) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
  END_HANDLE_TH_ERRORS
}

namespace {

std::optional<at::Tensor> lr_of(PyObject* lr_obj, bool& ok) {
  ok = lr_obj == Py_None || THPVariable_Check(lr_obj);
  if (lr_obj == Py_None || !ok) return std::nullopt;
  return THPVariable_Unpack(lr_obj);
}

// The version counters of what a step wrote: the params with a grad, and their states (a flat buffer
// once: its views share its counter).
void bump_step(const std::vector<Group>& groups) {
  for (const auto& g : groups) {
    if (g.params.empty()) continue;
    bump(g.params);
    for (const auto& s : g.states) bump(s);
  }
}

PyObject* sgd_step_impl(PyObject* args, bool flat) {
  PyObject *list = nullptr, *planned = nullptr, *numels = nullptr, *buffers = nullptr, *types = nullptr,
           *lr_obj = nullptr;
  int cpu = 0, cuda = 0, nesterov = 0, maximize = 0, compute_penalty = 0;
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0, l1 = 0, l2 = 0, gl = 0;
  const char* groups_arg = nullptr;
  const bool parsed =
      flat ? PyArg_ParseTuple(args, "OO!ppOOOOddddppdddsp", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned,
                              &numels, &buffers, &lr_obj, &lr, &momentum, &dampening, &weight_decay, &nesterov,
                              &maximize, &l1, &l2, &gl, &groups_arg, &compute_penalty)
           : PyArg_ParseTuple(args, "OO!ppOOOddddppdddsp", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned,
                              &buffers, &lr_obj, &lr, &momentum, &dampening, &weight_decay, &nesterov, &maximize,
                              &l1, &l2, &gl, &groups_arg, &compute_penalty);
  if (!parsed) return nullptr;
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  bool lr_ok = false;
  const std::optional<at::Tensor> lr_tensor = lr_of(lr_obj, lr_ok);
  if (!lr_ok || (flat && lr_tensor.has_value())) Py_RETURN_NONE;
  std::vector<Group> groups;
  const bool has_buffers = momentum != 0;
  std::vector<PyObject*> states;
  if (has_buffers) states.push_back(buffers);
  const bool walked = flat ? walk_flat(list, planned, numels, states, SIZE_MAX, allowed, groups)
                           : walk_plan(list, planned, PlanStates{states, SIZE_MAX}, allowed, groups);
  if (!walked) Py_RETURN_NONE;
  static const auto sgd_op =
      op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, const std::optional<at::Tensor>&, double, double,
                    double, bool, double, bool, bool, double, double, double, c10::string_view, bool)>(
          "regfast_C::sgd_step_");
  const std::string grouping(groups_arg);
  std::vector<at::Tensor> values;
  {
    KernelScope scope(groups);
    for (const auto& g : groups) {
      // A flat plan's group none of whose params has a grad: nothing to step and no value, as on the Python path.
      if (g.params.empty()) continue;
      at::Tensor value;
      if (g.direct && !lr_tensor.has_value()) {
        // The op's step from the walk's table: the walk checked what the op checks (with group lasso, the op's
        // group steps, which compute the penalty afterwards as the op does).
        const auto args = optim_cpu::sgd_args(g.dtype, lr, false, momentum, dampening, nesterov != 0, weight_decay,
                                              maximize != 0, false, l1, l2, compute_penalty != 0 && gl == 0);
        std::vector<optim_cpu::SgdTensor> ts(g.numels.size());
        for (size_t i = 0; i < ts.size(); ++i) {
          void* const* d = g.data.data() + i * g.stride;
          ts[i] = {d[0], d[1], has_buffers ? g.state_data(i, 0, SIZE_MAX) : nullptr};
        }
        const auto acc = acc_type(g.dtype);
        if (gl != 0) {
          value = optim_cpu::sgd_group_step(args, g.params, g.grads, ts, lr, l1, l2, gl, grouping,
                                            compute_penalty != 0);
        } else {
          const double v = optim_cpu::run_sgd(args, ts, g.numels, acc, l1, l2);
          if (compute_penalty) value = at::scalar_tensor(v, at::TensorOptions().dtype(acc));
        }
      } else {
        const at::TensorList bufs = has_buffers ? at::TensorList(g.states[0]) : at::TensorList();
        value = sgd_op.call(g.params, g.grads, bufs, lr_tensor, lr, momentum, dampening, nesterov != 0, weight_decay,
                            maximize != 0, false, l1, l2, gl, grouping, compute_penalty != 0);
      }
      if (compute_penalty) values.push_back(std::move(value));
    }
    bump_step(groups);
  }
  return wrap_list(values);
}

PyObject* adamw_step_impl(PyObject* args, bool flat) {
  PyObject *list = nullptr, *planned = nullptr, *numels = nullptr, *exp_avgs = nullptr, *exp_avg_sqs = nullptr,
           *max_sqs = nullptr, *steps = nullptr, *types = nullptr, *lr_obj = nullptr;
  int cpu = 0, cuda = 0, amsgrad = 0, maximize = 0, compute_penalty = 0;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, l1 = 0, l2 = 0, gl = 0;
  const char *groups_arg = nullptr, *prox_arg = nullptr;
  const bool parsed =
      flat ? PyArg_ParseTuple(args, "OO!ppOOOOOOOdddddppdddssp", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned,
                              &numels, &exp_avgs, &exp_avg_sqs, &max_sqs, &steps, &lr_obj, &lr, &beta1, &beta2, &eps,
                              &weight_decay, &amsgrad, &maximize, &l1, &l2, &gl, &groups_arg, &prox_arg,
                              &compute_penalty)
           : PyArg_ParseTuple(args, "OO!ppOOOOOOdddddppdddssp", &list, &PyTuple_Type, &types, &cpu, &cuda, &planned,
                              &exp_avgs, &exp_avg_sqs, &max_sqs, &steps, &lr_obj, &lr, &beta1, &beta2, &eps,
                              &weight_decay, &amsgrad, &maximize, &l1, &l2, &gl, &groups_arg, &prox_arg,
                              &compute_penalty);
  if (!parsed) return nullptr;
  Allowed allowed{};
  if (!parse_allowed(types, cpu, cuda, allowed)) return nullptr;
  bool lr_ok = false;
  const std::optional<at::Tensor> lr_tensor = lr_of(lr_obj, lr_ok);
  if (!lr_ok || (flat && lr_tensor.has_value())) Py_RETURN_NONE;
  const std::string grouping(groups_arg), prox_mode(prox_arg);
  if (prox_mode != "lr" && prox_mode != "preconditioned") Py_RETURN_NONE;
  std::vector<PyObject*> states = {exp_avgs, exp_avg_sqs, steps};
  if (amsgrad) states.push_back(max_sqs);
  constexpr size_t kCounts = 2;
  std::vector<Group> groups;
  const bool walked = flat ? walk_flat(list, planned, numels, states, kCounts, allowed, groups)
                           : walk_plan(list, planned, PlanStates{states, kCounts}, allowed, groups);
  if (!walked) Py_RETURN_NONE;
  static const auto adamw_op =
      op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    const std::optional<at::Tensor>&, double, double, double, double, double, bool, bool, double,
                    double, double, c10::string_view, c10::string_view, bool)>("regfast_C::adamw_step_");
  std::vector<at::Tensor> values;
  {
    KernelScope scope(groups);
    for (const auto& g : groups) {
      // A flat plan's group none of whose params has a grad: nothing to step and no value, as on the Python path.
      if (g.params.empty()) continue;
      at::Tensor value;
      if (g.direct && !lr_tensor.has_value()) {
        // The op's step from the walk's table: the walk checked what the op checks. The float32 counts
        // are incremented as _foreach_add_(steps, 1) would, and the bias corrections computed from them
        // as the op computes them. With group lasso, the op's group steps (the penalty afterwards, as the op).
        const auto args = optim_cpu::adamw_args(g.dtype, lr, false, beta1, beta2, eps, weight_decay, amsgrad != 0,
                                                maximize != 0, l1, l2, prox_mode == "lr",
                                                compute_penalty != 0 && gl == 0);
        std::vector<optim_cpu::AdamWTensor> ts(g.numels.size());
        HostCounts host{lr, beta1, beta2};
        for (size_t i = 0; i < ts.size(); ++i) {
          host.next(*static_cast<float*>(g.state_data(i, kCounts, kCounts)));
          void* const* d = g.data.data() + i * g.stride;
          ts[i] = {d[0],      d[1], g.state_data(i, 0, kCounts), g.state_data(i, 1, kCounts),
                   amsgrad ? g.state_data(i, 3, kCounts) : nullptr, host.step_size, host.bc2_sqrt};
        }
        const auto acc = acc_type(g.dtype);
        if (gl != 0) {
          value = optim_cpu::adamw_group_step(args, g.params, g.grads, ts, prox_mode == "lr", lr, l1, l2, gl,
                                              grouping, compute_penalty != 0);
        } else {
          const double v = optim_cpu::run_adamw(args, ts, g.numels, acc, l1, l2);
          if (compute_penalty) value = at::scalar_tensor(v, at::TensorOptions().dtype(acc));
        }
      } else {
        const at::TensorList maxima = amsgrad ? at::TensorList(g.states[3]) : at::TensorList();
        value = adamw_op.call(g.params, g.grads, g.states[0], g.states[1], maxima, g.states[2], lr_tensor, lr, beta1,
                              beta2, eps, weight_decay, amsgrad != 0, maximize != 0, l1, l2, gl, grouping, prox_mode,
                              compute_penalty != 0);
      }
      if (compute_penalty) values.push_back(std::move(value));
    }
    bump_step(groups);
  }
  return wrap_list(values);
}

}  // namespace

PyObject* sgd_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  return sgd_step_impl(args, false);
  END_HANDLE_TH_ERRORS
}

PyObject* sgd_flat(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  return sgd_step_impl(args, true);
  END_HANDLE_TH_ERRORS
}

PyObject* adamw_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  return adamw_step_impl(args, false);
  END_HANDLE_TH_ERRORS
}

PyObject* adamw_flat(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  return adamw_step_impl(args, true);
  END_HANDLE_TH_ERRORS
}

}  // namespace host
}  // namespace regfast
