"""Who truncates which parameters of an optimizer, and the step pre-hook that does it.

Truncation (docs/method.md): while on, every optimizer step first multiplies the
gradient of each entry that the newest mask prunes by ``r``; weight decay and
momentum then act as usual.

Where the multiplication happens is each owner's choice (``at``):

* ``"step"`` (the default): on ``p.grad`` at the optimizer step, fused into
  :class:`worm.WormSGD`'s update or by the step pre-hook; bit for bit a step pre-hook
  multiplying ``p.grad``. Whatever ran between ``backward()`` and ``step()``
  (clipping, accumulation, unscaling) saw the untruncated gradient. With a closure
  (LBFGS, ...) the gradients each closure evaluation makes are truncated.
* ``"backward"``: by a gradient hook on each parameter (``p.register_hook``), so the
  result is bit for bit that of gradient hooks whatever happens between backward and
  step. Costs a Python hook per parameter per backward; plain tensors only (FSDP2
  sets sharded gradients outside autograd).

Several owners (searches, or the user) may truncate *different* parameters of one
optimizer: their masks compose, each with its own ``r``. Truncating a parameter that
another owner already truncates is refused (it would multiply by ``r`` twice). The
registry of one optimizer, :class:`TruncationState`, lives on the optimizer itself
(``optimizer._worm_truncation``): :class:`worm.WormSGD` builds its own and fuses it
into its step; any other optimizer gets one on first use together with one step
pre-hook (:func:`truncate_grads`) that serves every owner. The optimizer holds its
registry, hence every owner's masks, strongly: truncation lasts as long as the
optimizer does, until the owner removes it (``EarlyBird.close()``), whether or not
anything else still refers to the owner.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

import torch

from . import ops
from . import reference as _ref
from .distributed import is_dtensor as _is_dtensor
from .distributed import local as _local
from .hook_grad import KERNEL_DTYPES, BackwardHook, truncated
from .slimming import L1Penalties, add_in_place

__all__ = ["GradTruncation", "truncation_pre_hook", "TruncationState", "state_of",
           "check_r", "pack_masks", "check_bits", "all_params"]

ATTR = "_worm_truncation"  # the optimizer attribute holding its TruncationState
WHERE = ("step", "backward")  # where an owner's truncation multiplies the gradient


def is_number(v) -> bool:
    """A real number as torch takes one: Python's, numpy's scalars; never a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def check_r(r) -> float:
    if not is_number(r) and not (isinstance(r, torch.Tensor) and r.numel() == 1
                                 and not r.dtype == torch.bool):
        raise TypeError(f"truncation factor r must be a number, got {type(r).__name__}")
    r = float(r)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"truncation factor r must be finite and >= 0, got {r!r}")
    return r


def all_params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def pack_masks(masks: Dict[torch.Tensor, torch.Tensor], known: set, owner: str) -> dict:
    """{param: packed keep bits}, validating each mask against its parameter."""
    bits = {}
    for p, m in masks.items():
        if id(p) not in known:
            raise ValueError(f"{owner}: a truncation mask is keyed by a tensor (shape "
                             f"{tuple(p.shape)}) that the optimizer does not hold")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{owner}: keep masks are bool tensors (True = keep), got "
                            f"{getattr(m, 'dtype', type(m).__name__)} for a parameter of shape {tuple(p.shape)}")
        if m.shape != p.shape:
            raise ValueError(f"{owner}: keep mask shape {tuple(m.shape)} does not match "
                             f"its parameter's {tuple(p.shape)}")
        if m.device != p.device:
            raise ValueError(f"{owner}: keep mask on {m.device} but its parameter on {p.device}")
        bits[p] = _ref.pack([_local(m)])  # DTensor params (FSDP2): bits of the local shard
    return bits


def param_label(optimizer, p) -> str:
    """How an error names a parameter: its index in the optimizer and its shape."""
    index = next((i for i, q in enumerate(all_params(optimizer)) if q is p), None)
    where = f"parameter {index} of the optimizer" if index is not None else "a parameter"
    return f"{where} (shape {tuple(p.shape)})"


