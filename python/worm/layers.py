"""Which entries are representative: BatchNorm gammas, any norm layer's gammas,
attention query/key weights, or whatever tensors the user names.

Each block of representative entries is a :class:`worm.rep.RepTensor` (re-exported
here); the transformer layouts live in :mod:`worm.qk`.

What a representative score covers is decided here once, by the parameter, however
the set was named (``"bn"``, modules, tensors, a callable): the gamma of a per-channel
normalisation layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) covers its beta,
so the mask truncates both. A weight behind ``torch.nn.utils.parametrize`` is ranked
by its live parametrized value.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .heads import parse_kinds, structured_reps
from .qk import qk_reps
from .rep import RepTensor

__all__ = ["RepTensor", "select", "BN_TYPES", "is_norm"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# per-channel affine normalisations: gamma and beta of a channel go together
NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                               getattr(nn, "RMSNorm", None)) if t is not None)


def is_norm(mod: nn.Module) -> bool:
    """A normalisation layer with a per-channel gamma: torch's (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm, RMSNorm) or a library's own ``...Norm`` class (T5LayerNorm,
    LlamaRMSNorm, ...) holding a ``weight`` parameter directly."""
    w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
    if w is None and not parametrize.is_parametrized(mod, "weight"):
        return False
    return isinstance(mod, NORM_TYPES) or "Norm" in type(mod).__name__


def _leaf(mod: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """The trained tensor behind ``mod.<attr>``: the parameter, or the original a
    parametrization computes it from."""
    if parametrize.is_parametrized(mod, attr):
        return getattr(mod.parametrizations, attr).original
    return getattr(mod, attr, None)


def _covers(mod: nn.Module) -> list:
    """Other parameters a mask of ``mod``'s weight truncates: a normalisation's beta."""
    if not is_norm(mod):
        return []
    w, b = _leaf(mod, "weight"), _leaf(mod, "bias")
    if b is None or w is None or b.shape != w.shape or not b.requires_grad:
        return []
    return [b]


def _weight_rep(mod: nn.Module, name: str) -> RepTensor:
    param = _leaf(mod, "weight")
    live = None
    if parametrize.is_parametrized(mod, "weight"):
        live = (mod, "weight")
        shape = tuple(mod.weight.shape)
        if shape != tuple(param.shape):
            raise ValueError(f"{name}: its parametrization maps a {tuple(param.shape)} parameter to a "
                             f"{shape} weight; a mask of the weight cannot truncate the parameter's "
                             "gradient. Pass layers= tensors of matching shape")
    return RepTensor(param, name, None, _covers(mod), live)


def _bn_reps(model: nn.Module) -> list:
    reps = []
    for name, mod in model.named_modules():
        if isinstance(mod, BN_TYPES):
            if mod.weight is None:
                raise ValueError(f"BatchNorm {name!r} has affine=False: it has no gamma to rank "
                                 "channels by; pass layers= explicitly")
            reps.append(_weight_rep(mod, f"{name}.weight"))
    if not reps:
        raise ValueError(f"layers='bn' found no BatchNorm layer in {type(model).__name__}; "
                         "pass layers='qk', a callable or a list of tensors")
    return reps


def _norm_reps(model: nn.Module) -> list:
    """Every norm layer's gamma (its beta covered by the same mask)."""
    reps = []
    for name, mod in model.named_modules():
        if is_norm(mod):
            reps.append(_weight_rep(mod, f"{name}.weight" if name else "weight"))
    if not reps:
        raise ValueError(f"layers='norm' found no norm layer with a gamma in {type(model).__name__}; "
                         "pass layers='qk', a callable or a list of tensors")
    return reps


def _param_names(model: Optional[nn.Module]) -> dict:
    if model is None:
        return {}
    return {id(p): n for n, p in model.named_parameters()}


def _weight_owners(model: Optional[nn.Module]) -> dict:
    """{id(weight parameter): its module} for the modules whose weight covers more."""
    if model is None:
        return {}
    return {id(_leaf(m, "weight")): m for m in model.modules()
            if is_norm(m) and _leaf(m, "weight") is not None}


def _as_reps(items, model: Optional[nn.Module]) -> list:
    names = _param_names(model)
    owners = _weight_owners(model)
    reps = []
    for i, it in enumerate(items):
        if isinstance(it, RepTensor):
            reps.append(it)
        elif isinstance(it, torch.Tensor):
            if it.grad_fn is not None:
                raise TypeError(f"representative item {i} is a computed tensor (grad_fn="
                                f"{type(it.grad_fn).__name__}), a copy that goes stale as the weights "
                                "train (a parametrized weight is one): pass the module, whose weight "
                                "is then read live, or the parameter itself")
            mod = owners.get(id(it))
            covers = _covers(mod) if mod is not None else []
            reps.append(RepTensor(it, names.get(id(it), f"tensor[{i}]"), None, covers))
        elif isinstance(it, nn.Module) and getattr(it, "weight", None) is not None:
            rep = _weight_rep(it, f"module[{i}].weight")
            rep.name = names.get(id(rep.param), rep.name)
            reps.append(rep)
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
