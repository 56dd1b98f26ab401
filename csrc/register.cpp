// The native kernels' schemas (torch.ops.worm_native.*) and the Python module worm._C,
// which records the torch it was built against so the loader can refuse a stale build.
// The public ops torch.ops.worm.* are owned by python/worm/ops/ (one module per op:
// schema, checks, fake kernel, reference); it routes CPU/CUDA calls here when this
// backend is chosen. The schemas below are those of python/worm/ops/*.py (SCHEMA);
// tests/ops/test_schemas.py asserts they are identical.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

#ifndef WORM_TORCH_VERSION
#define WORM_TORCH_VERSION "unknown"
#endif
#ifndef WORM_WITH_CUDA
#define WORM_WITH_CUDA 0
#endif

TORCH_LIBRARY(worm_native, m) {
  m.def("select_thresholds(Tensor[] tensors, int[] ks, str scope) -> (Tensor, Tensor)");
  m.def("mask_update_(Tensor[] tensors, Tensor thr, Tensor(a!) window, int head) -> Tensor");
  m.def(
      "sample_mask_(Tensor[] tensors, int[] ks, str scope, Tensor(a!) window, int head) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("truncate_(Tensor(a!)[] grads, Tensor[] keep_bits, float r) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "int[] fresh, Tensor?[] keep_bits, *, float r, float lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize) -> ()");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "worm's native kernels, registered as torch.ops.worm_native.*", -1,
                            nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", WORM_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", WORM_WITH_CUDA);
  PyModule_AddIntConstant(m, "sample_max_rows", worm::kSampleMaxRows);
  return m;
}
