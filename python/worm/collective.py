"""Ranks that never drift apart: every all-reduce of a sharded sampling step carries a
failure flag, and the first one what the ranks must agree on.

A rank whose local work fails (out of memory building its truncation bits, a bad
dtype, ...) still joins every remaining all-reduce of the step, with its flag set
and zeros for a payload; after each all-reduce every rank looks at the summed flags,
so all ranks raise the same :class:`RankFailure` at the same point and the search
rolls every rank back to the same state. Nothing more is sent than a few int64 slots
in the all-reduces the step runs anyway.

Agreement on values ``v`` (window count, search state, dtypes): each rank adds ``v``
and ``v * v``; the ranks agree iff ``W * sum(v^2) == sum(v)^2`` (Cauchy-Schwarz), a
test every rank evaluates on the same sums, so all reach the same verdict.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["RankFailure", "Collective"]


class RankFailure(RuntimeError):
    """A sharded sampling step failed on some rank; every rank raises it, rolled back."""


class Collective:
    """The all-reduces of one sharded sampling step over ``group`` (``world`` ranks)."""

    def __init__(self, group, world: int, what: str):
        self.group, self.world, self.what = group, world, what
        self.failed: Optional[BaseException] = None
        self.bytes = 0  # payload all-reduced so far
        self.precheck = None  # () -> None: raises to fail the step; runs in the first reduce

    def reduce(self, size: int, local: Callable[[], torch.Tensor], device=None,
               agree: Sequence[tuple] = ()) -> torch.Tensor:
        """SUM over ranks of ``local()`` (int64, ``size`` slots); raises RankFailure on every
        rank if any rank failed so far. ``agree``: [(name, int value)] checked equal."""
        payload = None
        if self.failed is None:
            try:
                check, self.precheck = self.precheck, None
                if check is not None:
                    check()
                payload = local().reshape(-1).to(torch.int64)
                if payload.numel() != size:
                    raise RuntimeError(f"worm internal: payload of {payload.numel()} slots, expected {size}")
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                self.failed, payload = e, None
        vals = [int(v) for _, v in agree]
        head = torch.tensor([1 if self.failed is not None else 0,
                             *[0 if self.failed is not None else v for v in vals],
                             *[0 if self.failed is not None else v * v for v in vals]], dtype=torch.int64)
        if payload is None:
            payload = torch.zeros(size, dtype=torch.int64)
        buf = torch.cat([head.to(payload.device), payload])
        if device is not None and buf.device != torch.device(device):
            buf = buf.to(device)
        self.bytes += 8 * buf.numel()
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        n = len(vals)
        head = buf[:1 + 2 * n].tolist()  # one small copy: every rank must branch alike
        if head[0]:
            self._raise(head[0])
        for j, (name, _) in enumerate(agree):
            s, s2 = head[1 + j], head[1 + n + j]
            if self.world * s2 != s * s:
                raise RankFailure(f"{self.what}: the ranks disagree on {name} (every rank must hold "
                                  f"the same; here {vals[j]}): nothing was sampled")
        return buf[1 + 2 * n:]

    def _raise(self, failed_ranks: int):
        mine = self.failed
        msg = (f"{self.what} failed on {failed_ranks} of {self.world} rank(s); every rank "
               "rolled back its window to the state before the step")
        if mine is not None:
            raise RankFailure(f"{msg}. This rank's error: {type(mine).__name__}: {mine}") from mine
        raise RankFailure(f"{msg}. This rank did not fail; see the failing rank's error")
