"""The five ops of worm, ``torch.ops.worm.*``: the one contract every backend meets.

One module per op (``threshold_select``, ``mask_update``, ``sample_mask``,
``truncate``, ``sgd_step``) holds everything the op is: its schema, the one set of
input checks (the same exception type for the same misuse on every backend), its
fake kernel (so ``torch.compile`` and ``torch.export`` trace it as a single node),
its documented wrapper and its reference implementation with exactly the op's
arguments and results (re-exported by :mod:`worm.reference`, the oracle). The
semantics are in docs/ops.md and docs/method.md; the layout in docs/architecture.md.

Implementations register per device behind the schema (see :mod:`worm._backends`):
the C++ kernels (``worm._C``) on CPU when built, Triton or the CUDA kernels on CUDA,
the pure-PyTorch reference as the fallback, ``WORM_BACKEND`` to force one. The ops
exist, and compute, even when nothing native is built.

Exceptions, identical on every backend (raised before any backend runs):

* ``TypeError``  a dtype the op does not take (weights not fp32/bf16/fp16, a window
  or packed mask not uint8, thresholds not fp32), a sparse tensor, a non-tensor;
* ``ValueError`` sizes or counts that do not fit together, tensors on different
  devices, empty tensors or lists, k out of range, an unknown scope, an in-place
  target that is not contiguous, more window rows than the chosen backend takes in
  one call (:func:`max_window`);
* ``IndexError`` a window row (``head``) outside the window;
* ``RuntimeError`` the forced backend (``WORM_BACKEND``) cannot run on the device.

Read-only inputs may have any strided layout (they are made contiguous first);
in-place targets (``window``, truncated grads, params, momentum buffers) must be
contiguous, since the kernels write flat memory.

Why the Triton path is an opaque op under ``torch.compile`` rather than a
``torch.library.triton_op``: the kernels of ``worm_kernels/`` take one int64 table
of raw data pointers for a whole list of tensors (one launch for many tensors, as
torch's fused optimizers do). Such a table cannot be built from FakeTensors, and
Inductor could not see the tensors the kernels read and write through it, so
``wrap_triton`` cannot trace them; the fake kernels make each op one node of a
``fullgraph=True`` graph instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from . import mask_update as _mask_update
from . import sgd_step as _sgd_step
from . import threshold_select as _threshold_select
from . import truncate as _truncate
from ._common import FLOAT_DTYPES, SCHEMAS
from .mask_update import mask_update_
from .sample_mask import sample_mask_
from .sgd_step import sgd_step_
from .threshold_select import select_thresholds
from .truncate import truncate_

# The router's "reference" implementation: each op's reference (sample_mask_ runs the
# reference select and mask update under the op's rule).
_backends.use_reference(_backends.Impl(
    "reference", _threshold_select.reference, _mask_update.reference, _truncate.reference,
    _sgd_step.reference))


def backend(device=None) -> str:
    """Name of the implementation that runs the ops on ``device`` now."""
    return _backends.choose(_default_device(device)).name


def backend_info(device=None) -> dict:
    """Every implementation with ``"ok"`` or the reason it cannot run on ``device``."""
    return _backends.info(_default_device(device))


def max_window(device=None) -> Optional[int]:
    """The most window rows one ``mask_update_``/``sample_mask_`` call takes on
    ``device`` now (the chosen backend's limit), or None where there is no limit."""
    return _backends.choose(_default_device(device)).max_window


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


__all__ = ["select_thresholds", "mask_update_", "sample_mask_", "truncate_", "sgd_step_", "backend",
           "backend_info", "max_window", "SCHEMAS", "FLOAT_DTYPES"]
