"""Loader for the native extension ``worm._C`` (csrc/).

Importing ``worm._C`` registers the kernels ``torch.ops.worm_native.*`` (CPU, plus
CUDA when it was built with CUDA). They are an implementation of the public ops
``torch.ops.worm.*`` (:mod:`worm.ops`), which route to them; nothing else calls them.
"""
from __future__ import annotations

import torch

_C = None


def load():
    """The extension module; ImportError saying why (not built, or built for another torch)."""
    global _C
    if _C is not None:
        return _C
    try:
        from . import _C as mod  # noqa: N811 - the extension's own name
    except ImportError as e:
        raise ImportError(
            "the native extension worm._C is not built (build it with "
            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`; "
            f"import said: {e})") from e
    built = getattr(mod, "torch_version", "unknown")
    if built != torch.__version__:
        raise ImportError(f"worm._C was built against torch {built} but torch "
                          f"{torch.__version__} is running; rebuild it")
    if not hasattr(mod, "sample_max_rows"):  # built from csrc/ older than this python/
        raise ImportError("worm._C is a stale build (built from older sources); rebuild it "
                          "with `python setup.py build_ext --inplace`")
    _C = mod
    return _C


def with_cuda() -> bool:
    return bool(load().with_cuda)
