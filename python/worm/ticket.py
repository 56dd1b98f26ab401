"""A ticket as named data (:class:`Ticket`), and applying one so that it stays applied
through retraining (:func:`apply_masks`).

A :class:`Ticket` is ``{parameter name: bool keep mask}`` (names as in
``model.named_parameters()``) with its provenance, so it outlives the process and the
model instance it came from: save it, load it elsewhere (``weights_only=True``), and
apply it to any model whose names and shapes match (a copy, a fresh initialisation, a
checkpoint loaded in another job).

:func:`apply_masks`: the author's code used ``prune.remove`` and let pruned weights
grow back; here the pruned entries are zeroed now, their gradients are zeroed by a
tensor hook (so neither the gradient nor anything built from it, e.g. Adam's moments,
sees them), and the owning module re-zeroes them before every forward, which also
undoes what weight decay or an old momentum buffer could add. Pass the optimizer to
re-zero right after each step as well, so the weights are exactly zero at all times.
Parameter names and ``state_dict`` keys do not change (unlike a parametrization).
A channel mask on a norm layer's gamma masks its beta too (the channel is both).
"""
from __future__ import annotations

import difflib
import json
import os
import weakref
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["Ticket", "as_ticket", "from_reps", "apply_masks", "remove_masks", "MaskHandle"]

_ATTR = "_worm_mask_handle"
_FORMAT = "worm.Ticket"
_WRAPPERS = ("module.", "_orig_mod.")  # DDP / torch.compile name prefixes
_META_KEYS = ("kind", "prune_ratio", "scope", "layers", "index", "epoch", "step", "d_max",
              "d_avg", "found", "model_class", "covers", "counted")


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _bare(name: str) -> str:
    """A parameter name without DDP's / torch.compile's wrapper prefixes."""
    for w in _WRAPPERS:
        while name.startswith(w):
            name = name[len(w):]
    return name.replace("._orig_mod.", ".")


