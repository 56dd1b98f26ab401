"""Structured pruning: remove the channels an Early-Bird ticket prunes from ANY
BatchNorm CNN, through Torch-Pruning's dependency graph (DepGraph).

A ticket is a :class:`worm.Ticket` ``{bn weight name: keep}`` with ``keep`` a bool
vector over that BatchNorm's channels (``EarlyBird.ticket`` with ``layers="bn"``), or
a plain ``{name or parameter: keep}`` dict; it applies to any model whose parameter
names and shapes match (the search's model, a copy, a fresh init, a checkpoint). DepGraph traces the model on
``example_inputs`` and groups every channel with everything that must lose it too:
the conv that makes it, its BN, the convs/linears that read it, and across residual
adds, concatenations, depthwise and grouped convs and squeeze-excitation gates.

Rules
-----
* **Coupled channels.** A DepGraph group can hold several ticket BNs (a ResNet
  stage's stem/bn2/shortcut BNs all add into one residual stream). Its channels are
  decided together by ``coupled=``:
  ``"any"`` (default): kept if any BN of the group keeps it (so every channel the
  ticket keeps survives; the result can only be larger than the ticket);
  ``"vote"``: kept if at least half of the group's BNs keep it.
  A group with one ticket BN (a plain conv-BN chain) is realised exactly.
* **Grouped convs.** When a group passes through a grouped conv with ``G`` channel
  groups (not depthwise), each of the ``G`` slices loses the same positions (what
  Torch-Pruning's own pruners do, so the conv stays valid): a position stays if the
  rule above keeps it in at least half of the slices (so here even ``"any"`` may
  remove a channel the ticket keeps; the plan counts it). A group that feeds only
  part of a grouped conv's channels (a concatenation into it) is left whole.
* **Floor.** ``max_pruning_ratio`` (default None: off, faithful to EB): no group
  loses more than that share of its channels; the channels with the largest summed
  ``|gamma|`` are put back first.
* **Never empty.** A group never drops to zero channels: the channel with the
  largest summed ``|gamma|`` is kept (the public EB code drops such a layer).
* Groups with no ticket BN (the classifier's outputs, an SE block's squeeze conv)
  keep all their channels. A ticket mask on a BN's bias must equal its weight's.
* The original model is not modified: the result is a deep copy with smaller layers
  (a plain ``nn.Module``: no hooks, no masks), same device, dtype and mode. With
  the same weights it computes what the original computes with the removed
  channels' gamma and beta set to zero wherever a removed channel reads as 0
  downstream (conv-BN-ReLU chains, and residual streams whose every BN removes it).

``prune_channels(..., return_plan=True)`` also returns the :class:`ChannelPlan`:
the realised keep mask of every ticket BN, how far it departs from the ticket, and
the realised params / MACs (``plan.text(per_layer=True)``; :func:`prune_report`
states it too). ``optimizer=`` hands the optimizer the smaller model's parameters
with its state sliced (:mod:`worm.prune_optim`), to keep training.
The graph work lives in :mod:`worm.depgraph`, the measuring in :mod:`worm.measure`.
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .channel_plan import ChannelPlan
from .depgraph import Progress, floored, plan_groups, prune_groups, trace
from .layers import BN_TYPES
from .measure import (call, count_flops, count_params, default_example, format_report,
                      prune_report, pruning_report)
from .prune_optim import check_sliceable, move_optimizer
from .ticket import as_ticket

__all__ = ["prune_channels", "ChannelPlan", "floor_ticket", "count_params", "count_flops",
           "pruning_report", "format_report", "prune_report"]

COUPLED_RULES = ("any", "vote")


# ------------------------------------------------------------------ ticket checks
def _refuse_entry(model: nn.Module, mods: dict, pname: str, p: torch.Tensor):
    """The error for a ticket entry prune_channels cannot remove channels by."""
    from .layers import is_norm
    mod = mods.get(pname.rpartition(".")[0])
    what = type(mod).__name__ if mod is not None else "module"
    if mod is not None and is_norm(mod):
        raise ValueError(
            f"prune_channels removes the channels a BatchNorm ticket prunes; this ticket ranks "
            f"{pname} of a {what} (a layers='norm' search), which it cannot turn into a smaller "
            f"{type(model).__name__}. Apply it with worm.apply_masks(model, ticket) (gamma and "
            "beta of each pruned channel held at zero), or search with layers='bn'")
    raise ValueError(
        f"prune_channels removes BatchNorm channels; the ticket's entry {pname} (shape "
        f"{tuple(p.shape)}) is a {what} parameter, not a BatchNorm's gamma. An unstructured "
        "ticket (layers='qk', a list of tensors) is applied with worm.apply_masks(model, ticket)")


def _bn_masks(model: nn.Module, ticket) -> Dict[str, torch.Tensor]:
    """The ticket as ``{bn module name: keep (bool, cpu)}``, validated against the model."""
    owner = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BN_TYPES) and mod.weight is not None:
            owner[id(mod.weight)] = (mod, name, "weight")
            if mod.bias is not None:
                owner[id(mod.bias)] = (mod, name, "bias")
    t = as_ticket(ticket, model, "prune_channels")
    names = {id(p): n for n, p in model.named_parameters()}
    mods = dict(model.named_modules())
    by_bn: Dict[str, dict] = {}
    for key, keep in t.bind(model, "prune_channels").items():
        if id(key) not in owner:
            _refuse_entry(model, mods, names[id(key)], key)
        mod, name, kind = owner[id(key)]
        if type(keep).__name__ == "DTensor":
            raise ValueError("prune_channels: the ticket is sharded (DTensor masks); gather it "
                             "with ticket.full() first")
        by_bn.setdefault(name, {})[kind] = keep.detach().cpu()
    out = {}
    for name, d in by_bn.items():
        w, b = d.get("weight"), d.get("bias")
        if w is not None and b is not None and not torch.equal(w, b):
            raise ValueError(f"ticket masks for {name}.weight and {name}.bias differ; "
                             "a channel is kept or pruned as a whole")
        out[name] = w if w is not None else b
    return out


def _check_ratio(max_pruning_ratio) -> Optional[float]:
    if max_pruning_ratio is None:
        return None
    r = float(max_pruning_ratio)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"max_pruning_ratio must be in [0, 1) (the largest share of a layer's "
                         f"channels that may go) or None, got {max_pruning_ratio!r}")
    return r


def floor_ticket(ticket: Mapping, max_pruning_ratio: float) -> dict:
    """The ticket with a per-tensor floor: no tensor loses more than ``max_pruning_ratio``
    of its entries; the largest-``|w|`` pruned entries come back first. Works on any
    ticket ``{param: keep}`` (channel or unstructured); keys are kept."""
    ratio = _check_ratio(max_pruning_ratio)
    out = {}
    for p, keep in ticket.items():
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != p.shape:
            raise ValueError("floor_ticket: masks must be bool tensors of their parameter's shape")
        flat = floored(keep.detach().reshape(-1).cpu(), p.detach().reshape(-1).abs().float().cpu(), ratio)
        out[p] = flat.reshape(keep.shape).to(keep.device)
    return out


def _out_shapes(model: nn.Module, example_inputs) -> list:
    from torch.utils._pytree import tree_flatten
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = call(model, example_inputs)
    finally:
        for m, t in modes:
            m.training = t
    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------ the entry
def prune_channels(model: nn.Module, ticket, example_inputs=None, *,
                   optimizer: Optional[torch.optim.Optimizer] = None, coupled: str = "any",
                   max_pruning_ratio: Optional[float] = None, return_plan: bool = False,
                   progress: bool = True):
    """A new, smaller model with the channels the ticket prunes physically removed.

    Args:
        model: any CNN whose channels a BatchNorm ranks (torchvision's resnet18/50,
            mobilenet_v3, efficientnet, regnet, densenet, a user's own...).
        ticket: a :class:`worm.Ticket` (``search.ticket``, or ``worm.Ticket.load``) or a
            dict ``{bn weight name or parameter: keep (bool, shape (C,))}``; applied by
            name to any model with these names and shapes.
        example_inputs: what ``model`` takes (one tensor, or a tuple of arguments), to
            trace the graph (default: zeros of ``(1, C, 32, 32)`` for the first conv's C).
        optimizer: an optimizer training ``model``: afterwards it holds the small model's
            parameters with every per-parameter state tensor sliced to the kept entries
            (refused, before anything changes, if its state cannot be sliced).
        coupled: ``"any"`` or ``"vote"``: how a group of coupled BNs decides (module doc).
        max_pruning_ratio: the per-layer floor (None: off).
        return_plan: also return the :class:`ChannelPlan` (realised masks, departure).
        progress: a note on stderr when tracing or pruning runs past 10 s.
    """
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("prune_channels needs Torch-Pruning: pip install 'worm[cnn]' (or torch-pruning)") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if coupled not in COUPLED_RULES:
        raise ValueError(f"coupled must be one of {COUPLED_RULES}, got {coupled!r}")
    ratio = _check_ratio(max_pruning_ratio)
    masks = _bn_masks(model, ticket)
    if optimizer is not None:
        check_sliceable(optimizer, model)
    plan = ChannelPlan(ticket=dict(masks), coupled=coupled, max_pruning_ratio=ratio)

    new = copy.deepcopy(model)
    if example_inputs is None:
        example_inputs = default_example(new)
    flags = {n: p.requires_grad for n, p in new.named_parameters()}
    DG = trace(new, example_inputs, progress)
    try:
        with Progress("planning the channel groups", progress):
            todo = plan_groups(DG, new, masks, coupled, ratio, plan)
        with Progress(f"pruning {len(todo)} channel groups", progress):
            maps = prune_groups(DG, new, todo, index_maps=optimizer is not None)
    finally:
        del DG
        for n, p in new.named_parameters():  # the pruner makes new Parameters
            p.requires_grad_(flags.get(n, True))
    if todo:
        before, after = _out_shapes(model, example_inputs), _out_shapes(new, example_inputs)
        if before != after:
            raise ValueError(f"the ticket removes channels of {type(model).__name__}'s output "
                             f"(output shapes {before} -> {after}); leave the BatchNorms that make "
                             "the output out of the ticket")
    plan.params = [count_params(model), count_params(new)]
    try:
        plan.macs = [count_flops(model, inputs=example_inputs), count_flops(new, inputs=example_inputs)]
    except Exception:  # a model MAC hooks cannot run (exotic inputs): params still reported
        plan.macs = None
    if optimizer is not None:
        move_optimizer(optimizer, model, new, maps)
    new._worm_plan = plan  # prune_report states the departure from the ticket
    return (new, plan) if return_plan else new
