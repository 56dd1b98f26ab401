"""One block of representative entries: a whole parameter, or a slice of one.

The slice case is the Q or K part of a packed QKV weight. The mask taken from a
``RepTensor`` has the shape of its slice; ``covers`` lists other parameters whose
gradients the same mask truncates (a BatchNorm's bias, beside its weight).
``live`` names where the ranked value is read when it is not the parameter itself:
a weight behind ``torch.nn.utils.parametrize`` is ranked by its parametrized value
(read anew at each sampling step), its gradient truncated on the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RepTensor", "Entries"]


class Entries:
    """Entries ``_source()[_slice()]`` of a tensor (all of it when the slice is None):
    the one place that reads them and places a mask of them back. :class:`RepTensor`
    reads its parameter; a sharded window's local view (worm.distributed) its shard."""

    def _source(self) -> torch.Tensor:
        raise NotImplementedError

    def _slice(self) -> Optional[tuple]:
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """The entries, detached; a view when the slice is None or row-contiguous."""
        v = self._source().detach()
        index = self._slice()
        return v if index is None else v[index]

    def contiguous_values(self) -> torch.Tensor:
        v = self.values()
        return v if v.is_contiguous() else v.contiguous()

    def full_mask(self, keep: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``keep`` placed in a source-shaped bool mask (True outside the slice)."""
        index = self._slice()
        if index is None:
            return keep
        out = base if base is not None else torch.ones_like(self._source(), dtype=torch.bool)
        out[index] = keep
        return out


@dataclass(eq=False)
class RepTensor(Entries):
    """Representative entries living in ``param`` (or in ``param[index]``)."""

    param: torch.Tensor
    name: str
    index: Optional[tuple] = None
    covers: list = field(default_factory=list)
    live: Optional[tuple] = None  # (module, attribute) whose current value is ranked

    @property
    def shape(self) -> torch.Size:
        if self.index is not None:  # on a meta tensor: slicing a sharded DTensor would gather it
            return torch.empty(self.param.shape, device="meta")[self.index].shape
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def _source(self) -> torch.Tensor:
        if self.live is not None:
            return getattr(*self.live)
        return self.param

    def _slice(self) -> Optional[tuple]:
        return self.index
