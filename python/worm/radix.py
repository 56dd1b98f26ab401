"""Threshold selection as radix passes that can be driven one at a time (pure PyTorch).

``select_thresholds`` (docs/ops.md) finds the k-th smallest score exactly by a radix
select on the *key* of each entry: the fp32 bit pattern of ``|w|`` (31 bits; for
non-negative floats, integer order of the keys is numeric order, and NaN/Inf keys
sit above every finite one). The 31 bits are split into three digits,
``DIGITS = ((20, 11), (10, 10), (0, 10))`` as (shift, bits). Pass ``p`` counts, per
segment (the whole set for ``scope="global"``, each tensor for ``"layer"``), the
digit ``p`` of the keys whose higher digits equal the prefix chosen so far; the
bucket holding the k-th key extends the prefix and k becomes its rank inside the
bucket. After the last pass the prefix is the threshold's key.

Because a pass's histogram is a plain sum over entries, a set split across ranks
(data/tensor parallel shards) selects exactly the same threshold when each pass's
histograms are summed across ranks (``all_reduce``) before :func:`descend`::

    state = start(ks)
    for p in range(len(DIGITS)):
        h = histogram(local_tensors, segment_of, state, p)   # int64 [S, 2**bits]
        dist.all_reduce(h)                                   # the only communication
        state = descend(state, h, p)
    thr = finish(state, segment_of)

Everything stays on the device (no host sync). The Triton and C++ kernels run the
same digits fused into fewer launches; this module is their per-pass twin, tested
against the reference (``worm.reference.thresholds``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

DIGITS = ((20, 11), (10, 10), (0, 10))   # (shift, bits) of the key, most significant first
NONFINITE_KEY = 0x7F800000               # keys at or above this are Inf/NaN


class State(NamedTuple):
    """Per segment: key bits chosen so far and the rank (1-indexed) still sought."""
    prefix: torch.Tensor  # int64 [S]
    k: torch.Tensor       # int64 [S]; 0 means "threshold -inf" (nothing pruned)


def keys(t: torch.Tensor) -> torch.Tensor:
    """int64 keys of the entries of ``t`` (flat): bits of |w| as fp32."""
    return (t.detach().float().reshape(-1).view(torch.int32) & 0x7FFFFFFF).long()


def segments(num_tensors: int, scope: str) -> list:
    """Segment of each tensor: all 0 for ``"global"``, its own index for ``"layer"``."""
    if scope == "global":
        return [0] * num_tensors
    if scope == "layer":
        return list(range(num_tensors))
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def start(ks: Sequence[int], device=None) -> State:
    k = torch.as_tensor(list(ks), dtype=torch.int64, device=device)
    return State(torch.zeros_like(k), k)


def histogram(tensors: Sequence[torch.Tensor], segment_of: Sequence[int], state: State,
              p: int) -> torch.Tensor:
    """int64 [S, 2**bits]: counts of digit ``p`` among keys matching the prefix."""
    shift, bits = DIGITS[p]
    hist = torch.zeros(state.k.numel(), 1 << bits, dtype=torch.int64, device=state.k.device)
    above = shift + bits
    for t, s in zip(tensors, segment_of):
        key = keys(t).to(hist.device)
        digit = (key >> shift) & ((1 << bits) - 1)
        if p == 0:
            hist[s].index_add_(0, digit, torch.ones_like(digit))
        else:
            hist[s].index_add_(0, digit, ((key >> above) == state.prefix[s]).long())
    return hist


def descend(state: State, hist: torch.Tensor, p: int) -> State:
    """The bucket holding each segment's k-th key, appended to its prefix."""
    _, bits = DIGITS[p]
    c = hist.cumsum(1)
    bucket = (c < state.k[:, None]).sum(1).clamp_(max=(1 << bits) - 1)
    before = torch.where(torch.arange(hist.shape[1], device=hist.device) < bucket[:, None],
                         hist, 0).sum(1)
    return State((state.prefix << bits) | bucket, state.k - before)


def finish(state: State, segment_of: Sequence[int], nonfinite=None) -> torch.Tensor:
    """fp32 [T]: each tensor's threshold (-inf where k == 0; NaN everywhere when
    ``nonfinite`` (int64 [T], summed over ranks when sharded) counts any NaN/Inf)."""
    seg = torch.as_tensor(list(segment_of), dtype=torch.int64, device=state.k.device)
    thr = state.prefix.to(torch.int32).view(torch.float32)
    thr = torch.where(state.k == 0, float("-inf"), thr)
    if nonfinite is not None:
        thr = torch.where(nonfinite.sum() > 0, float("nan"), thr)
    return thr[seg]


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [T]: NaN/Inf entries per tensor."""
    return torch.stack([(keys(t) >= NONFINITE_KEY).sum() for t in tensors])


def select_thresholds(tensors: Sequence[torch.Tensor], ks: Sequence[int], scope: str):
    """``(thr, nonfinite)`` of ``torch.ops.worm.select_thresholds``, pass by pass."""
    tensors = list(tensors)
    seg = segments(len(tensors), scope)
    state = start(ks, tensors[0].device)
    for p in range(len(DIGITS)):
        state = descend(state, histogram(tensors, seg, state, p), p)
    nf = nonfinite_counts(tensors)
    return finish(state, seg, nf), nf


__all__ = ["DIGITS", "State", "keys", "segments", "start", "histogram", "descend", "finish",
           "nonfinite_counts", "select_thresholds"]
