"""The pure-PyTorch reference: the oracle every kernel (Triton, C++, CUDA) is held to.

Semantics are those of docs/method.md and docs/ops.md; nothing here is tuned for speed.

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

# The packed layout has its own module; the reference re-exports it for its users.
from .packing import byte_offsets, pack, packed_nbytes, popcount, unpack

__all__ = [
    "SUPPORTED_DTYPES",
    "check_tensors",
    "check_ratio",
    "num_pruned",
    "scores",
    "thresholds",
    "masks",
    "packed_nbytes",
    "byte_offsets",
    "pack",
    "unpack",
    "popcount",
    "distance",
    "mask_update_",
    "window_stats",
    "truncate_",
    "sgd_step_",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
def _kth(flat: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return torch.tensor(-math.inf, dtype=torch.float32, device=flat.device)
    return torch.kthvalue(flat.cpu(), k).values.to(flat.device)


def thresholds(tensors: Sequence[torch.Tensor], prune_ratio: float,
               scope: str = "global") -> torch.Tensor:
    """fp32 tensor [T]: the threshold that applies to each tensor."""
    s = scores(tensors)
    p = check_ratio(prune_ratio)
    if scope == "global":
        flat = torch.cat([x.reshape(-1) for x in s])
        t = _kth(flat, num_pruned(flat.numel(), p))
        return t.reshape(1).expand(len(s)).clone()
    if scope == "layer":
        return torch.stack([_kth(x.reshape(-1), num_pruned(x.numel(), p)) for x in s])
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def masks(tensors: Sequence[torch.Tensor], prune_ratio: float, scope: str = "global") -> list:
    """Keep-masks (bool, True = keep), one per tensor, same shapes."""
    thr = thresholds(tensors, prune_ratio, scope)
    return [t.detach().float().abs() > thr[i] for i, t in enumerate(tensors)]


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
def mask_update_(tensors: Sequence[torch.Tensor], thr: torch.Tensor,
                 window: torch.Tensor, head: int) -> torch.Tensor:
    """The fused sampling op: new mask into ``window[head]``, XOR counts per row.

    ``thr`` is fp32 [T] (see :func:`thresholds`); ``window`` uint8 [l, B].
    Returns int64 [l]: popcount(new XOR previous content of row j) for each row j.
    """
    keep = [t.detach().float().abs() > thr[i] for i, t in enumerate(tensors)]
    new = pack(keep).to(window.device)
    counts = torch.stack([popcount(new ^ window[j]) for j in range(window.shape[0])])
    window[head].copy_(new)
    return counts


def window_stats(counts: Sequence[int], n: int) -> tuple:
    """(d_max, d_avg) from the XOR counts against the l-1 older masks."""
    d = [c / n for c in counts]
    return max(d), sum(d) / len(d)


# ------------------------------------------------------------------ truncation
def truncate_(grads: Sequence[torch.Tensor], keep_bits: Sequence[torch.Tensor], r: float) -> None:
    """In place: g <- g * (keep ? 1 : r). ``keep_bits[i]`` is the packed mask of grads[i]."""
    # The product is formed in fp32 and rounded once to the gradient's dtype (for
    # fp32 gradients this is exactly a hook computing ``g * where(keep, 1, r)``).
    for g, bits in zip(grads, keep_bits):
        keep = unpack(bits, [g.shape])[0]
        scale = torch.where(keep, torch.ones((), device=g.device),
                            torch.full((), float(r), dtype=torch.float32, device=g.device))
        g.copy_(g.float() * scale)


def sgd_step_(params, grads, momentum_buffers, keep_bits, *, r: float, lr: float,
              weight_decay: float, momentum: float, dampening: float,
              nesterov: bool, maximize: bool) -> list:
    """One WormSGD step: truncation (a gradient hook) then torch.optim.SGD's math.

    ``momentum_buffers[i]`` is None before the first step with momentum; the new
    buffers are returned. ``keep_bits[i]`` None means no truncation for that param.
    Grads are not modified. Follows torch.optim.SGD's single-tensor path op by op,
    so with no truncation (or r == 1) the result is bit-for-bit SGD's.
    """
    new_bufs = []
    for i, p in enumerate(params):
        g = grads[i]
        if keep_bits[i] is not None and r != 1.0:
            g = g.clone()
            truncate_([g], [keep_bits[i]], r)
        g = g if not maximize else -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        buf = momentum_buffers[i]
        if momentum != 0:
            if buf is None:
                buf = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        new_bufs.append(buf)
    return new_bufs
