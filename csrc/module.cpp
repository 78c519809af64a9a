// The Python module of the shared library. It is imported once from Python for the op
// registrations (each form's files register its ops); the module itself says whether the
// CUDA kernels were compiled in and which CPU loops run, and lets the DTensor handlers set the
// calling thread's mask window (checks.h).
#include <Python.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/words.h"

namespace {

// A Python sequence of ints as a vector; false (with a Python error set) if it is not one.
bool int_vector(PyObject* sequence, std::vector<int64_t>& out) {
  PyObject* fast = PySequence_Fast(sequence, "set_mask_window: sizes and origin must be sequences of ints");
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
  }
  Py_DECREF(fast);
  return !PyErr_Occurred();
}

// set_mask_window(sizes, origin) sets the calling thread's window; set_mask_window(None, None)
// clears it.
PyObject* set_mask_window(PyObject* /*self*/, PyObject* args) {
  PyObject* sizes = nullptr;
  PyObject* origin = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &sizes, &origin)) return nullptr;
  if (sizes == Py_None) {
    fused_dropout::set_mask_window(std::nullopt);
    Py_RETURN_NONE;
  }
  fused_dropout::MaskWindow window;
  if (!int_vector(sizes, window.sizes) || !int_vector(origin, window.origin)) return nullptr;
  fused_dropout::set_mask_window(std::move(window));
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_mask_window", set_mask_window, METH_VARARGS, "Sets or clears the calling thread's mask window."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_dropout operator registrations", -1, methods};
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
