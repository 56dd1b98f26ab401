"""The implementations behind ``torch.ops.worm.*`` and the choice among them.

Four implementations compute the ops of :mod:`worm.ops` (the contract):

``reference``  pure PyTorch (:mod:`worm.reference`); any device; always there.
``cpp``        the native extension ``worm._C`` (csrc/, ``torch.ops.worm_native.*``);
               CPU tensors; there when the extension is built for the running torch.
``cuda``       the same extension built with CUDA; CUDA tensors.
``triton``     the Triton kernels (``worm_kernels/``); CUDA tensors, or CPU tensors
               under ``TRITON_INTERPRET=1``.

Each implementation here takes *checked* arguments (``worm.ops`` checks them once for
all) in the raw op signature: contiguous inputs, ``sgd_step_`` buffers allocated by
the caller with ``fresh`` flags. ``WORM_BACKEND`` forces one implementation; unset,
CPU tensors get cpp, then the reference; CUDA tensors get ``cuda+triton`` when both
are there (the CUDA ops sample: select + mask update, 10-30x faster than the Triton
select on an H100; Triton updates: truncation and the SGD step, 10-25% faster than the
CUDA ones at 50M-1B entries; bench/results/), else triton, then cuda, then the
reference.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from . import reference as _ref

BACKENDS = ("triton", "cpp", "cuda", "reference")

_why_not: dict = {}   # name -> why it could not be loaded
_loaded: dict = {}    # name -> Impl or None
_chosen: dict = {}    # (WORM_BACKEND, device type) -> Impl


class Impl:
    """One implementation of the ops (raw signatures, checked arguments).

    ``sample_mask_`` defaults to the implementation's own select and mask update
    (:func:`composed_sample`); the C++ backend has a fused one.
    """

    def __init__(self, name, select_thresholds, mask_update_, truncate_, sgd_step_,
                 sample_mask_=None):
        self.name = name
        self.select_thresholds = select_thresholds
        self.mask_update_ = mask_update_
        self.truncate_ = truncate_
        self.sgd_step_ = sgd_step_
        self.sample_mask_ = sample_mask_ or composed_sample(select_thresholds, mask_update_)

    def __repr__(self):
        return f"Impl({self.name!r})"


def composed_sample(select_thresholds, mask_update_):
    """``sample_mask_`` from a select and a mask update, without a host sync: the head
    row is kept and put back where the set held NaN/Inf (one row copy each way)."""

    def sample_mask_(tensors, ks, scope, window, head):
        thr, nonfinite = select_thresholds(tensors, ks, scope)
        bad = nonfinite.sum() > 0
        row = window[head].clone()
        counts = mask_update_(tensors, thr, window, head)
        window[head] = torch.where(bad, row, window[head])
        return thr, nonfinite, torch.where(bad, 0, counts)

    return sample_mask_


# ------------------------------------------------------------------ reference
def reference_select_thresholds(tensors, ks, scope):
    """(thr, nonfinite) by ``torch.kthvalue``: the oracle for every select kernel."""
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


def _sgd_via_optional_buffers(step):
    """Adapts an ``sgd_step_`` that takes None for a missing buffer (and returns the
    buffers) to the op's signature: preallocated buffers flagged ``fresh``."""

    def sgd_step_(params, grads, bufs, fresh, bits, *, r, lr, weight_decay, momentum,
                  dampening, nesterov, maximize):
        if momentum != 0:
            given = [None if f else b for b, f in zip(bufs, fresh)]
        else:
            given = [None] * len(params)
        out = step(params, grads, given, bits, r=r, lr=lr, weight_decay=weight_decay,
                   momentum=momentum, dampening=dampening, nesterov=nesterov,
                   maximize=maximize)
        if momentum != 0:
            for b, f, o in zip(bufs, fresh, out):
                if f:  # first step: the new buffer lands in the caller's tensor
                    b.copy_(o)

    return sgd_step_


def _reference():
    return Impl("reference", reference_select_thresholds, _ref.mask_update_, _ref.truncate_,
                _sgd_via_optional_buffers(_ref.sgd_step_))


def _triton():
    importlib.import_module("worm_kernels")  # ImportError (with the reason) if no Triton
    from worm_kernels.mask_update import mask_update_
    from worm_kernels.sgd_step import sgd_step_
    from worm_kernels.threshold_select import select_thresholds
    from worm_kernels.truncate import truncate_
    return Impl("triton", select_thresholds, mask_update_, truncate_,
                _sgd_via_optional_buffers(sgd_step_))


def _native(name):
    from . import _native as nat
    nat.load()
    if name == "cuda" and not nat.with_cuda():
        raise RuntimeError("worm._C was built without CUDA (no nvcc, no GPU at build time, or "
                           "WORM_NO_CUDA=1); rebuild with WORM_FORCE_CUDA=1 for the CUDA ops")
    ops = torch.ops.worm_native
    # the fused sampling step is CPU-only (csrc/sample_cpu.cpp); CUDA runs the two ops
    # (a build from before the op existed lacks it: then the two ops run)
    fused = getattr(ops, "sample_mask_", None) if name == "cpp" else None
    return Impl(name, ops.select_thresholds, ops.mask_update_, ops.truncate_, ops.sgd_step_,
                fused)


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
                        tr.sgd_step_, cu.sample_mask_)
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
