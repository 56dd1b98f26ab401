"""The pruned variants ``worm compare`` retrains, and what each realises.

A *ticket* here is ``{parameter: keep (bool, the parameter's shape)}``. Two protocols:

* ``"channels"`` (Early-Bird's): the search's BN-gamma ticket; channels are removed
  from the network by :func:`worm.prune_channels` (a smaller model).
* ``"weights"`` (the paper authors' code): after the search, global unstructured
  magnitude pruning of every conv and linear weight at ``p``, kept through
  retraining by :func:`worm.apply_masks` (a masked model of the same size).

Controls for either protocol, from the same trained weights:

* ``random``: in every layer as many entries kept as the ticket keeps there, chosen
  at random (seeded): does the ranking matter, or only the per-layer widths?
* ``uniform``: every layer pruned by the same share ``p`` (its own top ``1 - p`` by
  magnitude): the same total as a global ticket, spread evenly.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from .. import reference
from ..prune import count_flops, count_params, prune_channels
from ..ticket import apply_masks

PROTOCOLS = ("channels", "weights")
CONTROLS = ("random", "uniform")


def as_param_ticket(model: nn.Module, ticket: Mapping) -> dict:
    """``{param: keep}`` from a ticket keyed by parameters or by parameter names."""
    named = dict(model.named_parameters())
    out = {}
    for key, keep in ticket.items():
        p = named[key] if isinstance(key, str) else key
        out[p] = keep.detach().to(torch.bool).cpu()
    return out


def prunable_weights(model: nn.Module) -> dict:
    """``{name: weight}`` of every conv and linear layer (the paper authors' set)."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.weight is not None}


def weight_ticket(model: nn.Module, prune_ratio: float) -> dict:
    """Global unstructured magnitude pruning of conv + linear weights at ``prune_ratio``."""
    params = list(prunable_weights(model).values())
    keep = reference.masks([p.detach() for p in params], prune_ratio, scope="global")
    return {p: k.cpu() for p, k in zip(params, keep)}


def random_like(ticket: Mapping, seed: int) -> dict:
    """Per tensor, as many kept entries as ``ticket`` keeps there, at random positions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, keep in ticket.items():
        n, k = keep.numel(), int(keep.sum())
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=g)[:k]] = True
        out[p] = flat.reshape(keep.shape)
    return out


def uniform_like(ticket: Mapping, prune_ratio: float) -> dict:
    """Every tensor of ``ticket`` pruned by the same share, by its own magnitudes."""
    params = list(ticket)
    keep = reference.masks([p.detach() for p in params], prune_ratio, scope="layer")
    return {p: k.cpu() for p, k in zip(params, keep)}


def _names(model: nn.Module) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def ticket_layers(model: nn.Module, ticket: Mapping) -> list:
    """Per tensor of the ticket: name, entries and entries kept (in the ticket)."""
    names = _names(model)
    return [{"name": names.get(id(p), "?"), "entries": keep.numel(), "ticket_kept": int(keep.sum())}
            for p, keep in ticket.items()]


def last_channel_warnings(layers: list, what: str) -> list:
    """One sentence per layer left with one entry (or none) out of several."""
    out = []
    for row in layers:
        kept = row.get("kept", row["ticket_kept"])
        if row["entries"] > 1 and kept <= 1:
            out.append(f"{what}: the global ranking left {row['name']} with {kept} of "
                       f"{row['entries']} {'channels' if 'channels' in what else 'entries'}; "
                       "--floor 0.9 (no layer loses more than 90%) keeps a few")
    return out


def make_variant(model: nn.Module, ticket: Mapping, protocol: str, example: torch.Tensor,
                 coupled: str = "any", max_pruning_ratio: Optional[float] = None,
                 label: str = "ticket"):
    """The pruned model for ``ticket`` and its record fields.

    ``"channels"``: a new, smaller model (``model`` is not changed).
    ``"weights"``: ``model`` itself, masked (the caller passes a copy); the masks'
    handle is returned so retraining keeps them applied (pass it the optimizer).
    Returns ``(pruned_model, fields, mask_ticket_or_None)``.
    """
    shape = tuple(example.shape)
    before = {"params_before": count_params(model), "flops_before": count_flops(model, shape)}
    layers = ticket_layers(model, ticket)
    if protocol == "channels":
        small, plan = prune_channels(model, ticket, example, coupled=coupled,
                                     max_pruning_ratio=max_pruning_ratio, return_plan=True)
        by_name = {row["name"].rsplit(".", 1)[0]: row for row in layers}
        for bn, keep in plan.realised.items():
            if bn in by_name:
                by_name[bn]["kept"] = int(keep.sum())
        fields = {"params_after": count_params(small), "flops_after": count_flops(small, shape),
                  "ticket_departure": plan.departure, "plan": plan.summary()}
        masks = None
    else:
        small = model
        masks = dict(ticket)
        for row, keep in zip(layers, ticket.values()):
            row["kept"] = int(keep.sum())
        kept = sum(int(k.sum()) for k in ticket.values())
        total = sum(k.numel() for k in ticket.values())
        # masked entries still cost dense compute: params counted as nonzeros, MACs as dense
        fields = {"params_after": before["params_before"] - (total - kept),
                  "flops_after": before["flops_before"]}
    fields.update(before)
    fields["layers"] = layers
    fields["warnings"] = last_channel_warnings(
        layers, f"{label} ({'channels' if protocol == 'channels' else 'weights'})")
    return small, fields, masks


def keep_masks(model: nn.Module, masks: Optional[Mapping], optimizer) -> None:
    """Apply an unstructured ticket so that it stays applied through retraining."""
    if masks:
        apply_masks(model, {p: k.to(p.device) for p, k in masks.items()}, optimizer=optimizer)
