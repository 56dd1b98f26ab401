"""Which optimizer steps count for ``EarlyBird(every=...)``: the ones that updated.

A step that did not update the weights must not be sampled: it would push a mask of
unchanged weights (distance 0) and fake a ticket. Two kinds are seen here:

* no gradient reached the representative set (``step()`` after ``zero_grad()``
  without a backward, a closure-less step on frozen tensors);
* a fused optimizer under ``GradScaler`` on an inf/NaN step: the scaler calls
  ``step()`` with ``optimizer.found_inf`` set and the kernel skips the update
  inside. (A non-fused optimizer's skipped step never runs, hence never counts.)

``found_inf`` lives on the device. Reading it every step would sync the host on the
hot path, so updates are summed on the device and read only when the next sample
may be due (the count rises by at most one per step): without skipped steps that is
once per sample, where the sample syncs anyway.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["UpdatedSteps"]


class UpdatedSteps:
    def __init__(self, params, every: int):
        self.params, self.every = list(params), every
        self.count = 0                 # updating steps known on the host
        self._pending: Optional[torch.Tensor] = None  # device sum of updates not yet read
        self._calls = 0                # steps summed in _pending

    def after_step(self, optimizer) -> bool:
        """Count one optimizer step; True when it updated and completes ``every`` updates."""
        if all(p.grad is None for p in self.params):
            return False
        found_inf = getattr(optimizer, "found_inf", None)
        if not isinstance(found_inf, torch.Tensor):
            self.settle()
            self.count += 1
            return self.count % self.every == 0
        updated = (found_inf.reshape(()) == 0).to(torch.int64)
        self._pending = updated if self._pending is None else self._pending + updated
        self._calls += 1
        next_due = (self.count // self.every + 1) * self.every
        if self.count + self._calls < next_due:
            return False  # cannot be due yet: no sync
        pending, this = torch.stack([self._pending, updated]).tolist()
        self.count += pending
        self._pending, self._calls = None, 0
        return bool(this) and self.count % self.every == 0

    def settle(self) -> int:
        """The exact count (reads the device sum if one is pending)."""
        if self._pending is not None:
            self.count += int(self._pending.item())
            self._pending, self._calls = None, 0
        return self.count
