// The public calls' host path in one C++ walk (host_path.cpp): the Python functions of regfast._C
// that module.cpp registers.
#pragma once

#include <Python.h>

namespace regfast {
namespace host {

// Each returns None when the walk cannot take the call (a check fails, a tensor subclass, a grad
// to create, a device another backend serves): the Python path then runs, and raises where the
// input is wrong. See host_path.cpp.
PyObject* norms(PyObject* self, PyObject* args);
// penalty_walk(params, types, cpu, cuda, l1, l2, group_lasso, groups): the penalty's value, with one autograd node
// for the whole list (PenaltyFunction, a torch::autograd::Function) where grad mode is on and a tensor requires
// grad; or None.
PyObject* penalty(PyObject* self, PyObject* args);
PyObject* add_penalty_grad(PyObject* self, PyObject* args);
PyObject* prox(PyObject* self, PyObject* args);
PyObject* sgd_step(PyObject* self, PyObject* args);
// True when every tensor of the list is a plain dense float tensor with a grad matching it, else None.
PyObject* grads_ready(PyObject* self, PyObject* args);
// bump_versions(*lists): marks every tensor of the lists (or tuples) as written in place, as
// torch._C._increment_version does (an inference tensor has no counter: left alone), loading the
// objects and counters of later tensors ahead.
PyObject* bump_versions(PyObject* self, PyObject* args);
// host_bias_table(counts, lr, beta1, beta2, wide): adds 1 to each step count of `counts` (a one-dim contiguous
// float32 CPU tensor that does not require grad: a flat plan's counts) and returns AdamW's [−lr/(1 − β1ᵗ)]ₙ ++ [√(1 − β2ᵗ)]ₙ of the new counts
// (float64 if `wide`, else float32), computed as the reference computes them; None for any other `counts`.
PyObject* host_bias_table(PyObject* self, PyObject* args);
// digest(data): a 64-bit digest (an int) of the bytes `data`, several times faster than Python's hash of them:
// the Triton launcher's table caches hash their keys (a list's data pointers or numels, as bytes) by it.
PyObject* digest(PyObject* self, PyObject* arg);
PyObject* adamw_step(PyObject* self, PyObject* args);
// The optimizer steps of a CPU param group whose states are views of flat buffers (one per state and dtype).
PyObject* sgd_flat(PyObject* self, PyObject* args);
PyObject* adamw_flat(PyObject* self, PyObject* args);
// The walk alone, for backends that launch from Python (Triton): a list of (params, grads or None, index or
// None) per (device, dtype) group, or None.
PyObject* groups(PyObject* self, PyObject* args);
// The walk of an optimizer step from its plan alone, for the same backends: a list of (params, grads, a tuple of
// one list per state, empty for a state the step does not keep) per (device, dtype) group, or None.
PyObject* plan_groups(PyObject* self, PyObject* args);
// The same from a flat plan (states as views of one buffer per state and group): the params with a grad, their
// grads and their states' tensors per group, the states listed with their addresses in the buffers.
PyObject* plan_groups_flat(PyObject* self, PyObject* args);

}  // namespace host
}  // namespace regfast
