"""The pure-PyTorch reference: the oracle every kernel (Triton, C++, CUDA) is held to.

One function per op with the op's own arguments and results (:func:`select_thresholds`,
:func:`mask_update_`, :func:`sample_mask_`, :func:`truncate_`, :func:`sgd_step_`, each
defined beside its op in :mod:`worm.ops`), plus the user-facing helpers built on them
(:func:`thresholds`, :func:`masks`, :func:`distance`, ...). Semantics are those of
docs/method.md and docs/ops.md; nothing here is tuned for speed.

Conventions shared with every backend
-------------------------------------
* **Score** of an entry: ``|w|`` computed in fp32 (bf16/fp16 upcast exactly).
  A non-finite score is an error naming the tensor.
* **k** for ``n`` entries and ratio ``p``: ``round(p * n)`` with Python's ``round``
  (banker's rounding), the same rule as ``torch.nn.utils.prune``.
* **Threshold**: the k-th smallest score, 1-indexed (``torch.kthvalue``); for
  ``k == 0`` it is ``-inf``. An entry is *kept* iff ``score > threshold`` (ties at the
  threshold are pruned). Global scope: one threshold for the whole set, stored
  repeated once per tensor; layer scope: one per tensor with its own ``k``.
* **Packed mask of a set of tensors**: one flat ``uint8`` tensor. Tensor ``i`` (its
  entries in row-major order) owns ``ceil(n_i / 8)`` bytes starting at byte offset
  ``sum_{j<i} ceil(n_j / 8)``. Entry ``e`` of tensor ``i`` is bit ``e % 8`` (least
  significant first) of byte ``offset_i + e // 8``. Padding bits are 0. A set bit
  means *keep*.
* **Window**: a ring buffer ``uint8 [l, B]`` of the last ``l`` packed masks. Sampling
  writes the new mask over the oldest row (``head``) and counts, for every row, the
  differing bits against that row's previous content; the caller reads the counts of
  the ``l - 1`` rows that hold older masks.
* **Truncation**: ``g <- g * (keep ? 1 : r)`` before weight decay and momentum, i.e.
  exactly what a gradient hook multiplying the pruned entries by ``r`` does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .ops._common import FLOAT_DTYPES as SUPPORTED_DTYPES, check_scope
from .ops.mask_update import keep
from .ops.mask_update import reference as mask_update_
from .ops.sample_mask import reference as sample_mask_
from .ops.sgd_step import reference as sgd_step_
from .ops.threshold_select import kth as _kth
from .ops.threshold_select import reference as select_thresholds
from .ops.truncate import reference as truncate_
# The packed layout has its own module; the reference re-exports it for its users.
from .packing import byte_offsets, pack, packed_nbytes, popcount, unpack

__all__ = [
    "SUPPORTED_DTYPES",
    "check_tensors",
    "check_ratio",
    "num_pruned",
    "scores",
    "select_thresholds",
    "thresholds",
    "keep",
    "masks",
    "packed_nbytes",
    "byte_offsets",
    "pack",
    "unpack",
    "popcount",
    "distance",
    "mask_update_",
    "sample_mask_",
    "window_stats",
    "truncate_",
    "sgd_step_",
]


# ---------------------------------------------------------------- input checks
def check_ratio(prune_ratio: float) -> float:
    p = float(prune_ratio)
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"prune_ratio must lie in [0, 1), got {prune_ratio!r}")
    return p


def check_tensors(tensors: Sequence[torch.Tensor], what: str = "representative set") -> list:
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"the {what} is empty: no tensors to take a mask from")
    dev = tensors[0].device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; supported: fp32, bf16, fp16")
        if t.device != dev:
            raise ValueError(f"{what}[{i}] is on {t.device} but {what}[0] is on {dev}")
        if t.is_sparse:
            raise TypeError(f"{what}[{i}] is sparse; masks need dense tensors")
        if t.numel() == 0:
            raise ValueError(f"{what}[{i}] has no entries")
    return tensors


def num_pruned(n: int, prune_ratio: float) -> int:
    """k = round(p * n), the rule of torch.nn.utils.prune (banker's rounding)."""
    return int(round(check_ratio(prune_ratio) * n))


def scores(tensors: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None) -> list:
    """|w| in fp32 for each tensor; raises on NaN/Inf, naming the tensor."""
    tensors = check_tensors(tensors)
    out = []
    for i, t in enumerate(tensors):
        s = t.detach().float().abs()
        if not bool(torch.isfinite(s).all()):
            name = names[i] if names is not None else f"representative tensor {i}"
            raise ValueError(f"{name} (shape {tuple(t.shape)}) holds NaN or Inf; "
                             "a mask cannot be taken from non-finite weights")
        out.append(s)
    return out


# ------------------------------------------------------------------ thresholds
def thresholds(tensors: Sequence[torch.Tensor], prune_ratio: float,
               scope: str = "global") -> torch.Tensor:
    """fp32 tensor [T]: the threshold that applies to each tensor."""
    check_scope(scope)
    s = scores(tensors)
    p = check_ratio(prune_ratio)
    if scope == "global":
        flat = torch.cat([x.reshape(-1) for x in s])
        t = _kth(flat, num_pruned(flat.numel(), p))
        return t.reshape(1).expand(len(s)).clone()
    return torch.stack([_kth(x.reshape(-1), num_pruned(x.numel(), p)) for x in s])


def masks(tensors: Sequence[torch.Tensor], prune_ratio: float, scope: str = "global") -> list:
    """Keep-masks (bool, True = keep), one per tensor, same shapes."""
    thr = thresholds(tensors, prune_ratio, scope)
    return [keep(t, thr[i]) for i, t in enumerate(tensors)]


# -------------------------------------------------------------------- distance
def distance(keep_a, keep_b) -> float:
    """popcount(a XOR b) / N for two masks (bool tensors or lists of them, or packed)."""
    if isinstance(keep_a, torch.Tensor):
        keep_a, keep_b = [keep_a], [keep_b]
    keep_a, keep_b = list(keep_a), list(keep_b)
    if len(keep_a) != len(keep_b):
        raise ValueError(f"masks hold {len(keep_a)} and {len(keep_b)} tensors")
    n, diff = 0, 0
    for i, (a, b) in enumerate(zip(keep_a, keep_b)):
        if a.shape != b.shape:
            raise ValueError(f"mask {i} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.dtype != torch.bool or b.dtype != torch.bool:
            raise TypeError(f"mask {i}: masks are bool, got {a.dtype} and {b.dtype}")
        n += a.numel()
        diff += int((a ^ b.to(a.device)).sum())
    if n == 0:
        raise ValueError("distance between empty masks")
    return diff / n


# ---------------------------------------------------------------------- window
def window_stats(counts: Sequence[int], n: int) -> tuple:
    """(d_max, d_avg) from the XOR counts against the l-1 older masks."""
    d = [c / n for c in counts]
    return max(d), sum(d) / len(d)
