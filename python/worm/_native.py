"""Loader for the native extension ``worm._C`` (csrc/): the ``cpp`` and ``cuda`` backends.

Importing ``worm._C`` registers ``torch.ops.worm.*`` (CPU kernels, plus CUDA kernels
when it was built with CUDA). This module checks that the build matches the running
torch, registers fake kernels so ``torch.compile`` can trace the ops, and wraps them
in the backend interface of :mod:`worm._ops`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

_C = None
_fakes_registered = False


def _load_extension():
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
    _C = mod
    _register_fakes()
    return _C


def _register_fakes():
    """Shape-only kernels for FakeTensor tracing (torch.compile, opcheck)."""
    global _fakes_registered
    if _fakes_registered:
        return
    lib = "worm::"

    @torch.library.register_fake(lib + "select_thresholds")
    def _(tensors, ks, scope):
        t0 = tensors[0]
        n = len(tensors)
        return (t0.new_empty((n,), dtype=torch.float32), t0.new_empty((n,), dtype=torch.int64))

    @torch.library.register_fake(lib + "mask_update_")
    def _(tensors, thr, window, head):
        return window.new_empty((window.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(lib + "truncate_")
    def _(grads, keep_bits, r):
        return None

    @torch.library.register_fake(lib + "sgd_step_")
    def _(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
          momentum, dampening, nesterov, maximize):
        return None

    _fakes_registered = True


def with_cuda() -> bool:
    return bool(_load_extension().with_cuda)


# ------------------------------------------------------------------ op wrappers
def select_thresholds(tensors, ks, scope):
    tensors = [t.detach() for t in tensors]
    return torch.ops.worm.select_thresholds(tensors, [int(k) for k in ks], scope)


def mask_update_(tensors, thr, window, head):
    tensors = [t.detach() for t in tensors]
    return torch.ops.worm.mask_update_(tensors, thr, window, int(head))


def truncate_(grads, keep_bits, r):
    grads = list(grads)
    if grads:
        torch.ops.worm.truncate_(grads, list(keep_bits), float(r))


def sgd_step_(params, grads, momentum_buffers, keep_bits, *, r, lr, weight_decay, momentum,
              dampening, nesterov, maximize):
    """Backend signature of :mod:`worm._ops`: None buffers are created here (the kernel
    initialises them as torch.optim.SGD's first step does) and returned."""
    params = [p.detach() for p in params]
    if not params:
        return []
    bufs = list(momentum_buffers)
    if len(bufs) != len(params):
        raise ValueError(f"{len(params)} params but {len(bufs)} momentum buffers")
    if momentum != 0:
        fresh = [1 if b is None else 0 for b in bufs]
        bufs = [torch.empty_like(p, memory_format=torch.contiguous_format) if b is None else b
                for p, b in zip(params, bufs)]
        torch.ops.worm.sgd_step_(params, list(grads), bufs, fresh, list(keep_bits),
                                 r=float(r), lr=float(lr), weight_decay=float(weight_decay),
                                 momentum=float(momentum), dampening=float(dampening),
                                 nesterov=bool(nesterov), maximize=bool(maximize))
    else:
        torch.ops.worm.sgd_step_(params, list(grads), [], [], list(keep_bits),
                                 r=float(r), lr=float(lr), weight_decay=float(weight_decay),
                                 momentum=0.0, dampening=float(dampening),
                                 nesterov=bool(nesterov), maximize=bool(maximize))
    return bufs


def backend(name: str) -> SimpleNamespace:
    """The ``cpp`` (CPU tensors) or ``cuda`` (CUDA tensors) backend; raises with the reason."""
    if name not in ("cpp", "cuda"):
        raise ValueError(f"native backends are 'cpp' and 'cuda', not {name!r}")
    mod = _load_extension()
    if name == "cuda" and not mod.with_cuda:
        raise RuntimeError("worm._C was built without CUDA (no nvcc, no GPU at build time, or "
                           "WORM_NO_CUDA=1); rebuild with WORM_FORCE_CUDA=1 for the CUDA ops")
    return SimpleNamespace(name=name, select_thresholds=select_thresholds,
                           mask_update_=mask_update_, truncate_=truncate_, sgd_step_=sgd_step_)
