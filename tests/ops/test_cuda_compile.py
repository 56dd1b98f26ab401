"""Compile-only check of the CUDA sources (csrc/*.cu) for sm_90, with torch's headers
and the flags torch's BuildExtension passes to nvcc. Runs wherever nvcc exists, GPU
or not, so a CPU-only CI still catches CUDA compile errors."""
from __future__ import annotations

import glob
import inspect
import os
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


def _nvcc():
    home = cpp_ext.CUDA_HOME
    cand = os.path.join(home, "bin", "nvcc") if home else None
    if cand and os.path.exists(cand):
        return cand
    return shutil.which("nvcc")


def _include_paths():
    try:
        return cpp_ext.include_paths(device_type="cuda")  # torch >= 2.6
    except TypeError:
        return cpp_ext.include_paths(cuda=True)  # older signature


def _std_flag():
    # The C++ standard torch's own extension builds use for nvcc.
    return "-std=c++20" if "c++20" in inspect.getsource(cpp_ext) else "-std=c++17"


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/ holds no .cu file"


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm90(src, tmp_path):
    cmd = [_nvcc(), "-c", src, "-o", str(tmp_path / "out.o"),
           "-gencode=arch=compute_90,code=sm_90", "-O2", "-Xcompiler", "-fPIC",
           _std_flag(), *cpp_ext.COMMON_NVCC_FLAGS,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_EXTENSION_NAME=_C", '-DWORM_TORCH_VERSION="test"', "-DWORM_WITH_CUDA=1"]
    for inc in _include_paths():
        cmd += ["-I", inc]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed on {os.path.basename(src)}:\n{res.stderr[-6000:]}"
    assert os.path.getsize(tmp_path / "out.o") > 0
