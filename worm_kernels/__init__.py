"""Fused Triton kernels for worm: the "triton" implementation of ``torch.ops.worm.*``
(:mod:`worm.ops`, docs/ops.md; chosen per device by :mod:`worm._backends`).

One file per op, each holding its kernel(s) and launcher; semantics are those of
the op modules' references (python/worm/ops/). The launchers take checked
arguments (the ops check every call once). Importing fails with ImportError when
Triton is missing.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("worm_kernels needs Triton (pip install triton)") from e

from .threshold_select import select_thresholds
from .mask_update import mask_update_
from .truncate import truncate_
from .sgd_step import sgd_step_

__all__ = ["select_thresholds", "mask_update_", "truncate_", "sgd_step_"]