def check_sizes(sizes: dict, optimizer, who: str) -> None:
    """Every mask still covers its parameter (``sizes``: {param: entries when its mask
    was set}): refuse one resized in place, by name, before anything is changed."""
    for p, n0 in sizes.items():
        n = _local(p).numel()
        if n != n0:
            raise ValueError(f"{who}: {param_label(optimizer, p)} has {n} entries but its truncation "
                             f"mask was set for {n0}: it was resized after the mask was set. Set the "
                             "masks again (or close() the search and build a new one)")


def check_bits(bits: dict, owner: str) -> dict:
    for p, b in bits.items():
        n = _local(p).numel()  # a DTensor's bits cover its local shard
        if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != _ref.packed_nbytes(n):
            raise ValueError(f"{owner}: packed keep bits for a parameter of {n} entries must be "
                             f"uint8 [{_ref.packed_nbytes(n)}], got {b.dtype} {tuple(b.shape)}")
        if b.device != p.device:
            raise ValueError(f"{owner}: packed keep bits on {b.device} but parameter on {p.device}")
    return bits


# ------------------------------------------------------------------ owners
class _Owner:
    __slots__ = ("name", "claimed", "bits", "r", "at", "hooks", "keep", "sizes")

    def __init__(self, name: str, at: str = "step"):
        self.name, self.claimed, self.bits, self.r, self.at = name, set(), {}, None, at
        self.sizes: dict = {}  # {param: entries when its mask was set}
        self.hooks: dict = {}  # at="backward": {id(param): hook handle}
        self.keep: dict = {}   # at="backward": {param: (bits, unpacked bool mask)}

    def keep_of(self, p, bits) -> torch.Tensor:
        cached = self.keep.get(p)
        if cached is None or cached[0] is not bits:  # new bits at each sampling step only
            cached = self.keep[p] = (bits, _ref.unpack(bits, [_local(p).shape])[0])
        return cached[1]

    def hook(self, params) -> None:
        for p in params:
            if id(p) in self.hooks:
                continue
            if _is_dtensor(p):
                raise ValueError(f"{self.name}: truncate_at='backward' needs plain tensors, but a "
                                 f"parameter of shape {tuple(p.shape)} is a DTensor (FSDP2 sets sharded "
                                 "gradients outside autograd, where no hook sees them); use "
                                 "truncate_at='step'")
            if not p.requires_grad:
                continue  # no gradient ever reaches it
            self.hooks[id(p)] = p.register_hook(BackwardHook(self, p))

    def unhook(self) -> None:
        for h in self.hooks.values():
            h.remove()
        self.hooks, self.keep = {}, {}


