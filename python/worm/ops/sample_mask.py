"""``torch.ops.worm.sample_mask_``: select_thresholds, then mask_update_, as one step.

Schema, checks, fake kernel, wrapper and the reference, together. The one rule this op
adds to the two it composes (:func:`compose`): where the set holds NaN/Inf the window
is left as it was and the counts are 0, so a failed sample leaves no half-written state.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from . import _common as C
from . import mask_update as _mask
from . import threshold_select as _select

SCHEMA = ("sample_mask_(Tensor[] tensors, int[] ks, str scope, Tensor(a!) window, int head) "
          "-> (Tensor, Tensor, Tensor)")


def check(tensors, ks, scope, window, head):
    _select.check(tensors, ks, scope)
    C.check_window(tensors, window, head, tensors[0].device)


def compose(select_thresholds, mask_update_):
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


reference = compose(_select.reference, _mask.reference)
reference.__doc__ = """(thr, nonfinite, counts): the reference select, then the reference
mask update with its thresholds; on NaN/Inf the window is unchanged and counts are 0."""


def implementation(impl, rows: int):
    """The backend's fused step where it has one for ``rows`` window rows, else its two
    ops under :func:`compose`."""
    fused = impl.sample_mask_
    if fused is not None and (impl.sample_max_rows is None or rows <= impl.sample_max_rows):
        return fused
    return compose(impl.select_thresholds, impl.mask_update_)


def _kernel(tensors, ks, scope, window, head):
    check(tensors, ks, scope, window, head)
    impl = C.choose(window.device)
    C.check_rows(impl, window)
    step = implementation(impl, window.shape[0])
    return step(C.contig(tensors), list(ks), scope, window, head)


def _fake(tensors, ks, scope, window, head):
    check(tensors, ks, scope, window, head)
    n = len(tensors)
    return (tensors[0].new_empty((n,), dtype=torch.float32),
            tensors[0].new_empty((n,), dtype=torch.int64),
            window.new_empty((window.shape[0],), dtype=torch.int64))


C.register("sample_mask_", SCHEMA, _kernel, _fake)


def sample_mask_(tensors: Sequence[torch.Tensor], ks: Sequence[int], scope: str,
                 window: torch.Tensor, head: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampling step: :func:`select_thresholds`, then :func:`mask_update_` with
    its thresholds into ``window[head]``. Returns ``(thr, nonfinite, counts)``.

    The same results as the two calls, with one difference that keeps state whole:
    where the set holds NaN/Inf (``nonfinite`` not all 0; ``thr`` NaN) the window is
    left exactly as it was and ``counts`` is all 0. The C++ kernel fuses the two
    (docs/ops.md, "Sampling in one pass"; its traffic: bench/README.md); other
    backends run the two ops.
    """
    tensors = C.nonempty(C.tensor_list(tensors, "sample_mask_ tensors"), "sample_mask_")
    return torch.ops.worm.sample_mask_([t.detach() for t in tensors], C.as_ks(ks), scope, window,
                                       int(head))
