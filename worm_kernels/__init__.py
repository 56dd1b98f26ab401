"""Fused Triton kernels for worm: the "triton" implementation of ``torch.ops.worm.*``
(:mod:`worm.ops`, docs/ops.md; chosen per device by :mod:`worm._backends`).

One file per op, each holding its kernel(s) and launcher; semantics are those of
:mod:`worm.reference`. Importing fails with ImportError when Triton is missing.
"""
from __future__ import annotations

import types

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("worm_kernels needs Triton (pip install triton)") from e

from .threshold_select import select_thresholds
from .mask_update import mask_update_
from .truncate import truncate_
from .sgd_step import sgd_step_

__all__ = ["backend", "select_thresholds", "mask_update_", "truncate_", "sgd_step_"]


def backend():
    return types.SimpleNamespace(name="triton", select_thresholds=select_thresholds,
                                 mask_update_=mask_update_, truncate_=truncate_,
                                 sgd_step_=sgd_step_)