class TruncationState:
    """Every owner's masks on one optimizer, and their union ``bits``/``r_of``.

    ``bits`` ({param: packed keep bits}) and ``r_of`` ({param: r}) hold only the
    parameters truncated now (r != 1): the step reads nothing else. ``l1``: the
    owners' slimming penalties (:mod:`worm.slimming`).
    """

    def __init__(self):
        self._owners: dict = {}
        self.bits: dict = {}
        self.r_of: dict = {}
        self.sizes: dict = {}
        self.l1 = L1Penalties()

    @property
    def penalised(self) -> bool:
        return len(self.l1) > 0

    @property
    def active(self) -> bool:
        return len(self.bits) > 0  # len(): torch.compile cannot trace bool(dict)

    def _rebuild(self) -> None:
        bits, r_of, sizes = {}, {}, {}
        for o in self._owners.values():
            if o.r is None or o.r == 1.0 or o.at != "step":  # "backward": the hooks truncate
                continue
            for p, b in o.bits.items():
                bits[p], r_of[p], sizes[p] = b, o.r, o.sizes[p]
        self.bits, self.r_of, self.sizes = bits, r_of, sizes

    def add_owner(self, key, name: str, at: str = "step") -> None:
        self._owners.setdefault(key, _Owner(name, at))

    def has_owner(self, key) -> bool:
        return key in self._owners

    def release(self, key) -> None:
        self.l1.remove(key)
        o = self._owners.pop(key, None)
        if o is not None:
            o.unhook()
            self._rebuild()

    def refuse_shared(self, key, params, who: str) -> None:
        for k, o in self._owners.items():
            if k == key:
                continue
            held = o.claimed | {id(p) for p in o.bits}
            for p in params:
                if id(p) in held:
                    raise ValueError(
                        f"{who}: a parameter of shape {tuple(p.shape)} is already truncated by {o.name}; "
                        "one parameter takes one truncation (two would multiply its gradient by r "
                        "twice). close() the other search, or set its masks to None, first")

    def claim(self, key, params) -> None:
        """Reserve ``params`` for owner ``key`` (refused if another owner holds one)."""
        o = self._owners[key]
        self.refuse_shared(key, params, o.name)
        if o.at == "backward":
            o.hook(params)
        o.claimed |= {id(p) for p in params}

    def set(self, key, bits: Optional[dict], r: Optional[float]) -> None:
        o = self._owners.get(key)
        if o is None:
            if bits is None:
                return
            raise RuntimeError("this truncation handle was removed; make a new one")
        if bits is None:
            o.bits, o.r, o.sizes = {}, None, {}
        else:
            self.refuse_shared(key, list(bits), o.name)
            if o.at == "backward":
                o.hook(list(bits))
            o.bits, o.r = dict(bits), r
            o.sizes = {p: _local(p).numel() for p in o.bits}
        self._rebuild()

    def owner_state(self, key, index_of: dict) -> dict:
        o = self._owners.get(key)
        if o is None or o.r is None:
            return {"r": None, "bits": {}}
        return {"r": o.r, "bits": {index_of[id(p)]: b for p, b in o.bits.items()}}

    def parse(self, sd: Optional[dict], params: list, who: str):
        """(bits, r) from an :meth:`owner_state` dict, checked; (None, None) for off."""
        if not sd or sd.get("r") is None:
            return None, None
        bits = {}
        for i, b in sd["bits"].items():
            if not 0 <= int(i) < len(params):
                raise ValueError(f"{who}: truncation state names parameter {i} but the optimizer "
                                 f"holds {len(params)}")
            p = params[int(i)]
            bits[p] = b.to(p.device)
        return check_bits(bits, who), check_r(sd["r"])

    def summary(self) -> Optional[dict]:
        rs = sorted({r for r in self.r_of.values()})
        if not rs:
            return None
        return {"r": rs[0] if len(rs) == 1 else rs, "params": len(self.bits)}


def state_of(optimizer) -> TruncationState:
    """The optimizer's one truncation state: WormSGD's own (fused into its step), else
    one made now with the step pre-hook that applies it."""
    st = getattr(optimizer, ATTR, None)
    if st is None:
        st = TruncationState()
        setattr(optimizer, ATTR, st)
        optimizer.register_step_pre_hook(_pre_hook)
    return st


def _pre_hook(optimizer, args, kwargs):
    st = getattr(optimizer, ATTR)
    closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
    if closure is None:
        truncate_grads(st, optimizer)
        return None
    if not (st.active or st.penalised):
        return None

    # The step re-evaluates the gradients (LBFGS: many times): truncate each evaluation's.
    def truncating_closure():
        loss = closure()
        truncate_grads(st, optimizer)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": truncating_closure}
    return (args[0], truncating_closure, *args[2:]), kwargs


# --------------------------------------------------------------- the pre-hook
def truncate_grads(st: TruncationState, optimizer=None) -> None:
    """In place on p.grad, once per step: every owner's masks, then the slimming penalty."""
    if st.active:
        check_sizes(st.sizes, optimizer, "truncation pre-hook")  # before any gradient changes
    with torch.no_grad():
        truncate_only(st)
        if st.penalised:
            add_in_place(st.l1, optimizer)
    return None


def truncate_only(st: TruncationState) -> None:
    if not st.active:
        return None
    batches: dict = {}
    backends: dict = {}
    for p, bits in st.bits.items():
        if p.grad is None:
            continue
        g = _local(p.grad)  # FSDP2: truncate the local shard in place
        if g.numel() == 0:
            continue
        r = st.r_of[p]
        if g.dtype in KERNEL_DTYPES and g.layout == torch.strided and g.is_contiguous():
            be = backends.get(g.device)
            if be is None:
                be = backends[g.device] = ops.backend(g.device)
            if be != "reference":
                grads, bl = batches.setdefault((g.device, r), ([], []))
                grads.append(g)
                bl.append(bits)
                continue
        if g.is_sparse:
            p.grad = truncated(g, bits, r)
        else:
            g.copy_(truncated(g, bits, r))
    for (device, r), (grads, bl) in batches.items():
        ops.truncate_(grads, bl, r)
    return None


