"""Compatibility layer over :mod:`worm.ops` for code that asks "which backend runs here".

``resolve(device)`` returns an object with the backend's ``name`` and the ops,
which are the public wrappers of :mod:`worm.ops` (so every call goes through
``torch.ops.worm.*``, its checks and its fake kernels). New code should call
:mod:`worm.ops` directly; the choice of implementation is in :mod:`worm._backends`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import _backends, ops
from ._backends import BACKENDS  # noqa: F401 - re-exported

__all__ = ["BACKENDS", "resolve", "backend", "backend_info"]


def _load(name: str):
    """The raw implementation ``name`` (checked arguments only; see worm._backends) or None."""
    return _backends.load(name)


def _usable(name: str, device: torch.device):
    """None if ``name`` can run on ``device``, else the reason it cannot."""
    return _backends.unusable(name, torch.device(device))


def resolve(device=None) -> SimpleNamespace:
    """The backend that runs ops on ``device`` now: ``name`` and the ops.

    Raises (``ValueError``/``RuntimeError``, saying why) when ``WORM_BACKEND`` names
    an unknown backend or one that cannot run on ``device``.
    """
    return _BY_NAME[ops.backend(device)]


# Built once: torch.compile traces resolve() inside WormSGD.step and cannot build objects.
_BY_NAME = {name: SimpleNamespace(name=name, select_thresholds=ops.select_thresholds,
                                  mask_update_=ops.mask_update_, sample_mask_=ops.sample_mask_,
                                  truncate_=ops.truncate_,
                                  sgd_step_=ops.sgd_step_)
            for name in BACKENDS + ("cuda+triton",)}


backend = ops.backend
backend_info = ops.backend_info
