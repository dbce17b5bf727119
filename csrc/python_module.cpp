// The Python module `dcvit_engine._C`. It holds no functions: loading the shared library
// runs the TORCH_LIBRARY registrations, and the ops are then reached as torch.ops.dcvit.*.
// Kept apart from the op sources so the CMake build (libtorch, no Python) can skip it.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dcvit_engine compiled ops, registered as torch.ops.dcvit.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