class Ticket(Mapping):
    """``{parameter name: bool keep mask}`` with where it came from.

    Provenance (attributes, all optional): ``kind`` ("channels": one entry per
    channel, e.g. BN gammas; "entries": unstructured), ``prune_ratio``, ``scope``,
    ``layers`` (the representative set's spec), ``index`` (sampling step count),
    ``epoch`` / ``step`` (the epoch / optimizer step it was sampled at), ``d_max`` /
    ``d_avg`` there, ``found`` (the search's trigger fired), ``model_class``;
    ``covers`` ({other parameter: the name whose mask it shares}, a norm's beta) and
    ``counted`` ({name: representative entries}; a packed Q/K/V weight counts only
    Q and K, its V entries are True). :attr:`pruned_share` is the realised share
    per tensor.

    Indexing by a parameter object (``ticket[bn.weight]``) works for the parameters
    the ticket was taken from (the search's model), as the old ``{param: mask}``
    tickets did; iteration yields names.
    """

    def __init__(self, masks: Mapping, *, params: Optional[Mapping] = None, **meta):
        bad = [k for k in meta if k not in _META_KEYS]
        if bad:
            raise TypeError(f"Ticket: unknown field(s) {bad}; known: {list(_META_KEYS)}")
        self._masks: Dict[str, torch.Tensor] = {}
        for name, keep in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"Ticket keys are parameter names (str), got {type(name).__name__}; "
                                "worm.as_ticket(mapping, model) names a {param: mask} dict")
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
                raise TypeError(f"Ticket mask for {name!r} must be a bool tensor, got "
                                f"{getattr(keep, 'dtype', type(keep).__name__)}")
            self._masks[name] = keep
        for k in _META_KEYS:
            setattr(self, k, meta.get(k))
        self.covers = dict(self.covers or {})
        self.counted = dict(self.counted or {})
        # {id(param): (weakref, name)}: lookups by the search model's parameter objects
        self._by_param = {id(p): (weakref.ref(p), n) for n, p in (params or {}).items()}

    # ----------------------------------------------------------------- Mapping
    def _name(self, key) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, torch.Tensor):
            hit = self._by_param.get(id(key))
            if hit is not None and hit[0]() is key:
                return hit[1]
            raise KeyError(f"a tensor of shape {tuple(key.shape)} that this ticket was not taken "
                           "from; index a ticket by parameter name")
        raise KeyError(key)

    def __getitem__(self, key) -> torch.Tensor:
        return self._masks[self._name(key)]

    def __contains__(self, key) -> bool:
        try:
            return self._name(key) in self._masks
        except KeyError:
            return False

    def __iter__(self):
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Ticket):
            return NotImplemented
        return (self.meta() == other.meta() and list(self) == list(other)
                and all(torch.equal(self[n], other[n]) for n in self))

    __hash__ = None

    # --------------------------------------------------------------- summaries
    @property
    def sharded(self) -> bool:
        return any(_is_dtensor(m) for m in self._masks.values())

    @property
    def pruned_share(self) -> Dict[str, float]:
        """{name: pruned representative entries / representative entries} (a host sync
        per tensor; on a sharded ticket a collective: every rank must ask)."""
        return {n: int((~m).sum()) / max(self.counted.get(n, m.numel()), 1) for n, m in self._masks.items()}

    @property
    def numel(self) -> int:
        return sum(self.counted.get(n, m.numel()) for n, m in self._masks.items())

    def meta(self) -> dict:
        """The provenance, as plain JSON-able values."""
        return {k: getattr(self, k) for k in _META_KEYS}

    def __repr__(self) -> str:
        head = [f"kind={self.kind}" if self.kind else None,
                f"prune_ratio={self.prune_ratio}" if self.prune_ratio is not None else None,
                f"scope={self.scope}" if self.scope else None,
                f"layers={self.layers}" if self.layers else None,
                f"from {self.model_class}" if self.model_class else None]
        where = [f"epoch {self.epoch}" if self.epoch is not None else None,
                 f"step {self.step}" if self.step is not None else None,
                 f"sample {self.index}" if self.index is not None else None]
        d = (f"d_max={self.d_max:.4f} d_avg={self.d_avg:.4f}" if self.d_max is not None
             else "window not full")
        state = "found" if self.found else ("not found (newest sample)" if self.found is False else None)
        lines = [f"Ticket({', '.join(h for h in head if h)})",
                 "  " + "; ".join(x for x in [state, ", ".join(w for w in where if w) or None, d] if x)]
        if self.sharded:
            lines.append(f"  {len(self)} tensors, sharded (DTensor masks; .full() gathers)")
            return "\n".join(lines)
        share = self.pruned_share
        pruned = sum(int((~m).sum()) for m in self._masks.values())
        lines.append(f"  {len(self)} tensors, {pruned:,} of {self.numel:,} entries pruned "
                     f"({100 * pruned / max(self.numel, 1):.1f}%)")
        rows = list(self._masks.items())
        show = rows if len(rows) <= 12 else rows[:6] + [None] + rows[-5:]
        width = max(len(n) for n, _ in rows) if rows else 0
        for row in show:
            if row is None:
                lines.append(f"    ... {len(rows) - 11} more")
                continue
            n, m = row
            lines.append(f"    {n:<{width}}  {tuple(m.shape)!s:<14} pruned {100 * share[n]:5.1f}%")
        return "\n".join(lines)

    # ------------------------------------------------------------------ save
    def full(self) -> "Ticket":
        """The ticket with full (gathered) masks; a collective on a sharded ticket."""
        if not self.sharded:
            return self
        return self._like({n: (m.full_tensor() if _is_dtensor(m) else m) for n, m in self._masks.items()})

    def to(self, device) -> "Ticket":
        return self._like({n: m.to(device) for n, m in self._masks.items()})

    def _like(self, masks: dict) -> "Ticket":
        out = Ticket(masks, **self.meta())
        out._by_param = dict(self._by_param)
        return out

    def state_dict(self) -> dict:
        """``{"format", "version", "masks": {name: mask}, "meta": JSON text}``; masks stay
        as they are (DTensors too: ``torch.distributed.checkpoint`` saves them sharded)."""
        return {"format": _FORMAT, "version": 1, "masks": dict(self._masks),
                "meta": json.dumps(self.meta())}

    @classmethod
    def from_state_dict(cls, sd: Mapping) -> "Ticket":
        if not isinstance(sd, Mapping) or sd.get("format") != _FORMAT:
            raise ValueError("not a saved worm.Ticket (no 'format': 'worm.Ticket' entry)")
        if sd.get("version") != 1:
            raise ValueError(f"worm.Ticket format version {sd.get('version')!r} is newer than this "
                             "worm understands (1); upgrade worm")
        meta = sd["meta"]
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
        return cls(sd["masks"], **{k: v for k, v in meta.items() if k in _META_KEYS})

    def save(self, path) -> None:
        """Write the ticket with ``torch.save`` (loads with ``weights_only=True``).

        A sharded ticket is gathered first: every rank must call this; rank 0 writes.
        (Or save ``ticket.state_dict()`` with ``torch.distributed.checkpoint``.)
        """
        sharded = self.sharded
        full = self.full()
        if sharded and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        sd = full.state_dict()
        sd["masks"] = {n: m.detach().cpu() for n, m in sd["masks"].items()}
        torch.save(sd, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "Ticket":
        """A ticket written by :meth:`save` (read with ``weights_only=True``)."""
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
            raise FileNotFoundError(f"no ticket at {os.fspath(path)!r}")
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    # ------------------------------------------------------------------ bind
    def bind(self, model: nn.Module, who: str = "ticket") -> Dict[torch.Tensor, torch.Tensor]:
        """``{param of model: mask}`` by name, every name and shape checked; the error
        names the first parameter missing from ``model`` or differing in shape."""
        params = dict(model.named_parameters())
        bare = {_bare(n): p for n, p in params.items()}
        out = {}
        for name, keep in self._masks.items():
            p = params.get(name)
            if p is None:
                p = bare.get(_bare(name))
            if p is None:
                near = difflib.get_close_matches(name, list(params), n=1)
                origin = f" (the ticket is from a {self.model_class})" if self.model_class else ""
                raise ValueError(
                    f"{who}: parameter {name!r} of the ticket is not a parameter of this "
                    f"{type(model).__name__}{origin}"
                    + (f"; closest name here: {near[0]!r}" if near else "")
                    + ". Apply a ticket to a model with the same parameter names and shapes")
            if tuple(keep.shape) != tuple(p.shape):
                raise ValueError(f"{who}: parameter {name!r} has shape {tuple(p.shape)} in this "
                                 f"{type(model).__name__} but the ticket's mask is "
                                 f"{tuple(keep.shape)}; the ticket is for another configuration")
            out[p] = keep
        return out

    def bound_covers(self, model: nn.Module) -> Dict[torch.Tensor, torch.Tensor]:
        """``{param: mask}`` for the parameters the ticket's masks cover (norm betas)."""
        params = {_bare(n): p for n, p in model.named_parameters()}
        out = {}
        for other, name in self.covers.items():
            p = params.get(_bare(other))
            if p is not None and name in self._masks and tuple(p.shape) == tuple(self._masks[name].shape):
                out[p] = self._masks[name]
        return out


def _norm_covers(model: nn.Module, names) -> dict:
    """{beta name: gamma name} for the norm layers whose gamma ``names`` holds and
    whose beta does not hold a mask of its own (a channel is its gamma and beta)."""
    from .layers import is_norm
    out = {}
    names = set(names)
    for mname, mod in model.named_modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        pre = f"{mname}." if mname else ""
        if (is_norm(mod) and isinstance(b, torch.Tensor) and f"{pre}weight" in names
                and f"{pre}bias" not in names and b.shape == w.shape):
            out[f"{pre}bias"] = f"{pre}weight"
    return out


def model_class(model: nn.Module) -> str:
    """The user's class name, not a wrapper's (DDP, torch.compile, FSDP2's FSDP<cls>)."""
    inner = {"DistributedDataParallel": "module", "OptimizedModule": "_orig_mod"}
    while type(model).__name__ in inner and hasattr(model, inner[type(model).__name__]):
        model = getattr(model, inner[type(model).__name__])
    return next((c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP")),
                type(model).__name__)


def from_reps(masks: Mapping, reps, model: Optional[nn.Module], **meta) -> Ticket:
    """The search's ``{param: mask}`` (keyed by its representative tensors' parameters)
    as a named :class:`Ticket`; ``meta`` is the search's provenance."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}

    def name_of(p, rep=None):
        if id(p) in names:
            return names[id(p)]
        return rep.name if rep.index is None else rep.name.split("[")[0]

    by_name, counted, covers = {}, {}, {}
    for rep in reps:
        n = name_of(rep.param, rep)
        by_name[n] = rep.param
        counted[n] = counted.get(n, 0) + rep.numel
        for c in rep.covers:
            if id(c) in names:
                covers[names[id(c)]] = n
    named = {name_of(p, next(r for r in reps if r.param is p)): m for p, m in masks.items()}
    if meta.get("kind") is None:
        whole = all(r.index is None and r.param.dim() == 1 for r in reps)
        meta["kind"] = "channels" if whole else "entries"
    if model is not None:
        meta.setdefault("model_class", model_class(model))
    return Ticket(named, params=by_name, covers=covers, counted=counted, **meta)


def as_ticket(ticket, model: nn.Module, who: str = "ticket") -> Ticket:
    """A :class:`Ticket` from a Ticket, ``{name: mask}`` or ``{param of model: mask}``."""
    if ticket is None:
        raise TypeError(f"{who}: the ticket is None: no ticket yet (search.ticket is None until "
                        "search.found; search.mask is the newest sampled mask)")
    if isinstance(ticket, Ticket):
        return ticket
    if not isinstance(ticket, Mapping):
        raise TypeError(f"{who}: the ticket must be a worm.Ticket or a dict {{parameter name: "
                        f"keep mask}}, got {type(ticket).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for key, keep in ticket.items():
        if isinstance(key, str):
            masks[key] = keep
        elif isinstance(key, torch.Tensor):
            if id(key) not in names:
                raise ValueError(
                    f"{who}: a ticket key (a tensor of shape {tuple(key.shape)}) is not a parameter "
                    f"of this {type(model).__name__}. A dict keyed by parameter objects only fits the "
                    "very model it was taken from; a worm.Ticket (search.ticket) or {name: mask} "
                    "applies to any model with the same names and shapes (a copy, a fresh init)")
            masks[names[id(key)]] = keep
        else:
            raise TypeError(f"{who}: ticket keys are parameter names or parameters, got "
                            f"{type(key).__name__}")
    kind = "channels" if all(getattr(m, "dim", lambda: 0)() == 1 for m in masks.values()) else "entries"
    return Ticket(masks, kind=kind, model_class=model_class(model), covers=_norm_covers(model, masks))


class MaskHandle:
    """The hooks keeping a ticket applied; ``remove()`` lets the weights train freely."""

    def __init__(self, masks: dict):
        self.masks = masks          # {param: bool keep mask}
        self._handles: list = []

    @torch.no_grad()
    def reapply(self) -> None:
        for p, keep in self.masks.items():
            p.mul_(keep)

    def sparsity(self) -> float:
        """Fraction of the masked entries that are pruned."""
        n = sum(m.numel() for m in self.masks.values())
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / max(n, 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _owners(model: nn.Module) -> dict:
    owners = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), mod)
    return owners


def apply_masks(model: nn.Module, ticket, optimizer: Optional[torch.optim.Optimizer] = None) -> MaskHandle:
    """Zero the pruned entries of ``ticket`` and keep them zero.

    ``ticket``: a :class:`Ticket`, ``{parameter name: bool keep}`` or (for the model it
    was taken from) ``{param: bool keep}``; applied by name to any model whose names
    and shapes match. A mask on a norm layer's gamma masks its beta as well.
    """
    t = as_ticket(ticket, model, "apply_masks")
    if not len(t):
        raise ValueError("apply_masks: the ticket is empty")
    owners = _owners(model)
    bound = t.bind(model, "apply_masks")
    covered = t.bound_covers(model) if t.covers else {}
    masks = {}
    for p, keep in [*bound.items(), *covered.items()]:
        if id(p) not in owners:  # pragma: no cover - bind() only returns the model's params
            raise ValueError(f"apply_masks: a ticket entry (shape {tuple(p.shape)}) is not a "
                             "parameter of this model")
        masks[p] = keep.to(p.device)
    # only once the new ticket is known good: a rejected one must not drop the old
    remove_masks(model)
    handle = MaskHandle(masks)
    handle.reapply()
    by_module: dict = {}
    for p, keep in masks.items():
        by_module.setdefault(owners[id(p)], []).append(p)
        if p.requires_grad:
            handle._handles.append(p.register_hook(lambda g, keep=keep: g * keep))

    def _rezero(module, args, params):
        with torch.no_grad():
            for p in params:
                p.mul_(masks[p])

    for mod, params in by_module.items():
        handle._handles.append(mod.register_forward_pre_hook(
            lambda m, a, params=params: _rezero(m, a, params)))
    if optimizer is not None:
        handle._handles.append(optimizer.register_step_post_hook(lambda *a: handle.reapply()))
    setattr(model, _ATTR, handle)
    return handle


def remove_masks(model: nn.Module) -> None:
    """Remove the hooks of a ticket applied with :func:`apply_masks` (weights keep values)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(model, _ATTR)
