"""Torch-Pruning's dependency graph (DepGraph), as :func:`worm.prune_channels` uses it:
trace a model (with an error naming the module where tracing broke, and a progress
note for graphs that take long), plan each channel group from a BN ticket, and prune
while recording, per parameter and buffer, which of the original entries survive
(the index maps that slice an optimizer's state).
"""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Dict, Optional

import torch
from torch import nn

from .layers import BN_TYPES

__all__ = ["trace", "plan_groups", "prune_groups", "floored", "Progress"]


NOTE_AFTER = 10.0  # seconds a phase runs before Progress says so


class Progress:
    """Prints one note to stderr when a phase runs past ``after`` seconds (default
    NOTE_AFTER), and when it ends after that (maxvit_t's graph takes minutes)."""

    def __init__(self, what: str, enabled: bool = True, after: Optional[float] = None):
        self.what, self.enabled = what, enabled
        self.after = NOTE_AFTER if after is None else after
        self.noted = False

    def _note(self):
        self.noted = True
        print(f"worm.prune_channels: {self.what}: still running after {self.after:.0f} s "
              "(large graphs take minutes; worm.apply_masks(model, ticket) applies a ticket "
              "without rebuilding; progress=False silences this)", file=sys.stderr, flush=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.timer = threading.Timer(self.after, self._note) if self.enabled else None
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()
        if self.noted and exc[0] is None:
            print(f"worm.prune_channels: {self.what}: done in {time.perf_counter() - self.t0:.0f} s",
                  file=sys.stderr, flush=True)
        return False


def _stopping_module(exc: BaseException, model: nn.Module) -> Optional[str]:
    """The model module nearest to the graph node Torch-Pruning failed on, described."""
    names = {m: n for n, m in model.named_modules()}
    node, tb = None, exc.__traceback__
    while tb is not None:  # innermost frame holding a DepGraph node
        cand = tb.tb_frame.f_locals.get("node")
        if type(cand).__name__ == "Node" and hasattr(cand, "inputs"):
            node = cand
        tb = tb.tb_next
    if node is None:
        return None
    seen, todo = set(), [node]
    while todo:
        n = todo.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module in names and names[n.module]:
            name = names[n.module]
            # the op lives in the forward of the nearest ancestor that is not a container
            parent = name.rpartition(".")[0]
            while parent and isinstance(model.get_submodule(parent), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                parent = parent.rpartition(".")[0]
            where = f"{parent} ({type(model.get_submodule(parent)).__name__})" if parent else type(model).__name__
            op = type(node.module).__name__
            if node.module not in names:  # one of Torch-Pruning's stand-ins for a tensor op
                op = op.strip("_").removesuffix("Op").lower()
            return f"a {op} after {name} ({type(n.module).__name__}), in {where}"
        todo.extend(n.inputs)
    return None


def trace(model: nn.Module, example_inputs, progress: bool = True):
    """The DependencyGraph of ``model`` (a deep copy the caller owns: traced in eval mode,
    every parameter requiring grad; modes are restored, flags are the caller's)."""
    import torch_pruning as tp
    cls = type(model).__name__
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # tracing must not move BN statistics
    n_mod = sum(1 for _ in model.modules())
    try:
        for p in model.parameters():  # DepGraph follows autograd: a frozen layer would be invisible
            p.requires_grad_(True)
        with torch.enable_grad(), Progress(f"tracing {cls}'s dependency graph ({n_mod} modules)", progress):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as e:
        try:
            with torch.no_grad():
                from .measure import call
                call(model, example_inputs)
        except Exception as e2:
            raise RuntimeError(f"prune_channels could not run {cls} on the example inputs "
                               f"({type(e2).__name__}: {e2}); pass example_inputs that "
                               "model(example_inputs) accepts (a tuple for several arguments)") from e2
        where = _stopping_module(e, model)
        raise RuntimeError(
            f"Torch-Pruning cannot follow the channels of {cls}"
            + (f" through {where}" if where else "")
            + f" ({type(e).__name__}: {e}). The model runs on the example inputs; its graph has an "
            "operation that reorders or reshapes channels (a channel shuffle, window attention) which "
            "prune_channels cannot rebuild. Apply the ticket with worm.apply_masks(model, ticket) "
            "instead (same architecture, pruned channels held at zero)") from e
    finally:
        for m, t in modes:
            m.training = t


def floored(keep: torch.Tensor, score: torch.Tensor, ratio: Optional[float]) -> torch.Tensor:
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


def _decide(votes, score, counts, coupled: str, ch_groups: int, ratio: Optional[float]) -> torch.Tensor:
    """Root-channel keep mask from per-channel keep votes, voter counts and summed |gamma|."""
    keep = votes > 0 if coupled == "any" else 2 * votes >= counts
    if ch_groups > 1 and keep.numel() % ch_groups == 0:
        # a grouped conv needs the same positions in every slice: a position stays if
        # at least half the slices keep it ("any" across 16-32 slices would keep all)
        pos = 2 * keep.view(ch_groups, -1).sum(0) >= ch_groups
        pos = floored(pos, score.view(ch_groups, -1).sum(0), ratio)
        return pos.repeat(ch_groups)
    return floored(keep, score, ratio)


def plan_groups(DG, model: nn.Module, masks: Dict[str, torch.Tensor], coupled: str,
                ratio: Optional[float], plan) -> list:
    """Decide every group on the untouched graph (all indices in original coordinates);
    fills ``plan`` (realised masks, group counts) and returns [(root, fn, drop idxs)].
    Each root's own output indices are only changed by its own group, so the planned
    indices stay valid while the groups are pruned one by one."""
    name_of = {m: n for n, m in model.named_modules()}
    gammas = {n: m.weight.detach().abs().float().cpu() for n, m in model.named_modules() if n in masks}
    todo = []
    realised = {n: torch.ones_like(k) for n, k in masks.items()}
    for group in DG.get_all_groups(root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        root, root_fn = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        votes, score, counts = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        seen = []
        for item in group:
            mod = item.dep.target.module
            name = name_of.get(mod)
            if name not in masks or not DG.is_out_channel_pruning_fn(item.dep.handler) \
                    or not isinstance(mod, BN_TYPES):
                continue
            idx = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
            root_idx = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            votes.index_add_(0, root_idx, masks[name][idx].float())
            score.index_add_(0, root_idx, gammas[name][idx])
            counts.index_add_(0, root_idx, torch.ones(len(root_idx)))
            seen.append((name, idx, root_idx))
        if not seen:
            continue
        plan.groups += 1
        plan.coupled_groups += len(seen) > 1
        if len(seen) > 1:
            plan.coupled_bns.update(name for name, _, _ in seen)
        ch_groups, partial = _channel_groups(DG, group, n)
        if partial:  # its slices span other groups' channels too: no valid cut to make alone
            keep = torch.ones(n, dtype=torch.bool)
            plan.whole_groups += 1
        else:        # channels no ticket BN covers (a concat's other inputs) are not ours to cut
            keep = _decide(votes, score, counts, coupled, ch_groups, ratio) | (counts == 0)
            plan.grouped_conv_groups += ch_groups > 1
            if ch_groups == 1:  # put back by the floor or the never-empty rule
                raw = votes > 0 if coupled == "any" else 2 * votes >= counts
                plan.refilled += int((keep & ~raw & (counts > 0)).sum())
        for name, idx, root_idx in seen:
            realised[name][idx] = keep[root_idx]
        drop = (~keep).nonzero().flatten().tolist()
        if drop:
            todo.append((root, root_fn, drop))
    plan.realised = realised
    return todo


def prune_groups(DG, model: nn.Module, todo: list, index_maps: bool) -> Optional[dict]:
    """Prune the planned groups of ``model`` (in place). With ``index_maps``, also return
    {parameter name: int64 tensor of its new shape holding each kept entry's flat index
    in the original}: the values are swapped for float64 index codes while Torch-Pruning
    slices them (it only selects entries), then read off and swapped back, sliced."""
    if not index_maps:
        for root, fn, drop in todo:
            DG.get_pruning_group(root, fn, idxs=drop).prune()
        return None
    params = dict(model.named_parameters())
    tensors = list(params.items()) + [(n, t) for n, t in model.named_buffers() if t.is_floating_point()]
    real = {}
    for n, t in tensors:
        real[n] = t.data
        if n in params:
            t.grad = None  # a float32 grad on float64 codes could not be sliced alongside
        t.data = torch.arange(t.numel(), dtype=torch.float64, device=t.device).view(t.shape)
    maps = {}
    try:
        for root, fn, drop in todo:
            DG.get_pruning_group(root, fn, idxs=drop).prune()
    finally:  # real values back whatever happened, sliced where pruned
        owners = dict(model.named_modules())
        for n, r in real.items():
            mod_name, _, attr = n.rpartition(".")
            t = getattr(owners[mod_name], attr)
            idx = t.data.to(torch.int64)
            t.data = r if t.shape == r.shape else r.reshape(-1)[idx.reshape(-1)].view(t.shape)
            if n in params:
                maps[n] = idx
    return maps
