// Entry point of regfast._C: the Python module. Importing it loads the library, and with it the
// kernels, which register themselves per device as implementations of the regfast_C ops
// (TORCH_LIBRARY_IMPL in the files of each op).
//
// The ops' schemas are not written here: regfast._ops defines each op once, in the regfast
// namespace, and defines regfast_C with the same schemas when this module loads (regfast._ext),
// so the compiled kernels implement exactly the contract every other backend implements.
#include <Python.h>

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
