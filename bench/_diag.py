# Which C++ exceptions crash on this machine? (a worm._C op raising segfaulted on the GPU image)
import sys, torch, faulthandler, subprocess, os
faulthandler.enable()
from torch.utils.cpp_extension import load_inline
src = r'''
#include <torch/library.h>
at::Tensor boom(const at::Tensor& x, int64_t k) { TORCH_CHECK(k < 3, "k=", k, " too big"); return x; }
TORCH_LIBRARY(diag_%s, m) { m.def("boom(Tensor x, int k) -> Tensor"); }
TORCH_LIBRARY_IMPL(diag_%s, CPU, m) { m.impl("boom", &boom); }
'''
flags = {"plain": [], "openmp": ["-O3", "-fopenmp"]}[sys.argv[1]]
name = "diag_" + sys.argv[1]
load_inline(name, cpp_sources=[src % (sys.argv[1], sys.argv[1])], functions=None,
            extra_cflags=flags, extra_ldflags=["-fopenmp"] if flags else [], is_python_module=False, verbose=False)
op = getattr(torch.ops, name).boom
print(sys.argv[1], "ok call", op(torch.ones(1), 1), flush=True)
try:
    op(torch.ones(1), 5)
except RuntimeError as e:
    print(sys.argv[1], "raised fine:", str(e).splitlines()[0], flush=True)
