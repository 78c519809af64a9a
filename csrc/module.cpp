// The Python module of the shared library. It is imported once from Python for the op
// registrations (each form's files register its ops); the module itself only says whether the
// CUDA kernels were compiled in and which CPU loops run.
#include <Python.h>

#include "cpu/words.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_dropout operator registrations", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FUSED_DROPOUT_WITH_CUDA
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (module != nullptr && (PyModule_AddIntConstant(module, "with_cuda", kWithCuda) != 0 ||
                            PyModule_AddStringConstant(module, "cpu_loops", fused_dropout::cpu_loops_name()) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
