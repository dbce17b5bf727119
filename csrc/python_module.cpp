// The Python module `dcvit_engine._C`. It holds no functions, one constant (cuda_archs):
// loading the shared library runs the TORCH_LIBRARY registrations, and the ops are then
// reached as torch.ops.dcvit.*.
// Kept apart from the op sources so the CMake build (libtorch, no Python) can skip it.
#include <Python.h>

// setup.py passes the CUDA archs it compiled as a bare token (8.0;9.0 -> 80_90)
#define DCVIT_STRINGIFY2(x) #x
#define DCVIT_STRINGIFY(x) DCVIT_STRINGIFY2(x)
#ifdef DCVIT_CUDA_ARCHS
#define DCVIT_CUDA_ARCHS_TEXT DCVIT_STRINGIFY(DCVIT_CUDA_ARCHS)
#else
#define DCVIT_CUDA_ARCHS_TEXT ""
#endif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dcvit_engine compiled ops, registered as torch.ops.dcvit.*",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  // "" when built without CUDA kernels; else e.g. "80_90" (sm_80 and sm_90)
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_archs", DCVIT_CUDA_ARCHS_TEXT) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
