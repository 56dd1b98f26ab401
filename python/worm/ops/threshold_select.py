"""``torch.ops.worm.select_thresholds``: the k-th smallest ``|w|`` over a set of tensors.

Schema, checks, fake kernel, wrapper and the reference (``torch.kthvalue``), together.
Every implementation is a radix select on the fp32 bit pattern of ``|w|`` (docs/ops.md).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from . import _common as C

SCHEMA = "select_thresholds(Tensor[] tensors, int[] ks, str scope) -> (Tensor, Tensor)"


def check(tensors, ks, scope):
    C.check_weights(tensors, "select_thresholds tensors", tensors[0].device if tensors else None)
    C.check_ks(tensors, ks, scope)


def kth(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry of a flat fp32 tensor (1-indexed); ``-inf`` for k == 0."""
    if k == 0:
        return torch.tensor(-math.inf, dtype=torch.float32, device=flat.device)
    return torch.kthvalue(flat.cpu(), k).values.to(flat.device)


def reference(tensors, ks, scope):
    """(thr, nonfinite) by ``torch.kthvalue``: the oracle for every select kernel.

    ``thr`` fp32 [T]: the k-th smallest fp32 ``|w|`` of the set (global: one k, the
    threshold repeated per tensor) or of each tensor (layer), ``-inf`` where k == 0,
    NaN everywhere when the set holds any NaN/Inf; ``nonfinite`` int64 [T]: the
    NaN/Inf entries of each tensor.
    """
    nonfinite = torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors])
    scores = [t.detach().float().abs() for t in tensors]
    if int(nonfinite.sum()) != 0:
        return torch.full((len(tensors),), float("nan"), device=tensors[0].device), nonfinite
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores])
        thr = kth(flat, ks[0]).reshape(1).expand(len(scores)).clone()
    else:
        thr = torch.stack([kth(s.reshape(-1), k) for s, k in zip(scores, ks)])
    return thr, nonfinite


def _kernel(tensors, ks, scope):
    check(tensors, ks, scope)
    impl = C.choose(tensors[0].device)
    return impl.select_thresholds(C.contig(tensors), list(ks), scope)


def _fake(tensors, ks, scope):
    check(tensors, ks, scope)
    n = len(tensors)
    return (tensors[0].new_empty((n,), dtype=torch.float32),
            tensors[0].new_empty((n,), dtype=torch.int64))


C.register("select_thresholds", SCHEMA, _kernel, _fake)


def select_thresholds(tensors: Sequence[torch.Tensor], ks: Sequence[int],
                      scope: str = "global") -> Tuple[torch.Tensor, torch.Tensor]:
    """The k-th smallest ``|w|`` (1-indexed, fp32) over a set of tensors.

    ``scope="global"``: ``ks == [k]`` for the whole set, the threshold repeated once
    per tensor; ``"layer"``: one k per tensor. Returns ``(thr, nonfinite)``: ``thr``
    fp32 [T] (``-inf`` where k == 0; NaN everywhere if the set holds any NaN/Inf) and
    ``nonfinite`` int64 [T], the NaN/Inf entries of each tensor, which the caller
    checks (it is the op's only way to report them without a host sync).
    """
    tensors = C.nonempty(C.tensor_list(tensors, "select_thresholds tensors"), "select_thresholds")
    return torch.ops.worm.select_thresholds([t.detach() for t in tensors], C.as_ks(ks), scope)
