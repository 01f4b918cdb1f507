// The Python module `condkernels._C`. It holds no Python functions: importing it loads the shared
// library, whose static initialisers register every op with the PyTorch dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "condkernels' compiled ops, registered under torch.ops.condkernels",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
