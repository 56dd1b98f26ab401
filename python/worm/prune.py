"""Structured pruning: remove the channels an Early-Bird ticket prunes from ANY
BatchNorm CNN, through Torch-Pruning's dependency graph (DepGraph).

A ticket is ``{bn.weight: keep}`` with ``keep`` a bool vector over that BatchNorm's
channels (``EarlyBird.ticket`` with ``layers="bn"``). DepGraph traces the model on
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
the realised keep mask of every ticket BN and how far it departs from the ticket.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .layers import BN_TYPES
from .prune_transformer import is_structured_ticket as _structured_ticket
from .prune_transformer import is_transformer as _is_transformer
from .prune_transformer import prune_structures as _prune_structures
from .prune_transformer import transformer_report as _transformer_report
from .ticket import as_ticket

__all__ = ["prune_channels", "ChannelPlan", "floor_ticket", "count_params", "count_flops",
           "pruning_report", "format_report", "prune_report"]

_BN = BN_TYPES
COUPLED_RULES = ("any", "vote")


# ------------------------------------------------------------------ ticket checks
def _bn_masks(model: nn.Module, ticket: Mapping) -> Dict[str, torch.Tensor]:
    """The ticket as ``{bn module name: keep (bool, cpu)}``, validated against the model."""
    owner = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _BN) and mod.weight is not None:
            owner[id(mod.weight)] = (mod, name, "weight")
            if mod.bias is not None:
                owner[id(mod.bias)] = (mod, name, "bias")
    by_bn: Dict[str, dict] = {}
    t = as_ticket(ticket, model, "prune_channels")
    names = {id(p): n for n, p in model.named_parameters()}
    mods = dict(model.named_modules())
    for key, keep in t.bind(model, "prune_channels").items():
        if id(key) not in owner:
            _refuse_entry(model, mods, names[id(key)], key)
        mod, name, kind = owner[id(key)]
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"ticket mask for {name}.{kind} must be a bool tensor, got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)}")
        if keep.shape != (mod.num_features,):
            raise ValueError(f"ticket mask for {name}.{kind} has shape {tuple(keep.shape)}; "
                             f"expected ({mod.num_features},)")
        by_bn.setdefault(name, {})[kind] = keep.detach().cpu()
    out = {}
    for name, d in by_bn.items():
        w, b = d.get("weight"), d.get("bias")
        if w is not None and b is not None and not torch.equal(w, b):
            raise ValueError(f"ticket masks for {name}.weight and {name}.bias differ; "
                             "a channel is kept or pruned as a whole")
        out[name] = w if w is not None else b
    return out


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


def _check_ratio(max_pruning_ratio) -> Optional[float]:
    if max_pruning_ratio is None:
        return None
    r = float(max_pruning_ratio)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"max_pruning_ratio must be in [0, 1) (the largest share of a layer's "
                         f"channels that may go) or None, got {max_pruning_ratio!r}")
    return r


def _floored(keep: torch.Tensor, score: torch.Tensor, ratio: Optional[float]) -> torch.Tensor:
    """``keep`` with the best-scored pruned entries put back until at most ``ratio``
    of them (and never all) are pruned."""
    n = keep.numel()
    need = 1 if ratio is None else max(1, math.ceil(n * (1.0 - ratio) - 1e-9))
    have = int(keep.sum())
    if have >= need:
        return keep
    keep = keep.clone()
    cand = torch.where(keep, torch.full_like(score, -math.inf), score)
    keep[cand.topk(need - have).indices] = True
    return keep


def floor_ticket(ticket: Mapping, max_pruning_ratio: float) -> dict:
    """The ticket with a per-tensor floor: no tensor loses more than ``max_pruning_ratio``
    of its entries; the largest-``|w|`` pruned entries come back first. Works on any
    ticket ``{param: keep}`` (channel or unstructured); keys are kept."""
    ratio = _check_ratio(max_pruning_ratio)
    out = {}
    for p, keep in ticket.items():
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != p.shape:
            raise ValueError("floor_ticket: masks must be bool tensors of their parameter's shape")
        flat = _floored(keep.detach().reshape(-1).cpu(), p.detach().reshape(-1).abs().float().cpu(), ratio)
        out[p] = flat.reshape(keep.shape).to(keep.device)
    return out


# ------------------------------------------------------------- the plan
@dataclass
class ChannelPlan:
    """What :func:`prune_channels` did, per ticket BN (names as in the model).

    ``ticket`` and ``realised`` hold each BN's keep mask before and after coupling
    and the floor; ``added`` counts channels kept against the ticket, ``removed``
    channels removed against it (only ``coupled="vote"`` removes any);
    ``departure`` is (added + removed) / ticket BN channels.
    """

    ticket: Dict[str, torch.Tensor] = field(default_factory=dict)
    realised: Dict[str, torch.Tensor] = field(default_factory=dict)
    coupled: str = "any"
    max_pruning_ratio: Optional[float] = None
    groups: int = 0            # DepGraph groups touched by the ticket
    coupled_groups: int = 0    # of which held more than one ticket BN

    @property
    def added(self) -> int:
        return sum(int((r & ~self.ticket[n]).sum()) for n, r in self.realised.items())

    @property
    def removed(self) -> int:
        return sum(int((~r & self.ticket[n]).sum()) for n, r in self.realised.items())

    @property
    def channels(self) -> int:
        return sum(t.numel() for t in self.ticket.values())

    @property
    def departure(self) -> float:
        return (self.added + self.removed) / max(self.channels, 1)

    def summary(self) -> dict:
        return {"coupled": self.coupled, "max_pruning_ratio": self.max_pruning_ratio,
                "groups": self.groups, "coupled_groups": self.coupled_groups,
                "ticket_channels": self.channels,
                "ticket_kept": sum(int(t.sum()) for t in self.ticket.values()),
                "realised_kept": sum(int(r.sum()) for r in self.realised.values()),
                "added": self.added, "removed": self.removed, "departure": self.departure}


def _default_example(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(_default_input(model), device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None else torch.float32)


def _out_shapes(model: nn.Module, example_inputs) -> list:
    from torch.utils._pytree import tree_flatten
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        for m, t in modes:
            m.training = t
    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _channel_groups(DG, group, n: int):
    """(channel slices a grouped conv in this group forces (1: none), whether such a
    conv sees only part of its channels through this group (a concat into it))."""
    g, partial = 1, False
    for item in group:
        m, fn = item.dep.target.module, item.dep.handler
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
            continue  # depthwise: in and out are simply the same channels
        pruner = DG.get_pruner_of_module(m)
        if pruner is None:
            continue
        out = DG.is_out_channel_pruning_fn(fn)
        k = int((pruner.get_out_channel_groups(m) if out else pruner.get_in_channel_groups(m)) or 1)
        if k > 1:
            g = max(g, k)
            width = m.out_channels if out else m.in_channels
            partial = partial or width != n
    return g, partial


def _decide(votes: torch.Tensor, score: torch.Tensor, counts: torch.Tensor, coupled: str,
            ch_groups: int, ratio: Optional[float]) -> torch.Tensor:
    """Root-channel keep mask from per-channel keep votes, voter counts and summed |gamma|."""
    keep = votes > 0 if coupled == "any" else 2 * votes >= counts
    if ch_groups > 1 and keep.numel() % ch_groups == 0:
        # a grouped conv needs the same positions in every slice: a position stays if
        # at least half the slices keep it ("any" across 16-32 slices would keep all)
        pos = 2 * keep.view(ch_groups, -1).sum(0) >= ch_groups
        pos = _floored(pos, score.view(ch_groups, -1).sum(0), ratio)
        return pos.repeat(ch_groups)
    return _floored(keep, score, ratio)


def prune_channels(model: nn.Module, ticket: Mapping, example_inputs=None, *,
                   coupled: str = "any", max_pruning_ratio: Optional[float] = None,
                   return_plan: bool = False):
    """A new, smaller model with the channels the ticket prunes physically removed.

    Args:
        model: any CNN whose channels a BatchNorm ranks (torchvision's resnet18/50,
            mobilenet_v3, efficientnet, regnet, densenet, a user's own...).
        ticket: ``{bn.weight: keep (bool, shape (C,))}`` (``search.ticket``).
        example_inputs: what ``model(example_inputs)`` accepts, to trace the graph
            (default: zeros of ``(1, C, 32, 32)`` for the first conv's C).
        coupled: ``"any"`` or ``"vote"``: how a group of coupled BNs decides (module doc).
        max_pruning_ratio: the per-layer floor (None: off).
        return_plan: also return the :class:`ChannelPlan` (realised masks, departure).
    """
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("prune_channels needs Torch-Pruning: pip install 'worm[cnn]' (or torch-pruning)") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(ticket, Mapping) and _structured_ticket(model, ticket):  # heads / FFN neurons
        return _prune_structures(model, ticket, example_inputs)
    if coupled not in COUPLED_RULES:
        raise ValueError(f"coupled must be one of {COUPLED_RULES}, got {coupled!r}")
    ratio = _check_ratio(max_pruning_ratio)
    masks = _bn_masks(model, ticket)
    plan = ChannelPlan(ticket=dict(masks), coupled=coupled, max_pruning_ratio=ratio)

    new = copy.deepcopy(model)
    if example_inputs is None:
        example_inputs = _default_example(new)
    modes = [(m, m.training) for m in new.modules()]
    flags = {n: p.requires_grad for n, p in new.named_parameters()}
    new.eval()  # tracing must not move BN statistics
    try:
        # DepGraph follows autograd: a frozen layer would be invisible to it
        for p in new.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(new, example_inputs=example_inputs)
    except Exception as e:
        raise RuntimeError(f"prune_channels could not trace {type(model).__name__} on the example "
                           f"inputs ({type(e).__name__}: {e}); pass example_inputs that "
                           "model(example_inputs) accepts") from e
    finally:
        for m, t in modes:
            m.training = t
    name_of = {m: n for n, m in new.named_modules()}
    gammas = {n: m.weight.detach().abs().float().cpu() for n, m in new.named_modules() if n in masks}

    # Plan every group on the untouched graph (all indices in original coordinates),
    # then prune group by group: each root's own output indices are only changed by
    # its own group, so the planned root indices stay valid.
    todo = []
    realised = {n: torch.ones_like(k) for n, k in masks.items()}
    for group in DG.get_all_groups(root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        root, root_fn = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        votes = torch.zeros(n)
        score = torch.zeros(n)
        counts = torch.zeros(n)
        members, seen = 0, []
        for item in group:
            mod = item.dep.target.module
            name = name_of.get(mod)
            if name not in masks or not DG.is_out_channel_pruning_fn(item.dep.handler) \
                    or not isinstance(mod, _BN):
                continue
            idx = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
            root_idx = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            votes.index_add_(0, root_idx, masks[name][idx].float())
            score.index_add_(0, root_idx, gammas[name][idx])
            counts.index_add_(0, root_idx, torch.ones(len(root_idx)))
            members += 1
            seen.append((name, idx, root_idx))
        if not members:
            continue
        plan.groups += 1
        plan.coupled_groups += members > 1
        ch_groups, partial = _channel_groups(DG, group, n)
        if partial:  # its slices span other groups' channels too: no valid cut to make alone
            keep = torch.ones(n, dtype=torch.bool)
        else:        # channels no ticket BN covers (a concat's other inputs) are not ours to cut
            keep = _decide(votes, score, counts, coupled, ch_groups, ratio) | (counts == 0)
        for name, idx, root_idx in seen:
            realised[name][idx] = keep[root_idx]
        drop = (~keep).nonzero().flatten().tolist()
        if drop:
            todo.append((root, root_fn, drop))
    for root, root_fn, drop in todo:
        g = DG.get_pruning_group(root, root_fn, idxs=drop)
        g.prune()
    del DG
    for n, p in new.named_parameters():  # the pruner makes new Parameters
        p.requires_grad_(flags.get(n, True))
    if todo:
        before, after = _out_shapes(model, example_inputs), _out_shapes(new, example_inputs)
        if before != after:
            raise ValueError(f"the ticket removes channels of {type(model).__name__}'s output "
                             f"(output shapes {before} -> {after}); leave the BatchNorms that make "
                             "the output out of the ticket")
    plan.realised = realised
    return (new, plan) if return_plan else new


# ------------------------------------------------------------- measuring
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_input(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 32, 32)
    raise ValueError(f"{type(model).__name__} has no Conv2d; pass input_size")


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for one forward pass of a
    zero input of ``input_size`` (default ``(1, C, 32, 32)``). Run in eval mode under
    no_grad, so BN statistics are untouched; each module's mode is restored."""
    input_size = tuple(input_size) if input_size is not None else _default_input(model)
    total = [0]

    def conv_hook(m, inp, out):
        kh, kw = m.kernel_size
        total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    handles, modes = [], [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters(), None)
    x = torch.zeros(input_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
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
    input_size = tuple(input_size) if input_size is not None else _default_input(before)
    bns_after = {n: m for n, m in after.named_modules() if isinstance(m, _BN)}
    channels = {n: [m.num_features, bns_after[n].num_features]
                for n, m in before.named_modules() if isinstance(m, _BN) and n in bns_after}
    rep = {
        "params_before": count_params(before),
        "params_after": count_params(after),
        "flops_before": count_flops(before, input_size),
        "flops_after": count_flops(after, input_size),
        "channels": channels,
    }
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
def _latency_ms(model: nn.Module, x: torch.Tensor, reps: int, min_time: float) -> float:
    """Median wall time of one forward, in ms, after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times, t_end = [], time.perf_counter() + min_time
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if len(times) >= 10 * reps:
                break
    return 1000 * statistics.median(times)


def prune_report(dense: nn.Module, pruned: nn.Module, example_inputs=None, *,
                 batch_sizes: Sequence[int] = (1, 32), reps: int = 5, min_time: float = 0.2,
                 threads: Optional[int] = None) -> dict:
    """Parameters, MACs and *measured* CPU inference latency, dense vs pruned.

    ``example_inputs``: one input tensor (its first row is repeated to each batch size;
    default zeros of ``(1, C, 32, 32)``). Both models are timed as eval-mode CPU copies
    under no_grad, alternately per batch size, median of at least ``reps`` calls and
    ``min_time`` seconds. Keys: params_dense, params_pruned, params_kept, flops_dense,
    flops_pruned, flops_kept (MACs per image), latency_ms ({batch: {"dense", "pruned"}}),
    latency_ratio ({batch: pruned / dense}), threads, text.
    """
    if _is_transformer(dense):  # token ids, dicts of kwargs; attention MACs counted
        return _transformer_report(dense, pruned, example_inputs, batch_sizes=batch_sizes,
                                   reps=reps, min_time=min_time, threads=threads)
    if example_inputs is None:
        example_inputs = _default_example(dense)
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("prune_report: example_inputs must be one tensor (a batch of inputs)")
    one = example_inputs[:1].detach().cpu().float()
    rep = {"params_dense": count_params(dense), "params_pruned": count_params(pruned),
           "flops_dense": count_flops(dense, tuple(one.shape)),
           "flops_pruned": count_flops(pruned, tuple(one.shape))}
    rep["params_kept"] = rep["params_pruned"] / max(rep["params_dense"], 1)
    rep["flops_kept"] = rep["flops_pruned"] / max(rep["flops_dense"], 1)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        models = {k: copy.deepcopy(m).cpu().float().eval() for k, m in (("dense", dense), ("pruned", pruned))}
        lat = {}
        for b in batch_sizes:
            x = one.expand(int(b), *one.shape[1:]).contiguous()
            lat[int(b)] = {k: _latency_ms(m, x, reps, min_time) for k, m in models.items()}
    finally:
        torch.set_num_threads(old_threads)
    rep["latency_ms"] = lat
    rep["latency_ratio"] = {b: v["pruned"] / v["dense"] for b, v in lat.items()}
    rep["threads"] = threads or old_threads
    lat_txt = ", ".join(f"batch {b}: {v['dense']:.2f} -> {v['pruned']:.2f} ms "
                        f"({100 * rep['latency_ratio'][b]:.0f}%)" for b, v in lat.items())
    rep["text"] = (f"params {rep['params_dense']:,} -> {rep['params_pruned']:,} "
                   f"({100 * rep['params_kept']:.1f}% kept); MACs {rep['flops_dense']:,} -> "
                   f"{rep['flops_pruned']:,} ({100 * rep['flops_kept']:.1f}% kept); CPU latency {lat_txt}")
    return rep
