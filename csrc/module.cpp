// Entry point of regfast._C: the Python module. Importing it loads the library, and with it the
// kernels, which register themselves per device as implementations of the regfast_C ops
// (TORCH_LIBRARY_IMPL in the files of each op); the module's functions are the host path of the
// public calls (host_path.cpp).
//
// The ops' schemas are not written here: regfast._ops defines each op once, in the regfast
// namespace, and defines regfast_C with the same schemas when this module loads (regfast._ext),
// so the compiled kernels implement exactly the contract every other backend implements.
#include <Python.h>
#include <c10/util/Exception.h>

#include "cpu_passes.h"
#include "host_path.h"

#ifdef REGFAST_WITH_CUDA
#include "cuda_tables.h"
#define REGFAST_CUDA_FLAG 1
#else
#define REGFAST_CUDA_FLAG 0
#endif

// cpu_isa() -> the name of the instruction set the CPU kernels run ("baseline" or "avx2", cpu_passes.h).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(regfast::cpu::isa_name(regfast::cpu::active_isa()));
  } catch (const c10::Error& e) {  // REGFAST_CPU_ISA names no instruction set this CPU runs
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// set_cpu_isa(name) -> the previous one's name; ValueError for a name that is unknown or that this CPU lacks.
static PyObject* set_cpu_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  const char* previous = nullptr;
  try {
    previous = regfast::cpu::isa_name(regfast::cpu::active_isa());
    regfast::cpu::set_isa(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

#ifdef REGFAST_WITH_CUDA
// cuda_table_cache() -> (entries, entries kept for captured graphs, hits, misses) of the CUDA device tables.
static PyObject* cuda_table_cache(PyObject*, PyObject*) {
  const auto s = regfast::table_cache_stats();
  return Py_BuildValue("(nnnn)", static_cast<Py_ssize_t>(s[0]), static_cast<Py_ssize_t>(s[1]),
                       static_cast<Py_ssize_t>(s[2]), static_cast<Py_ssize_t>(s[3]));
}
#endif

// The public calls' host path in one C++ walk (host_path.cpp); regfast._ops calls them.
static PyMethodDef regfast_methods[] = {
    {"norms_walk", regfast::host::norms, METH_VARARGS,
     "norms_walk(params, types, cpu, cuda) -> (per_l1, per_l2sq) or None"},
    {"penalty_walk", regfast::host::penalty, METH_VARARGS,
     "penalty_walk(params, types, cpu, cuda, l1, l2, group_lasso, groups) -> value (with its gradient) or None"},
    {"add_penalty_grad_walk", regfast::host::add_penalty_grad, METH_VARARGS,
     "add_penalty_grad_walk(params, types, cpu, cuda, l1, l2, group_lasso, groups) -> value or None"},
    {"prox_walk", regfast::host::prox, METH_VARARGS,
     "prox_walk(params, types, cpu, cuda, lr_tensor, lr, l1, l2, group_lasso, groups) -> True or None"},
    {"groups_walk", regfast::host::groups, METH_VARARGS,
     "groups_walk(params, types, cpu, cuda, grads, write_params, listed=None, dims=True, by_address=None) -> "
     "[(params, grads or None, index or None)] per (device, dtype) group in order of first appearance, or None; with "
     "a list subclass `listed`, each list is one, with the attributes addresses, sizes, dense, flat and shared, and "
     "the params' dims unless dims is false (host_path.cpp, wrap_walked); with a type `by_address` too "
     "(regfast._common.ByAddress), the walk bumps the version counters of what the call writes itself, and the "
     "grads come as by_address(first, count, addresses, None, False)"},
    {"plan_groups_walk", regfast::host::plan_groups, METH_VARARGS,
     "plan_groups_walk(params, types, cpu, cuda, planned, states, counts, listed=None, dims=True) -> [(params, grads, "
     "(state lists))] per (device, dtype) group of an optimizer step's plan (states: one tuple per state, () if "
     "unused; counts: the index of the step counts among them, -1 if none), or None; `listed` and `dims` as for "
     "groups_walk"},
    {"bump_versions", regfast::host::bump_versions, METH_VARARGS,
     "bump_versions(*lists) -> None: bumps the version counter of every tensor of the lists, as "
     "torch._C._increment_version does"},
    {"host_bias_table", regfast::host::host_bias_table, METH_VARARGS,
     "host_bias_table(counts, lr, beta1, beta2, wide) -> AdamW's step sizes then square roots of the second bias "
     "corrections of the counts, each count incremented first; None unless counts is a one-dim contiguous float32 "
     "CPU tensor"},
    {"digest", regfast::host::digest, METH_O,
     "digest(data) -> a 64-bit digest (int) of the bytes data, for the Triton launcher's table caches"},
    {"plan_groups_flat_walk", regfast::host::plan_groups_flat, METH_VARARGS,
     "plan_groups_flat_walk(params, types, cpu, cuda, planned, numels, flats, states, counts, listed, "
     "by_address=None, grads_by_address=False, dims=True) -> [(params, grads, (state lists))] per (device, dtype) "
     "group with a param with a grad, of an optimizer step's flat plan (flats: per state the tuple of its buffers per "
     "group, () if unused; states: per state the plan's tensors), each list of the list subclass `listed` (as "
     "groups_walk's), or None; with a type `by_address` (regfast._common.ByAddress), the walk bumps the version "
     "counters of the stepped params and of the states' buffers itself, and the states (and with grads_by_address the "
     "grads) as by_address(first, count, addresses, flat, shared), for a launcher that reads them through their "
     "addresses"},
    {"grads_ready", regfast::host::grads_ready, METH_VARARGS,
     "grads_ready(params, types) -> True when every param is dense, floating, with a grad matching it; else None"},
    {"sgd_step_walk", regfast::host::sgd_step, METH_VARARGS,
     "sgd_step_walk(params, types, cpu, cuda, planned, buffers, lr_tensor, lr, momentum, dampening, weight_decay, "
     "nesterov, maximize, l1, l2, group_lasso, groups, compute_penalty) -> [value per group with compute_penalty] "
     "or None"},
    {"adamw_step_walk", regfast::host::adamw_step, METH_VARARGS,
     "adamw_step_walk(params, types, cpu, cuda, planned, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, "
     "lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, prox, compute_penalty) "
     "-> [value per group with compute_penalty] or None"},
    {"sgd_flat_walk", regfast::host::sgd_flat, METH_VARARGS,
     "sgd_flat_walk(params, types, cpu, cuda, planned, numels, buffers, lr_tensor, lr, ...) -> as sgd_step_walk; "
     "numels: the params' numels (int64), buffers: one flat buffer per dtype group"},
    {"adamw_flat_walk", regfast::host::adamw_flat, METH_VARARGS,
     "adamw_flat_walk(params, types, cpu, cuda, planned, numels, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, "
     "lr_tensor, lr, ...) -> as adamw_step_walk; each state: one flat buffer per dtype group"},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "cpu_isa() -> the instruction set of the CPU kernels: 'baseline', 'avx2' or 'avx512'"},
    {"set_cpu_isa", set_cpu_isa, METH_VARARGS,
     "set_cpu_isa(name) -> the previous instruction set; 'baseline', 'avx2' or 'avx512' (ValueError if this CPU "
     "lacks it)"},
#ifdef REGFAST_WITH_CUDA
    {"cuda_table_cache", cuda_table_cache, METH_NOARGS,
     "cuda_table_cache() -> (entries, kept for captured graphs, hits, misses) of the CUDA launcher's table cache"},
#endif
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef regfast_module = {PyModuleDef_HEAD_INIT, "_C", "regfast's compiled kernels (regfast_C ops).", -1,
                                     regfast_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&regfast_module);
  if (module == nullptr) return nullptr;
  // WITH_CUDA: whether the CUDA kernels were compiled in.
  if (PyModule_AddIntConstant(module, "WITH_CUDA", REGFAST_CUDA_FLAG) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