class GradTruncation:
    """Truncation for any ``torch.optim.Optimizer``, applied by a step pre-hook.

    The hook multiplies, in place and in one multi-tensor pass, the gradients of the
    pruned entries by ``r`` just before the optimizer's step: the gradient-hook
    semantics of docs/method.md, with no per-parameter Python hooks. One hook per
    optimizer serves every handle; each handle owns its own parameters (refused if
    another handle or search truncates one of them). On a :class:`WormSGD` the handle
    sets masks fused into its step instead. Under ``GradScaler`` the hook runs inside
    ``optimizer.step``: on the scaled gradients for a fused optimizer (which unscales
    them after, the order of a gradient hook), on the unscaled ones otherwise (equal
    to a hook's result while the scale is a power of two, as GradScaler's always is,
    barring underflow).

    ``at``: ``"step"`` (above) or ``"backward"`` (gradient hooks on the parameters;
    see the module docstring). The truncation lasts, held by the optimizer, until
    :meth:`remove`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, name: Optional[str] = None, at: str = "step"):
        if at not in WHERE:
            raise ValueError(f"truncate_at must be one of {WHERE}, got {at!r}")
        self.optimizer = optimizer
        self._state = state_of(optimizer)
        self._key = object()
        self.name = name or f"a truncation_pre_hook handle on {type(optimizer).__name__}"
        self._state.add_owner(self._key, self.name, at)

    def claim(self, params) -> None:
        """Reserve ``params`` for this handle now (refused if another owner truncates one)."""
        self._state.claim(self._key, list(params))

    def set(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        if masks is None:
            self._state.set(self._key, None, None)
            return
        r = check_r(r)
        known = {id(p) for p in all_params(self.optimizer)}
        self._state.set(self._key, pack_masks(masks, known, "GradTruncation.set"), r)

    def set_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        if bits is None:
            self._state.set(self._key, None, None)
            return
        known = {id(p) for p in all_params(self.optimizer)}
        for p in bits:
            if id(p) not in known:
                raise ValueError("GradTruncation.set_bits: a key is not a parameter of this optimizer")
        r = check_r(r)
        self._state.set(self._key, check_bits(dict(bits), "GradTruncation"), r)

    def set_l1(self, where: Optional[dict], l1: float) -> None:
        """Network slimming for this handle's params: ``g = trunc(g) + l1*sign(w)``.

        ``where``: ``{param: None (every entry) or bool mask of the entries}``; None or
        ``l1 == 0`` turns it off.
        """
        l1 = float(l1)
        if not math.isfinite(l1) or l1 < 0:
            raise ValueError(f"GradTruncation.set_l1: l1 must be finite and >= 0, got {l1!r}")
        known = {id(p) for p in all_params(self.optimizer)}
        for p, m in (where or {}).items():
            if id(p) not in known:
                raise ValueError(f"GradTruncation.set_l1: a tensor of shape {tuple(p.shape)} is not "
                                 "held by the optimizer")
            if m is not None and (m.dtype != torch.bool or m.shape != p.shape):
                raise ValueError("GradTruncation.set_l1: entry masks are bool tensors of the parameter's shape")
        if not self._state.has_owner(self._key):
            if where and l1:
                raise RuntimeError("this truncation handle was removed; make a new one")
            return
        self._state.l1.set(self._key, where, l1, self.name)

    @property
    def active(self) -> bool:
        o = self._state._owners.get(self._key)
        return o is not None and o.r is not None and o.r != 1.0 and len(o.bits) > 0

    def state_dict(self) -> dict:
        index_of = {id(p): i for i, p in enumerate(all_params(self.optimizer))}
        return self._state.owner_state(self._key, index_of)

    def load_state_dict(self, sd: dict) -> None:
        bits, r = self._state.parse(sd, all_params(self.optimizer), "GradTruncation.load_state_dict")
        self._state.set(self._key, bits, r)

    def remove(self) -> None:
        """End this handle's truncation and free its parameters for another owner."""
        self._state.release(self._key)


def truncation_pre_hook(optimizer: torch.optim.Optimizer) -> GradTruncation:
    """Attach WORM truncation to any optimizer; returns the handle that sets masks."""
    return GradTruncation(optimizer)
