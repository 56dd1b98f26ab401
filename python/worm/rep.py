"""One block of representative entries: a whole parameter, or a slice of one.

The slice case is the Q or K part of a packed QKV weight. The mask taken from a
``RepTensor`` has the shape of its slice; ``covers`` lists other parameters whose
gradients the same mask truncates (a BatchNorm's bias, beside its weight).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RepTensor"]


@dataclass(eq=False)
class RepTensor:
    """Representative entries living in ``param`` (or in ``param[index]``)."""

    param: torch.Tensor
    name: str
    index: Optional[tuple] = None
    covers: list = field(default_factory=list)

    @property
    def shape(self) -> torch.Size:
        if self.index is not None:  # on a meta tensor: slicing a sharded DTensor would gather it
            return torch.empty(self.param.shape, device="meta")[self.index].shape
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def values(self) -> torch.Tensor:
        """The entries, detached; a view when ``index`` is None or row-contiguous."""
        v = self.param.detach()
        return v if self.index is None else v[self.index]

    def contiguous_values(self) -> torch.Tensor:
        v = self.values()
        return v if v.is_contiguous() else v.contiguous()

    def full_mask(self, keep: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``keep`` placed in a param-shaped bool mask (True outside the slice)."""
        if self.index is None:
            return keep
        out = base if base is not None else torch.ones_like(self.param, dtype=torch.bool)
        out[self.index] = keep
        return out
