"""Which entries are representative: BatchNorm gammas, any norm layer's gammas,
attention query/key weights, or whatever tensors the user names.

Each block of representative entries is a :class:`worm.rep.RepTensor` (re-exported
here); the transformer layouts live in :mod:`worm.qk`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .heads import parse_kinds, structured_reps
from .qk import qk_reps
from .rep import RepTensor

__all__ = ["RepTensor", "select", "BN_TYPES", "is_norm"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                getattr(nn, "RMSNorm", None)) if t is not None)


def is_norm(mod: nn.Module) -> bool:
    """A normalisation layer with a per-channel gamma: torch's (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm, RMSNorm) or a library's own ``...Norm`` class (T5LayerNorm,
    LlamaRMSNorm, ...) holding a ``weight`` parameter directly."""
    w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
    if w is None:
        return False
    return isinstance(mod, _NORM_TYPES) or "Norm" in type(mod).__name__


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


def _norm_reps(model: nn.Module) -> list:
    """Every norm layer's gamma (its beta covered by the same mask)."""
    reps = []
    for name, mod in model.named_modules():
        if is_norm(mod):
            pre = f"{name}." if name else ""
            b = mod._parameters.get("bias")
            covers = [b] if b is not None and b.shape == mod.weight.shape else []
            reps.append(RepTensor(mod.weight, f"{pre}weight", None, covers))
    if not reps:
        raise ValueError(f"layers='norm' found no norm layer with a gamma in {type(model).__name__}; "
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


def select(model: Optional[nn.Module], layers: LayersSpec, scope: str = "global") -> list:
    """The representative set as a list of :class:`RepTensor` (or, for ``"heads"`` and
    ``"ffn"``, :class:`worm.heads.StructRep`), in a fixed order."""
    kinds = parse_kinds(layers)
    if kinds is not None:
        if model is None:
            raise ValueError(f"layers={layers!r} needs a model")
        return structured_reps(model, kinds, scope)
    if isinstance(layers, str):
        if model is None:
            raise ValueError(f"layers={layers!r} needs a model")
        if layers == "bn":
            reps = _bn_reps(model)
        elif layers == "norm":
            reps = _norm_reps(model)
        elif layers == "qk":
            reps = qk_reps(model)
        else:
            raise ValueError(f"layers must be 'bn', 'norm', 'qk', 'heads', 'ffn', a callable or a list of tensors; "
                             f"got {layers!r}")
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
