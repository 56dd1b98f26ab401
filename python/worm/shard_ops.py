"""The two local passes of the sharded sampling step, native where built.

:mod:`worm.shard_select` selects a threshold over ranks by all-reducing what these
return; nothing here communicates. On CPU with the extension built they run in C++
(``csrc/shard_select_cpu.cpp``: one read of the entries, no temporaries); elsewhere
(CUDA, no build) in plain torch, which is also the oracle the tests hold them to.

* :func:`key_histogram`: per segment, a histogram of the keys (fp32 bit pattern of
  ``|w|``; float64 rounded to fp32 first) in ``[lo, hi)`` at ``(key - lo) >> shift``,
  plus the keys below ``lo`` and the NaN/Inf ones; ``stride > 1`` reads one run of
  4096 entries in every ``stride`` (a sample).
* :func:`window_split_`: writes the head row of the ring (bit set iff key >= hi),
  counts the differing bits against every row, tallies the keys below / inside /
  NaN-Inf per tensor and returns the inside entries' keys and bit positions (at most
  ``cap`` of them).
* :func:`window_fix_`: sets the head-row bits of collected entries above their
  tensor's threshold key; returns how much each row's XOR count moves.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .packing import byte_offsets, pack, popcount

__all__ = ["key_histogram", "window_split_", "window_fix_", "RUN", "INF_KEY", "MAX_ROWS", "native"]

RUN = 4096                 # entries in one sampled run
MAX_ROWS = 64              # window rows window_split_ counts in one read
INF_KEY = 0x7F800000       # keys at or above: Inf/NaN
_CHUNK = 1 << 16


def native(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the C++ passes serve these tensors (CPU, extension built)."""
    if not tensors or tensors[0].device.type != "cpu":
        return False
    try:
        from . import _native
        _native.load()
    except ImportError:
        return False
    return hasattr(torch.ops.worm_native, "window_split_")


def keys_of(t: torch.Tensor) -> torch.Tensor:
    """int64 keys of a tensor's entries (flat)."""
    f = t.detach().reshape(-1)
    f = f if f.dtype == torch.float32 else f.float()
    return (f.view(torch.int32) & 0x7FFFFFFF).long()


def _sampled(n: int, stride: int) -> torch.Tensor:
    """Entry indexes the C++ sample reads of a tensor of n entries (same strata, same picks)."""
    span = RUN * stride
    idx = []
    for base in range(0, n, span):
        stratum = base // span + 1
        pick = (((stratum * 0x9E3779B97F4A7C15) % (1 << 64)) >> 32) % stride
        i0 = base + pick * RUN
        if i0 < n:
            idx.append(torch.arange(i0, min(i0 + RUN, n)))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def key_histogram(tensors, segment, lo, hi, shift, bins: int, stride: int = 1) -> torch.Tensor:
    """int64 [S, bins + 2]: per segment the in-range histogram, then below-lo, then NaN/Inf."""
    if native(tensors):
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        return torch.ops.worm_native.key_histogram(list(tensors), list(segment), list(lo), list(hi),
                                                   list(shift), bins, stride)
    S = len(lo)
    dev = tensors[0].device
    out = torch.zeros(S, bins + 2, dtype=torch.int64, device=dev)
    for t, s in zip(tensors, segment):
        k = keys_of(t)
        if stride > 1:
            k = k[_sampled(k.numel(), stride).to(dev)]
        bad = k >= INF_KEY
        fin = k[~bad]
        inside = fin[(fin >= lo[s]) & (fin < hi[s])]
        out[s, :bins] += torch.bincount((inside - lo[s]) >> shift[s], minlength=bins)[:bins]
        out[s, bins] += (fin < lo[s]).sum()
        out[s, bins + 1] += bad.sum()
    return out


def window_split_(tensors, lo, hi, ring: torch.Tensor, head: int, cap: int):
    """(counts int64 [l], tally int64 [3, T], keys int32 [m], pos int64 [m]); see the module doc."""
    if native(tensors):
        return torch.ops.worm_native.window_split_(list(tensors), list(lo), list(hi), ring, head, cap)
    offsets = byte_offsets([t.numel() for t in tensors])
    tally = torch.zeros(3, len(tensors), dtype=torch.int64)
    keeps, keys, pos = [], [], []
    for i, t in enumerate(tensors):
        k = keys_of(t)
        keeps.append(k >= hi[i])
        inside = (k >= lo[i]) & (k < hi[i])
        tally[0, i], tally[1, i], tally[2, i] = int((k < lo[i]).sum()), int(inside.sum()), int((k >= INF_KEY).sum())
        where = torch.nonzero(inside).flatten()
        keys.append(k[where].int())
        pos.append(where + offsets[i] * 8)
    new = pack(keeps) if keeps else ring.new_zeros(0)
    counts = torch.stack([popcount(new ^ ring[j]).sum() for j in range(ring.shape[0])]).long()
    ring[head].copy_(new)
    keys, pos = torch.cat(keys), torch.cat(pos)
    if keys.numel() > cap:
        keys, pos = keys[:cap], pos[:cap]
    return counts, tally, keys, pos


def window_fix_(ring: torch.Tensor, head: int, keys, pos, sizes, thr) -> torch.Tensor:
    """int64 [l] count corrections; ``sizes[i]`` collected entries of tensor i, in order."""
    if ring.device.type == "cpu" and native([ring]):
        return torch.ops.worm_native.window_fix_(ring, head, keys, pos, list(sizes), list(thr))
    bound = torch.repeat_interleave(torch.tensor(list(thr), dtype=torch.int64),
                                    torch.tensor(list(sizes), dtype=torch.int64)).to(keys.device)
    up = pos[keys.long() > bound]
    corr = torch.zeros(ring.shape[0], dtype=torch.int64, device=ring.device)
    if up.numel():
        byte, bit = up >> 3, up & 7
        old = (ring.index_select(1, byte).long() >> bit) & 1
        corr = (1 - 2 * old).sum(1)
        ring[head].index_put_((byte,), torch.bitwise_left_shift(torch.ones_like(bit), bit).to(torch.uint8),
                              accumulate=True)
    return corr
