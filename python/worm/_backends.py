"""The implementations behind ``torch.ops.worm.*`` and the choice among them.

Four implementations compute the ops of :mod:`worm.ops` (the contract):

``reference``  pure PyTorch (each op module's ``reference``, :mod:`worm.reference`);
               any device; always there.
``cpp``        the native extension ``worm._C`` (csrc/, ``torch.ops.worm_native.*``);
               CPU tensors; there when the extension is built for the running torch.
``cuda``       the same extension built with CUDA; CUDA tensors.
``triton``     the Triton kernels (``worm_kernels/``); CUDA tensors, or CPU tensors
               under ``TRITON_INTERPRET=1``.

This module only routes. Each implementation takes *checked* arguments (each op's
module in :mod:`worm.ops` checks them once for all) in the raw op signature:
contiguous inputs, ``sgd_step_`` buffers allocated by the caller with ``fresh`` flags.
``WORM_BACKEND`` forces one implementation; unset, CPU tensors get cpp, then the
reference; CUDA tensors get ``cuda+triton`` when both are there (the CUDA ops sample,
Triton updates: the measured split is in bench/README.md), else triton, then cuda,
then the reference.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch


BACKENDS = ("triton", "cpp", "cuda", "reference")

_why_not: dict = {}   # name -> why it could not be loaded
_loaded: dict = {}    # name -> Impl or None
_chosen: dict = {}    # (WORM_BACKEND, device type) -> Impl


class Impl:
    """One implementation of the ops (raw signatures, checked arguments).

    ``sample_mask_``: a fused sampling step, or None to run the implementation's
    select and mask update under the op's rule (:mod:`worm.ops.sample_mask`);
    ``sample_max_rows``: the most window rows the fused step takes (longer windows
    run the two ops). ``max_window``: the most window rows one mask update takes
    (the Triton kernel keeps per-row counts in registers); None where there is no limit.
    """

    def __init__(self, name, select_thresholds, mask_update_, truncate_, sgd_step_,
                 sample_mask_=None, sample_max_rows=None, max_window=None):
        self.name = name
        self.select_thresholds = select_thresholds
        self.mask_update_ = mask_update_
        self.truncate_ = truncate_
        self.sgd_step_ = sgd_step_
        self.sample_mask_ = sample_mask_
        self.sample_max_rows = sample_max_rows
        self.max_window = max_window

    def __repr__(self):
        return f"Impl({self.name!r})"


_reference_impl: Optional[Impl] = None


def use_reference(impl: Impl) -> None:
    """Called once by :mod:`worm.ops`, which holds each op's reference (the router
    does not import the ops: they import it)."""
    global _reference_impl
    _reference_impl = impl
    _loaded.pop("reference", None)
    _chosen.clear()


def _reference():
    if _reference_impl is None:
        raise ImportError("worm.ops is not imported (it provides the reference)")
    return _reference_impl


def _triton():
    importlib.import_module("worm_kernels")  # ImportError (with the reason) if no Triton
    from worm_kernels.mask_update import MAX_WINDOW, mask_update_
    from worm_kernels.sgd_step import sgd_step_
    from worm_kernels.threshold_select import select_thresholds
    from worm_kernels.truncate import truncate_
    return Impl("triton", select_thresholds, mask_update_, truncate_, sgd_step_,
                max_window=MAX_WINDOW)


def _native(name):
    from . import _native as nat
    mod = nat.load()
    if name == "cuda" and not nat.with_cuda():
        raise RuntimeError("worm._C was built without CUDA (no nvcc, no GPU at build time, or "
                           "WORM_NO_CUDA=1); rebuild with WORM_FORCE_CUDA=1 for the CUDA ops")
    ops = torch.ops.worm_native
    if name == "cpp":  # the fused sampling step is CPU-only (csrc/select_thresholds_cpu.cpp)
        return Impl(name, ops.select_thresholds, ops.mask_update_, ops.truncate_, ops.sgd_step_,
                    ops.sample_mask_, sample_max_rows=mod.sample_max_rows)
    return Impl(name, ops.select_thresholds, ops.mask_update_, ops.truncate_, ops.sgd_step_)


# ------------------------------------------------------------------ choosing
def load(name: str) -> Optional[Impl]:
    """The implementation, or None (with the reason kept for :func:`why_not`)."""
    if name in _loaded:
        return _loaded[name]
    impl = None
    try:
        if name == "reference":
            impl = _reference()
        elif name == "triton":
            impl = _triton()
        elif name in ("cpp", "cuda"):
            impl = _native(name)
        else:
            raise ValueError(f"unknown backend {name!r}; one of {BACKENDS}")
    except Exception as e:  # noqa: BLE001 - any import/build failure means "not available"
        _why_not[name] = f"{type(e).__name__}: {e}"
    _loaded[name] = impl
    return impl


def unusable(name: str, device: torch.device) -> Optional[str]:
    """None if ``name`` can run on ``device``, else the reason it cannot."""
    if name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type}"
    if name == "cpp" and device.type != "cpu":
        return "the C++ ops take CPU tensors"
    if name == "cuda" and device.type != "cuda":
        return "the CUDA ops take CUDA tensors"
    if load(name) is None:
        return _why_not.get(name, "not available")
    return None


def _order(device: torch.device):
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    if device.type == "cpu":
        return ("cpp", "reference")
    return ("reference",)


def forced() -> str:
    return os.environ.get("WORM_BACKEND", "").strip().lower()


def choose(device) -> Impl:
    """The implementation that runs ops on ``device`` now (``WORM_BACKEND`` first)."""
    device = torch.device(device)
    want = forced()
    key = (want, device.type)
    hit = _chosen.get(key)
    if hit is not None:
        return hit
    if want:
        if want not in BACKENDS:
            raise ValueError(f"WORM_BACKEND={want!r} is not one of {BACKENDS}; unset it to "
                             "let worm choose")
        why = unusable(want, device)
        if why is not None:
            raise RuntimeError(f"WORM_BACKEND={want} cannot run on {device}: {why}")
        impl = _loaded[want]
    else:
        ok = [n for n in _order(device) if unusable(n, device) is None]
        if device.type == "cuda" and "triton" in ok and "cuda" in ok:
            cu, tr = _loaded["cuda"], _loaded["triton"]
            impl = Impl("cuda+triton", cu.select_thresholds, cu.mask_update_, tr.truncate_,
                        tr.sgd_step_, max_window=cu.max_window)
        else:
            impl = _loaded[ok[0]]
    _chosen[key] = impl
    return impl


def info(device) -> dict:
    """Every implementation with ``"ok"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {name: (unusable(name, device) or "ok") for name in BACKENDS}


def available(device) -> list:
    """Names of the implementations that can run on ``device`` here."""
    return [n for n, why in info(device).items() if why == "ok"]
