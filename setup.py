"""Package setup, with the native extension worm._C (csrc/) built when it can be.

The C++ ops are built whenever a C++ compiler is there; the CUDA ops too when torch
has CUDA (torch.version.cuda), nvcc is found (CUDA_HOME) and a GPU is present.
If the native build fails, the pure-Python package is still installed (with a
warning) and worm falls back to its other backends.

Environment:
  WORM_NO_NATIVE=1   skip the native extension entirely
  WORM_NO_CUDA=1     build the C++ ops only
  WORM_FORCE_CUDA=1  build the CUDA ops even without a GPU here (e.g. a build box)
  WORM_CUDA_ARCHS    "90;100" - compute capabilities to compile for (default: 90
                     plus the GPUs in hand)
"""
import os
import shutil
import sys

from setuptools import setup

# One file per op it implements (sample_mask_ is the select's plan with a window).
CPU_SOURCES = ["csrc/register.cpp", "csrc/select_thresholds_cpu.cpp", "csrc/mask_update_cpu.cpp",
               "csrc/sgd_step_cpu.cpp", "csrc/shard_select_cpu.cpp"]
CUDA_SOURCES = ["csrc/ops_cuda.cu"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg):
    print(f"\nWARNING (worm): {msg}\n", file=sys.stderr, flush=True)


def _cuda_archs(torch):
    env = os.environ.get("WORM_CUDA_ARCHS", "").replace(",", ";").strip()
    if env:
        archs = {a.strip().replace(".", "") for a in env.split(";") if a.strip()}
    else:
        archs = {"90"}
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                archs.add(f"{major}{minor}")
    return sorted(archs)


def _want_cuda(torch, cpp_ext):
    if _flag("WORM_NO_CUDA"):
        return False, "WORM_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if cpp_ext.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_ext.CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    if _flag("WORM_FORCE_CUDA"):
        return True, "WORM_FORCE_CUDA=1"
    if not torch.cuda.is_available():
        # The CUDA compile is most of the build time; without a GPU it cannot run here.
        return False, "no GPU here (WORM_FORCE_CUDA=1 builds the CUDA ops anyway)"
    return True, "GPU present"


def native_build():
    """(ext_modules, cmdclass), both empty when nothing native can be built."""
    if _flag("WORM_NO_NATIVE"):
        print("worm: WORM_NO_NATIVE=1, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        import torch.utils.cpp_extension as cpp_ext
    except Exception as e:  # noqa: BLE001
        _warn(f"torch cannot be imported ({e}); building without the native extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        _warn(f"no C++ compiler ({cxx}); building without the native extension")
        return [], {}

    macros = [("WORM_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard
    want_cuda, why = _want_cuda(torch, cpp_ext)
    print(f"worm: native extension: C++ ops; CUDA ops: {'yes' if want_cuda else 'no'} ({why})",
          file=sys.stderr)
    cpu_ext = cpp_ext.CppExtension(
        "worm._C", CPU_SOURCES, define_macros=macros + [("WORM_WITH_CUDA", "0")],
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    ext = cpu_ext
    if want_cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in _cuda_archs(torch)]
        ext = cpp_ext.CUDAExtension(
            "worm._C", CPU_SOURCES + CUDA_SOURCES,
            define_macros=macros + [("WORM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"] + gencode},
            extra_link_args=["-fopenmp"])

    base = cpp_ext.BuildExtension.with_options(use_ninja=True)

    class BuildNative(base):
        """Falls back to the C++-only build, then to none, instead of failing the install."""

        def build_extension(self, ext_):
            try:
                return super().build_extension(ext_)
            except Exception as e:  # noqa: BLE001
                if any(s.endswith(".cu") for s in ext_.sources):
                    _warn(f"the CUDA build of worm._C failed ({e}); retrying with the C++ ops only")
                    for attr in ("sources", "define_macros", "extra_compile_args",
                                 "extra_link_args", "libraries", "library_dirs",
                                 "include_dirs"):
                        setattr(ext_, attr, getattr(cpu_ext, attr))
                    self._worm_cuda_failed = True
                    return self.build_extension(ext_)
                _warn(f"building worm._C failed ({e}); worm installs without it and "
                      "uses its other backends")

        def build_extensions(self):
            # BuildExtension decides nvcc per extension up front; decide again on retry.
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                _warn(f"building worm._C failed ({e}); worm installs without it")

        def copy_extensions_to_source(self):
            try:
                super().copy_extensions_to_source()
            except Exception as e:  # noqa: BLE001
                _warn(f"worm._C was not built ({e})")

    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = native_build()

setup(
    package_dir={"worm": "python/worm", "worm_kernels": "worm_kernels"},
    packages=["worm", "worm.paper", "worm_kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
