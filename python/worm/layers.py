"""Which entries are representative: BatchNorm gammas, attention query/key weights, or
whatever tensors the user names.

A :class:`RepTensor` is one block of representative entries: the whole of a parameter,
or a slice of it (the Q or K part of a packed QKV weight). The mask taken from a
``RepTensor`` has the shape of its slice; ``covers`` lists other parameters whose
gradients the same mask truncates (a BatchNorm's bias, beside its weight).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def _bn_reps(model: nn.Module) -> list:
    reps = []
    for name, mod in model.named_modules():
        if isinstance(mod, BN_TYPES):
            if mod.weight is None:
                raise ValueError(f"BatchNorm {name!r} has affine=False: it has no gamma to rank "
                                 "channels by; pass layers= explicitly")
            covers = [mod.bias] if mod.bias is not None else []
            reps.append(RepTensor(mod.weight, f"{name}.weight", None, covers))
    if not reps:
        raise ValueError(f"layers='bn' found no BatchNorm layer in {type(model).__name__}; "
                         "pass layers='qk', a callable or a list of tensors")
    return reps


def _param_names(model: Optional[nn.Module]) -> dict:
    if model is None:
        return {}
    return {id(p): n for n, p in model.named_parameters()}


def _as_reps(items, model: Optional[nn.Module]) -> list:
    names = _param_names(model)
    reps = []
    for i, it in enumerate(items):
        if isinstance(it, RepTensor):
            reps.append(it)
        elif isinstance(it, torch.Tensor):
            reps.append(RepTensor(it, names.get(id(it), f"tensor[{i}]")))
        elif isinstance(it, nn.Module) and getattr(it, "weight", None) is not None:
            reps.append(RepTensor(it.weight, names.get(id(it.weight), f"module[{i}].weight")))
        else:
            raise TypeError(f"representative item {i} is a {type(it).__name__}: pass tensors, "
                            "modules with a weight, or worm.layers.RepTensor")
    return reps


LayersSpec = Union[str, Callable, Sequence]


def select(model: Optional[nn.Module], layers: LayersSpec) -> list:
    """The representative set as a list of :class:`RepTensor`, in a fixed order."""
    if isinstance(layers, str):
        if model is None:
            raise ValueError(f"layers={layers!r} needs a model")
        if layers == "bn":
            reps = _bn_reps(model)
        elif layers == "qk":
            from .qk import qk_reps
            reps = qk_reps(model)
        else:
            raise ValueError(f"layers must be 'bn', 'qk', a callable or a list of tensors; got {layers!r}")
    elif callable(layers):
        reps = _as_reps(list(layers(model)), model)
    else:
        reps = _as_reps(list(layers), model)
    if not reps:
        raise ValueError("the representative set is empty: no tensors to take a mask from")
    for r in reps:
        if r.numel == 0:
            raise ValueError(f"representative tensor {r.name} has no entries")
    dev = reps[0].param.device
    for r in reps:
        if r.param.device != dev:
            raise ValueError(f"representative tensors span devices: {reps[0].name} on {dev}, "
                             f"{r.name} on {r.param.device}")
    return reps
