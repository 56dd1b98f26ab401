"""Structured representative sets: one score per attention head and per FFN neuron.

``layers="heads"``: one entry per attention head, or per key/value group where heads
share K and V (GQA: Llama, Mistral, Qwen2); ``layers="ffn"``: one entry per FFN
neuron; ``layers=("heads", "ffn")``: both. Each entry's score is the L2 norm of its
structure's own weights (docs/method.md, "Structured sets"):

* a head (K/V group): its query rows and its key rows, ``||[W_q^h; W_k^h]||_2`` (under
  GQA the group's query heads' rows and the shared key rows);
* a neuron: its up (and gate) row and its down-projection column.

Scores are derived tensors, recomputed from the weights at every sampling step (one
read of the scored weights; nothing is stored between steps). A :class:`StructRep`
stands in the mask window where a :class:`worm.rep.RepTensor` would: the window ranks
its score vector, and :meth:`StructRep.expand` turns a structure mask into the
parameter masks of every entry the structure owns (Q, K, V rows and biases, the
output projection's columns; up/gate rows and biases, down columns). Those masks are
the ticket and, packed once per sampling step, the truncation bits.

Kinds never share a ranking (a head's norm over thousands of weights and a neuron's
over hundreds are not comparable): scope ``"global"`` ranks every head of the model
against each other and every neuron against each other (one StructRep per kind);
scope ``"layer"`` ranks within each layer (one StructRep per kind and layer), which
prunes the same count in every layer. ``prune_ratio`` may be ``{"heads": p, "ffn": q}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from . import reference as _ref
from .layouts import attention_layouts, ffn_layouts

__all__ = ["StructRep", "Member", "structured_reps", "is_structured", "structured_ks", "KINDS"]

KINDS = ("heads", "ffn")


@dataclass(eq=False)
class Member:
    """Structures ``first .. first+count-1`` own ``param``'s entries along ``dim`` in
    ``[start, start + count*size)``, ``size`` consecutive indices each."""

    param: torch.Tensor
    name: str
    dim: int
    start: int
    size: int
    count: int
    first: int
    scored: bool

    def keep_along(self, keep: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The parameter's bool mask with this member's structures set from ``keep``."""
        n = self.param.shape[self.dim]
        along = torch.ones(n, dtype=torch.bool, device=keep.device)
        along[self.start:self.start + self.count * self.size] = \
            keep[self.first:self.first + self.count].repeat_interleave(self.size)
        shape = [1] * self.param.dim()
        shape[self.dim] = n
        m = along.reshape(shape).expand(self.param.shape)
        return m.clone() if base is None else base & m


def members_of(layout, first: int) -> list:
    """The :class:`Member` list of one attention or FFN layout, structures from ``first``."""
    return [Member(p, name, dim, start, size, layout.count, first, scored)
            for p, name, dim, start, size, scored in layout.entries()]


class StructRep:
    """A representative set entry whose values are derived scores (one per structure)."""

    structured = True
    index = None

    def __init__(self, kind: str, name: str, members: list, n: int):
        self.kind, self.name, self.members, self.n = kind, name, members, n
        params = list(dict.fromkeys(m.param for m in members))
        self.param, self.covers = params[0], params[1:]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.n])

    @property
    def numel(self) -> int:
        return self.n

    @torch.no_grad()
    def contiguous_values(self) -> torch.Tensor:
        """The scores now: L2 norm of each structure's scored weights (fp32)."""
        sq = torch.zeros(self.n, dtype=torch.float32, device=self.param.device)
        for m in self.members:
            if not m.scored:
                continue
            w = m.param.detach().narrow(m.dim, m.start, m.count * m.size)
            w = w.movedim(m.dim, 0).reshape(m.count, -1)
            sq[m.first:m.first + m.count] += w.float().square().sum(1)
        return sq.sqrt()

    values = contiguous_values

    def expand(self, keep: torch.Tensor, out: Optional[dict] = None) -> dict:
        """``{param: bool keep mask}`` of every entry the structures own (AND into ``out``)."""
        out = {} if out is None else out
        for m in self.members:
            out[m.param] = m.keep_along(keep.to(m.param.device), out.get(m.param))
        return out


def is_structured(reps) -> bool:
    return any(getattr(r, "structured", False) for r in reps)


def parse_kinds(layers) -> Optional[tuple]:
    """``("heads",)``, ``("ffn",)`` or both for a structured ``layers=`` spec, else None."""
    if isinstance(layers, str):
        return (layers,) if layers in KINDS else None
    if isinstance(layers, (tuple, list)) and layers and all(isinstance(x, str) for x in layers):
        bad = [x for x in layers if x not in KINDS]
        if bad:
            raise ValueError(f"layers={tuple(layers)!r}: {bad[0]!r} is not a structured set; "
                             f"combine {KINDS[0]!r} and {KINDS[1]!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers={tuple(layers)!r} names a kind twice")
        return tuple(layers)
    return None


def _check_plain(members: list, kind: str) -> None:
    from .distributed import is_dtensor
    for m in members:
        if is_dtensor(m.param):
            raise NotImplementedError(
                f"layers={kind!r} on FSDP2-sharded parameters ({m.name}) is not supported: a "
                "head's rows can straddle shards. Search on the unsharded model, use DDP, or "
                "use layers='qk' (unstructured, sharded) under FSDP2")


def structured_reps(model: nn.Module, kinds: tuple, scope: str) -> list:
    """The StructReps of ``kinds`` for ``model``: one per kind (global) or per kind and layer."""
    reps = []
    for kind in kinds:
        layouts = attention_layouts(model) if kind == "heads" else ffn_layouts(model)
        per_layer = []
        for lay in layouts:
            per_layer.append((lay, members_of(lay, 0)))
        for _, ms in per_layer:
            _check_plain(ms, kind)
        if scope == "layer":
            for lay, ms in per_layer:
                reps.append(StructRep(kind, f"{lay.name}[{kind}]", ms, lay.count))
        else:
            first, ms_all = 0, []
            for lay, _ in per_layer:
                ms_all += members_of(lay, first)
                first += lay.count
            reps.append(StructRep(kind, f"{type(model).__name__}[{kind}]", ms_all, first))
    return reps


def check_ratios(prune_ratio, kinds: Optional[tuple]):
    """A float ratio, or ``{kind: ratio}`` naming exactly the structured kinds searched."""
    if not isinstance(prune_ratio, Mapping):
        return None
    if kinds is None:
        raise TypeError("prune_ratio as a dict {kind: ratio} is for structured sets "
                        "(layers='heads', 'ffn' or both); pass one number otherwise")
    if set(prune_ratio) != set(kinds):
        raise ValueError(f"prune_ratio={dict(prune_ratio)!r} must give a ratio for each of {kinds}")
    out = {}
    for k, v in prune_ratio.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"prune_ratio[{k!r}] must be a number, got {type(v).__name__}")
        out[k] = _ref.check_ratio(v)
    return out


def structured_ks(reps, prune_ratio) -> list:
    """k per StructRep: ``round(p_kind * n)`` of its own entries (ranked per StructRep)."""
    ks = []
    for r in reps:
        p = prune_ratio[r.kind] if isinstance(prune_ratio, Mapping) else prune_ratio
        ks.append(_ref.num_pruned(r.numel, p))
    return ks
