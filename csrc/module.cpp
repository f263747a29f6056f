// Entry point of regfast._C: the regfast_C op schemas and the Python module.
//
// The kernels register themselves per device (TORCH_LIBRARY_IMPL in cpu_kernels.cpp, optim_cpu.cpp
// and cuda_ops.cpp); Python reaches them through torch.ops.regfast_C.*. Importing the module
// loads the library and with it every registration.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(regfast_C, m) {
  m.def("norms(Tensor[] params) -> (Tensor, Tensor)");
  m.def("penalty(Tensor[] params, float l1, float l2, float group_lasso, str groups) -> Tensor");
  m.def(
      "penalty_backward(Tensor grad, Tensor[] params, float l1, float l2, float group_lasso, str groups) "
      "-> Tensor[]");
  m.def(
      "add_penalty_grad_(Tensor[] params, Tensor(a!)[] grads, float l1, float l2, float group_lasso, "
      "str groups) -> Tensor");
  m.def(
      "prox_(Tensor(a!)[] params, Tensor? lr_tensor, float lr, float l1, float l2, float group_lasso, "
      "str groups) -> ()");
  // The fused optimizer steps: the ops regfast::sgd_step_ / regfast::adamw_step_ without the group
  // lasso, whose shrink needs every group's norm after the update (regfast.optim._ops runs the
  // group passes of prox_ after the step, or the reference step in Adam's metric).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? lr_tensor, float lr, "
      "float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, bool init_buffers, "
      "float l1, float l2, bool compute_penalty) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor? lr_tensor, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool amsgrad, bool maximize, float l1, float l2, str prox, "
      "bool compute_penalty) -> Tensor");
}

#ifdef REGFAST_WITH_CUDA
#define REGFAST_CUDA_FLAG 1
#else
#define REGFAST_CUDA_FLAG 0
#endif

static PyModuleDef regfast_module = {PyModuleDef_HEAD_INIT, "_C", "regfast's compiled kernels (regfast_C ops).", -1,
                                     nullptr};

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
