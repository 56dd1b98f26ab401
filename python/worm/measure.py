"""Measuring a pruned model against its dense original: parameters, multiply-
accumulates (MACs) and measured CPU inference latency.

Inputs are whatever the model takes (one tensor, or a tuple/list of arguments, as
:func:`worm.prune_channels` accepts); the batch is the first dimension of every
tensor among them.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .timing import call, dense_vs_pruned

__all__ = ["count_params", "count_flops", "pruning_report", "format_report", "prune_report",
           "default_example", "call"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_input(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 32, 32)
    raise ValueError(f"{type(model).__name__} has no Conv2d to guess an input from; pass "
                     "example_inputs (or input_size)")


def default_example(model: nn.Module) -> torch.Tensor:
    """Zeros of ``(1, C, 32, 32)`` for the first conv's C, on the model's device and dtype."""
    p = next(model.parameters(), None)
    return torch.zeros(_default_input(model), device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None else torch.float32)


def _zeros(model: nn.Module, input_size) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(tuple(input_size), device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None else torch.float32)


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None, *, inputs=None) -> int:
    """Multiply-accumulates of all Conv and Linear layers for one forward pass of a zero
    input of ``input_size`` (default ``(1, C, 32, 32)``), or of ``inputs`` (anything the
    model takes). Run in eval mode under no_grad, so BN statistics are untouched; each
    module's mode is restored."""
    if inputs is None:
        inputs = _zeros(model, input_size if input_size is not None else _default_input(model))
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    handles, modes = [], [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        model.eval()
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    return total[0]


def pruning_report(before: nn.Module, after: nn.Module,
                   input_size: Optional[Sequence[int]] = None) -> dict:
    """Parameters, MACs and per-BN channel counts before and after pruning.

    Keys: params_before, params_after, flops_before, flops_after (MACs),
    params_kept, flops_kept (fractions), channels ({bn name: [before, after]} for BNs
    present in both), text (a printable summary).
    """
    from .layers import BN_TYPES
    input_size = tuple(input_size) if input_size is not None else _default_input(before)
    bns_after = {n: m for n, m in after.named_modules() if isinstance(m, BN_TYPES)}
    channels = {n: [m.num_features, bns_after[n].num_features]
                for n, m in before.named_modules() if isinstance(m, BN_TYPES) and n in bns_after}
    rep = {"params_before": count_params(before), "params_after": count_params(after),
           "flops_before": count_flops(before, input_size), "flops_after": count_flops(after, input_size),
           "channels": channels}
    rep["params_kept"] = rep["params_after"] / max(rep["params_before"], 1)
    rep["flops_kept"] = rep["flops_after"] / max(rep["flops_before"], 1)
    rep["text"] = format_report(rep)
    return rep


def format_report(rep: Mapping) -> str:
    ch = rep.get("channels", {})
    pruned = sum(b - a for b, a in ch.values())
    total = sum(b for b, _ in ch.values())
    return (f"params {rep['params_before']:,} -> {rep['params_after']:,} "
            f"({100 * rep['params_kept']:.1f}% kept); "
            f"MACs {rep['flops_before']:,} -> {rep['flops_after']:,} "
            f"({100 * rep['flops_kept']:.1f}% kept); "
            f"BN channels pruned {pruned:,} of {total:,}")


# ------------------------------------------------------------- dense vs pruned
def _first_rows(inputs):
    """Every tensor's first row, on the CPU (floating tensors in fp32)."""
    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t[:1].detach().cpu()
        return t.float() if t.is_floating_point() else t
    return tree_map(one, inputs)


def _batched(one, b: int):
    return tree_map(lambda t: t.expand(b, *t.shape[1:]).contiguous() if isinstance(t, torch.Tensor) else t, one)


def prune_report(dense: nn.Module, pruned: nn.Module, example_inputs=None, *,
                 batch_sizes: Sequence[int] = (1, 32), reps: int = 5, min_time: float = 0.2,
                 threads: Optional[int] = None, plan=None, per_layer: bool = False) -> dict:
    """Parameters, MACs and *measured* CPU inference latency, dense vs pruned, and how
    far the pruned model departs from its ticket.

    ``example_inputs``: what the models take (one tensor, or a tuple/list of arguments;
    the first row of every tensor is repeated to each batch size; default zeros of
    ``(1, C, 32, 32)``). Both models are timed as eval-mode CPU copies under no_grad,
    alternately per batch size, median of at least ``reps`` calls and ``min_time``
    seconds. ``plan``: the :class:`worm.prune.ChannelPlan` (default: the one
    :func:`worm.prune_channels` recorded on ``pruned``); ``per_layer`` adds its table.
    Keys: params_dense, params_pruned, params_kept, flops_dense, flops_pruned,
    flops_kept (MACs per example), latency_ms ({batch: {"dense", "pruned"}}),
    latency_ratio ({batch: pruned / dense}), threads, plan (its summary or None), text.
    """
    from .prune_transformer import is_transformer, transformer_report
    if is_transformer(dense):  # token ids or dicts of kwargs; attention MACs counted
        return transformer_report(dense, pruned, example_inputs, batch_sizes=batch_sizes,
                                  reps=reps, min_time=min_time, threads=threads)
    if example_inputs is None:
        example_inputs = default_example(dense)
    if not any(isinstance(t, torch.Tensor) for t in tree_flatten(example_inputs)[0]):
        raise TypeError("prune_report: example_inputs holds no tensor (pass what the model takes)")
    one = _first_rows(example_inputs)
    rep = {"params_dense": count_params(dense), "params_pruned": count_params(pruned)}
    models = {k: copy.deepcopy(m).cpu().float().eval() for k, m in (("dense", dense), ("pruned", pruned))}
    rep["flops_dense"] = count_flops(models["dense"], inputs=one)
    rep["flops_pruned"] = count_flops(models["pruned"], inputs=one)
    rep["params_kept"] = rep["params_pruned"] / max(rep["params_dense"], 1)
    rep["flops_kept"] = rep["flops_pruned"] / max(rep["flops_dense"], 1)
    timed = dense_vs_pruned(models, lambda b: _batched(one, b), batch_sizes, reps, min_time, threads)
    lat_txt = timed.pop("text")
    rep.update(timed)
    plan = plan if plan is not None else getattr(pruned, "_worm_plan", None)
    rep["plan"] = plan.summary() if plan is not None else None
    ticket_txt = plan.departure_text() if plan is not None else \
        "departure from the ticket unknown (pass plan=, from prune_channels(..., return_plan=True))"
    rep["text"] = (f"params {rep['params_dense']:,} -> {rep['params_pruned']:,} "
                   f"({100 * rep['params_kept']:.1f}% kept); MACs {rep['flops_dense']:,} -> "
                   f"{rep['flops_pruned']:,} ({100 * rep['flops_kept']:.1f}% kept); CPU latency {lat_txt}\n"
                   f"{ticket_txt}")
    if per_layer and plan is not None:
        rep["text"] += "\n" + plan.layer_table()
    return rep
