"""The one dispatch point between the package and its backends.

Every backend provides the same four ops, with the semantics of :mod:`worm.reference`
(its module docstring fixes the layouts):

``select_thresholds(tensors, ks, scope) -> (thr, nonfinite)``
    ``tensors``: list of fp32/bf16/fp16 tensors on one device (any shapes, contiguous).
    ``ks``: list of int; ``[k]`` for ``scope="global"`` (k-th smallest |w| over the
    whole set) or one k per tensor for ``scope="layer"``. Returns ``thr`` fp32 [T]
    (the threshold for each tensor; ``-inf`` where k == 0) and ``nonfinite`` int64 [T]
    (count of NaN/Inf entries per tensor). Must not sync with the host.

``mask_update_(tensors, thr, window, head) -> counts``
    Keep = |w| > thr[i]; writes the packed new mask into ``window[head]`` (uint8 [l, B])
    and returns int64 [l], popcount(new XOR old content) for every row.

``truncate_(grads, keep_bits, r)``
    In place, ``g *= keep ? 1 : r``; ``keep_bits[i]``: packed uint8 mask of grads[i].

``sgd_step_(params, grads, momentum_buffers, keep_bits, *, r, lr, weight_decay,
momentum, dampening, nesterov, maximize) -> momentum_buffers``
    One fused WormSGD step; entries of ``momentum_buffers`` may be None (first step:
    the buffer becomes the (truncated, decayed) gradient, as in torch.optim.SGD);
    entries of ``keep_bits`` may be None (no truncation for that param). Returns the
    buffers (new tensors where None came in). Grads are left unmodified.

Backends: ``reference`` (this package, pure PyTorch), ``triton`` (``worm_kernels``;
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cpp`` and ``cuda``
(``csrc/``, the native extension ``worm._C``, registered as ``torch.ops.worm.*``).
``WORM_BACKEND`` forces one; unset, CUDA tensors get triton, then cuda, then the
reference, and CPU tensors get cpp, then the reference.
"""
from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import Optional

import torch

from . import reference as _ref

BACKENDS = ("triton", "cpp", "cuda", "reference")

# Why a backend could not be loaded; shown by worm.backend_info().
_why_not: dict = {}
_loaded: dict = {}


def _reference_select_thresholds(tensors, ks, scope):
    nonfinite = torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors])
    scores = [t.detach().float().abs() for t in tensors]
    if int(nonfinite.sum()) != 0:
        return torch.full((len(tensors),), float("nan"), device=tensors[0].device), nonfinite
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores])
        thr = _ref._kth(flat, ks[0]).reshape(1).expand(len(scores)).clone()
    else:
        thr = torch.stack([_ref._kth(s.reshape(-1), k) for s, k in zip(scores, ks)])
    return thr, nonfinite


def _reference_backend():
    return SimpleNamespace(
        name="reference",
        select_thresholds=_reference_select_thresholds,
        mask_update_=_ref.mask_update_,
        truncate_=_ref.truncate_,
        sgd_step_=_ref.sgd_step_,
    )


def _load(name: str):
    """The backend object, or None (with the reason kept in _why_not)."""
    if name in _loaded:
        return _loaded[name]
    be = None
    try:
        if name == "reference":
            be = _reference_backend()
        elif name == "triton":
            mod = importlib.import_module("worm_kernels")
            be = mod.backend()
        elif name in ("cpp", "cuda"):
            from . import _native
            be = _native.backend(name)
    except Exception as e:  # noqa: BLE001 - any import/build failure means "not available"
        _why_not[name] = f"{type(e).__name__}: {e}"
        be = None
    _loaded[name] = be
    return be


def _usable(name: str, device: torch.device) -> Optional[str]:
    """None if ``name`` can run on ``device``, else the reason it cannot."""
    be = _load(name)
    if be is None:
        return _why_not.get(name, "not available")
    if name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type}"
    if name == "cpp" and device.type != "cpu":
        return "the C++ ops take CPU tensors"
    if name == "cuda" and device.type != "cuda":
        return "the CUDA ops take CUDA tensors"
    return None


def _order(device: torch.device):
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    return ("cpp", "reference")


def resolve(device=None):
    """The backend object that runs ops on ``device`` now."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    forced = os.environ.get("WORM_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"WORM_BACKEND={forced!r} is not one of {BACKENDS}")
        why = _usable(forced, device)
        if why is not None:
            raise RuntimeError(f"WORM_BACKEND={forced} cannot run on {device}: {why}")
        return _load(forced)
    for name in _order(device):
        if _usable(name, device) is None:
            return _load(name)
    raise RuntimeError("no backend available")  # reference always loads


def backend(device=None) -> str:
    """Name of the backend that runs now for ``device`` (default: cuda if present)."""
    return resolve(device).name


def backend_info(device=None) -> dict:
    """Every backend with ``"ok"`` or the reason it cannot run on ``device``."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    return {name: (_usable(name, device) or "ok") for name in BACKENDS}
