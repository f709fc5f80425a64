// Python entry point of the native op library `mplus_fast._C`.
// Op schemas are defined from Python (mplus_fast/ops/_library.py), so the ops exist even when
// this library failed to build or load; the C++/CUDA files only add kernels with
// TORCH_LIBRARY_IMPL. Importing this module runs those static registrations.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mplus_fast native kernels (registered with torch.library)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
