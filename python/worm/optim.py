"""WormSGD and gradient truncation for any optimizer.

Truncation (docs/method.md): while on, every optimizer step first multiplies the gradient
of each entry that the newest mask prunes by ``r``; weight decay and momentum then
act as usual. It behaves exactly like a gradient hook.

* :class:`WormSGD` is ``torch.optim.SGD`` (a subclass: same arguments, defaults,
  ``param_groups`` and ``state_dict``) whose step fuses truncation into the update
  when a kernel backend runs; with truncation off (or ``r == 1``) it *is* SGD's step.
* :class:`GradTruncation` (from :func:`truncation_pre_hook`) gives any other
  optimizer (AdamW, ...) the same truncation through a step pre-hook, one multi-tensor
  pass over the masked gradients.

Which path a truncating WormSGD step takes, per parameter:

* ``foreach`` and ``fused`` left unset (the default): parameters the backend's fused
  kernel takes (dense, contiguous, fp32/bf16/fp16 with gradient and momentum buffer
  of the same dtype) go through :func:`worm.ops.sgd_step_`; every
  other parameter (channels_last or transposed weights, float64, complex, sparse
  gradients, a buffer of another dtype after ``.half()``, ...) goes through
  ``torch.optim.SGD``'s own code with the truncated gradient, as a hook would give it.
* ``foreach=True/False``, ``fused=True``, ``differentiable=True`` or tensor ``lr``:
  the whole group runs torch's own path (the one asked for) on the truncated
  gradients, so the result is that of ``torch.optim.SGD`` with the same flags plus
  gradient hooks, bit for bit, in every dtype. With ``fused=True`` the step claims AMP
  support as SGD's does: ``grad_scale``/``found_inf`` from ``GradScaler`` are honoured
  by torch's fused kernel (inf steps skipped, gradients unscaled).

Precision of the kernel path against ``SGD(foreach=False)`` + hooks: fp32 bit for bit
except where one side contracts ``a + alpha * b`` into an FMA (1 ulp); bf16/fp16 at
most 1 ulp of the parameter dtype per step (worm_kernels/sgd_step.py). The truncated
gradient is ``round(g * r)`` in fp32, rounded once to the gradient's dtype (a hook
computing ``(g.float() * scale).to(g.dtype)``); float64/complex gradients are scaled
in their own precision.

``p.grad`` after ``WormSGD.step()``: never truncated (no backend writes the truncated
gradient back, saving a pass over memory). A truncated parameter's ``p.grad`` is the
gradient backward produced (unscaled in place under ``GradScaler`` with ``fused=True``,
as SGD's fused kernel does); an untruncated one's is what ``torch.optim.SGD`` leaves:
untouched with the default flags on every backend and device, and changed only where
torch's own explicitly requested path changes it (``foreach=True`` with nesterov adds
the momentum into it; ``fused=True`` under GradScaler unscales it). With
:class:`GradTruncation` the wrapped optimizer reads ``p.grad``, so there it is
truncated in place before the step: afterwards it is what a gradient hook leaves.

Several owners (searches, or the user) may truncate *different* parameters of one
optimizer: their masks compose, each with its own ``r``. Truncating a parameter that
another owner already truncates is refused (it would multiply by ``r`` twice).

Network slimming (``GradTruncation.set_l1``, set by ``EarlyBird(l1=...)``): the
gradient of each penalised (representative) weight becomes ``trunc(g) + l1*sign(w)``
before weight decay and momentum (docs/method.md's order; the penalty is not
truncated). In WormSGD's step the penalised tensors (BN gammas: a few KB) get that
gradient in one small pass and then step untruncated on the same path as every other
tensor (the fused kernel takes no l1 argument); their ``p.grad`` is restored after the
step. For other optimizers the pre-hook adds the penalty in place after truncating.
``l1 == 0`` registers nothing: the step is exactly the one without it.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional

import torch
from torch.optim.sgd import sgd as _torch_sgd

from . import ops
from . import reference as _ref
from .distributed import is_dtensor as _is_dtensor
from .distributed import local as _local
from .distributed import sgd_step_ as _sgd_step_on_shards

__all__ = ["WormSGD", "GradTruncation", "truncation_pre_hook", "truncated"]

_STATE_KEY = "worm_truncation"
_USER = "user"  # owner key of masks set by hand (set_truncation)
_KERNEL_DTYPES = ops.FLOAT_DTYPES


def _check_r(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) and not (
            isinstance(r, torch.Tensor) and r.numel() == 1):
        raise TypeError(f"truncation factor r must be a number, got {type(r).__name__}")
    r = float(r)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"truncation factor r must be finite and >= 0, got {r!r}")
    return r


def _pack_masks(masks: Dict[torch.Tensor, torch.Tensor], known: set, owner: str) -> dict:
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


def _check_bits(bits: dict, owner: str) -> dict:
    for p, b in bits.items():
        n = _local(p).numel()  # a DTensor's bits cover its local shard
        if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != _ref.packed_nbytes(n):
            raise ValueError(f"{owner}: packed keep bits for a parameter of {n} entries must be "
                             f"uint8 [{_ref.packed_nbytes(n)}], got {b.dtype} {tuple(b.shape)}")
        if b.device != p.device:
            raise ValueError(f"{owner}: packed keep bits on {b.device} but parameter on {p.device}")
    return bits


# ------------------------------------------------------------ the hook's gradient
def _scaled(v: torch.Tensor, keep: torch.Tensor, r: float) -> torch.Tensor:
    if v.dtype in _KERNEL_DTYPES:
        # fp32 product rounded once: reference.truncate_'s rule
        scale = torch.where(keep, torch.ones((), device=v.device),
                            torch.full((), r, dtype=torch.float32, device=v.device))
        return (v.float() * scale).to(v.dtype)
    real = v.real.dtype if v.is_complex() else v.dtype
    scale = torch.where(keep, torch.ones((), dtype=real, device=v.device),
                        torch.full((), r, dtype=real, device=v.device))
    return v * scale


def truncated(grad: torch.Tensor, keep_bits: torch.Tensor, r: float) -> torch.Tensor:
    """The gradient a hook multiplying the pruned entries by ``r`` returns (a new tensor).

    Any dtype, layout (channels_last, transposed, ...) or sparse COO gradient;
    ``keep_bits`` is the packed mask in the parameter's logical (row-major) order.
    """
    keep = _ref.unpack(keep_bits, [grad.shape])[0]
    if grad.is_sparse:  # entry by entry, duplicates not summed first: as a hook sees them
        idx = grad._indices()
        vals = _scaled(grad._values(), keep[tuple(idx)], r)
        return torch.sparse_coo_tensor(idx, vals, grad.shape, is_coalesced=grad.is_coalesced(),
                                       check_invariants=False)
    return _scaled(grad, keep, r)


def _truncated_grad(grad, bits, r):
    """:func:`truncated` for a parameter's gradient; a DTensor's bits cover its local shard."""
    if not _is_dtensor(grad):
        return truncated(grad, bits, r)
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(truncated(grad.to_local(), bits, r), grad.device_mesh, grad.placements,
                              run_check=False, shape=grad.shape, stride=grad.stride())


# ------------------------------------------------------------------ owners
class _Owner:
    __slots__ = ("name", "claimed", "bits", "r")

    def __init__(self, name: str):
        self.name, self.claimed, self.bits, self.r = name, set(), {}, None


class _TruncationState:
    """Every owner's masks on one optimizer, and their union ``bits``/``r_of``.

    ``bits`` ({param: packed keep bits}) and ``r_of`` ({param: r}) hold only the
    parameters truncated now (r != 1): the step reads nothing else.
    """

    def __init__(self):
        self._owners: dict = {}
        self.bits: dict = {}
        self.r_of: dict = {}
        self.penalties: dict = {}  # owner key -> (l1, {param: None (all) or bool entry mask})

    @property
    def penalised(self) -> bool:
        return len(self.penalties) > 0

    def set_penalty(self, key, where: Optional[dict], l1: float) -> None:
        if not where or l1 == 0:
            self.penalties.pop(key, None)
        else:
            self.penalties[key] = (float(l1), dict(where))

    def penalty_terms(self):
        for l1, where in self.penalties.values():
            for p, m in where.items():
                yield p, m, l1

    @property
    def active(self) -> bool:
        return len(self.bits) > 0  # len(): torch.compile cannot trace bool(dict)

    def _rebuild(self) -> None:
        bits, r_of = {}, {}
        for o in self._owners.values():
            if o.r is None or o.r == 1.0:
                continue
            for p, b in o.bits.items():
                bits[p], r_of[p] = b, o.r
        self.bits, self.r_of = bits, r_of

    def add_owner(self, key, name: str) -> None:
        self._owners.setdefault(key, _Owner(name))

    def release(self, key) -> None:
        self.penalties.pop(key, None)
        if self._owners.pop(key, None) is not None:
            self._rebuild()

    def _refuse_shared(self, key, params, who: str) -> None:
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
        self._refuse_shared(key, params, o.name)
        o.claimed |= {id(p) for p in params}

    def set(self, key, bits: Optional[dict], r: Optional[float]) -> None:
        o = self._owners.get(key)
        if o is None:
            if bits is None:
                return
            raise RuntimeError("this truncation handle was removed; make a new one")
        if bits is None:
            o.bits, o.r = {}, None
        else:
            self._refuse_shared(key, list(bits), o.name)
            o.bits, o.r = dict(bits), r
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
        return _check_bits(bits, who), _check_r(sd["r"])

    def summary(self) -> Optional[dict]:
        rs = sorted({r for r in self.r_of.values()})
        if not rs:
            return None
        return {"r": rs[0] if len(rs) == 1 else rs, "params": len(self.bits)}


def _all_params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _unhooked_sgd_step():
    """SGD.step without the profiling wrapper that runs step hooks: WormSGD's own
    wrapper already ran them, and torch wraps SGD.step once any SGD is built."""
    fn = torch.optim.SGD.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


def _kernel_takes(p: torch.Tensor, buf: Optional[torch.Tensor]) -> bool:
    g = p.grad
    return (p.dtype in _KERNEL_DTYPES and g.dtype == p.dtype and g.layout == torch.strided
            and g.device == p.device and p.numel() > 0 and p.is_contiguous() and g.is_contiguous()
            and (buf is None or (buf.dtype == p.dtype and buf.device == p.device and buf.is_contiguous())))


class WormSGD(torch.optim.SGD):
    """``torch.optim.SGD`` with WORM gradient truncation fused into its step.

    Same arguments and defaults as ``torch.optim.SGD``. :meth:`set_truncation` turns
    truncation on for some parameters. ``state_dict()`` is SGD's plus one extra key
    (``"worm_truncation"``: the masks set by hand; a search restores its own) that
    ``torch.optim.SGD`` ignores, so either optimizer loads the other's state. See the
    module docstring for the path each parameter takes, precision, and ``p.grad``.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._trunc = _TruncationState()
        self._trunc.add_owner(_USER, "masks set by WormSGD.set_truncation")

    # -------------------------------------------------------------- truncation
    def set_truncation(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        """Truncate the pruned entries (``keep == False``) of these params by ``r``.

        ``masks``: ``{param: bool keep mask of the param's shape}``; None turns it off.
        Replaces the masks set by hand before; a search's masks are its own.
        """
        if masks is None:
            self._trunc.set(_USER, None, None)
            return
        r = _check_r(r)
        known = {id(p) for p in _all_params(self)}
        self._trunc.set(_USER, _pack_masks(masks, known, "WormSGD.set_truncation"), r)

    def set_truncation_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        """As :meth:`set_truncation`, with masks already packed (``reference.pack``)."""
        if bits is None:
            self._trunc.set(_USER, None, None)
            return
        known = {id(p) for p in _all_params(self)}
        for p in bits:
            if id(p) not in known:
                raise ValueError("WormSGD.set_truncation_bits: a key is not a parameter of this optimizer")
        r = _check_r(r)
        self._trunc.set(_USER, _check_bits(dict(bits), "WormSGD"), r)

    @property
    def truncation(self) -> Optional[dict]:
        """``{"r": r, "params": n}`` while truncation is on (r a sorted list when owners differ)."""
        return self._trunc.summary()

    # -------------------------------------------------------------------- step
    def step(self, closure=None):
        if self._trunc.penalised:
            return self._penalised_step(closure)
        if not self._trunc.active:
            return _unhooked_sgd_step()(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._planned_step()
        return loss

    def _penalised_step(self, closure):
        """The step with the slimming penalty: penalised params step on
        ``trunc(g) + l1*sign(w)`` and untruncated; everything else as usual."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        st = self._trunc
        bits, r_of = st.bits, st.r_of
        swapped = []
        try:
            with torch.no_grad():
                for p, m, l1 in st.penalty_terms():
                    if p.grad is None:
                        continue
                    g = _truncated_grad(p.grad, bits[p], r_of[p]) if p in bits else p.grad.clone()
                    g.add_(_l1_sign(p, m, _amp_scale(self)), alpha=l1)
                    swapped.append((p, p.grad))
                    p.grad = g
            done = {id(p) for p, _ in swapped}
            st.bits = {p: b for p, b in bits.items() if id(p) not in done}
            st.r_of = {p: r for p, r in r_of.items() if id(p) not in done}
            if st.active:
                self._planned_step()
            else:
                _unhooked_sgd_step()(self, None)
        finally:
            st.bits, st.r_of = bits, r_of
            for p, g in swapped:
                p.grad = g
        return loss

    def _planned_step(self) -> None:
        # SGD's grad mode (no_grad unless differentiable=True), without the graph
        # breaks of torch's decorator so that torch.compile(fullgraph=True) traces it.
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            # Plan every group before touching anything: a refusal leaves all unchanged.
            plans = [self._plan(group) for group in self.param_groups]
            for group, plan in zip(self.param_groups, plans):
                self._run(group, *plan)

    def _plan(self, group):
        """(kernel batches {(device, r): [params]}, params for torch's own path)."""
        batches: dict = {}
        torch_path: list = []
        whole_group = (group["foreach"] is not None or group["fused"] or group["differentiable"]
                       or isinstance(group["lr"], torch.Tensor)
                       or isinstance(group["weight_decay"], torch.Tensor))
        momentum = group["momentum"]
        backends: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].get("momentum_buffer") if momentum != 0 else None
            if whole_group or not _kernel_takes(p, buf):
                torch_path.append(p)
                continue
            be = backends.get(p.device)
            if be is None:
                be = backends[p.device] = ops.backend(p.device)
            if be == "reference":  # torch's own single-tensor step is the reference
                torch_path.append(p)
                continue
            batches.setdefault((p.device, self._trunc.r_of.get(p)), []).append(p)
        # untruncated params (r None) ride along with a truncating batch of their device
        for dev, r in [k for k in batches if k[1] is None]:
            other = next((k for k in batches if k[0] == dev and k[1] is not None), None)
            if other is not None:
                batches[other].extend(batches.pop((dev, None)))
        return batches, torch_path, backends

    def _run(self, group, batches, torch_path, backends) -> None:
        momentum = group["momentum"]
        for (device, r), params in batches.items():
            bufs = [self.state[p].get("momentum_buffer") if momentum != 0 else None for p in params]
            new_bufs = _sgd_step_on_shards(  # DTensor params (FSDP2): the op runs on local shards
                ops.sgd_step_, params, [p.grad for p in params], bufs,
                [self._trunc.bits.get(p) for p in params], r=1.0 if r is None else r, lr=group["lr"], weight_decay=group["weight_decay"],
                momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"])
            if momentum != 0:
                for p, b in zip(params, new_bufs):
                    self.state[p]["momentum_buffer"] = b
        if torch_path:
            self._torch_step(group, torch_path)

    def _torch_step(self, group, params) -> None:
        """torch.optim.SGD's own step on ``params``, fed the hook's truncated gradients."""
        grads, raw = [], []
        for p in params:
            bits = self._trunc.bits.get(p)
            if bits is None:
                grads.append(p.grad)
            else:
                grads.append(_truncated_grad(p.grad, bits, self._trunc.r_of[p]))
                raw.append(p.grad)
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        foreach = group["foreach"]
        if foreach is None and not group["fused"]:
            # Nothing asked for: the single-tensor path, whose rounding the kernels follow
            # and which leaves p.grad alone (torch's foreach path adds the momentum into
            # the grads under nesterov) -- the same on every device and backend.
            foreach = False
        _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=momentum,
                   lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                   maximize=group["maximize"], has_sparse_grad=any(g.is_sparse for g in grads),
                   foreach=foreach, fused=group["fused"],
                   grad_scale=grad_scale, found_inf=found_inf)
        if momentum != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b
        if group["fused"] and grad_scale is not None and raw:
            # SGD's fused kernel unscales the grads it reads in place (not on inf steps);
            # it read the truncated copies, so p.grad gets the same division here.
            for g in raw:
                scale = grad_scale.to(g.device)
                if found_inf is not None:
                    scale = torch.where(found_inf.to(g.device) == 1, torch.ones_like(scale), scale)
                _local(g).div_(scale)

    # -------------------------------------------------------------- state dict
    def state_dict(self):
        sd = super().state_dict()
        index_of = {id(p): i for i, p in enumerate(_all_params(self))}
        mine = self._trunc.owner_state(_USER, index_of)
        if mine.get("bits"):  # only masks set by hand; a search saves its own
            sd[_STATE_KEY] = mine
        return sd  # otherwise exactly torch.optim.SGD's

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        trunc = state_dict.pop(_STATE_KEY, None)
        params = _all_params(self)
        _check_buffer_shapes(state_dict, params)
        bits, r = self._trunc.parse(trunc, params, "WormSGD.load_state_dict")
        super().load_state_dict(state_dict)
        self._trunc.set(_USER, bits, r)


def _check_buffer_shapes(state_dict: dict, params: list) -> None:
    """Refuse optimizer state of another model, naming the first differing tensor."""
    for i, st in state_dict.get("state", {}).items():
        if not isinstance(i, int) or not 0 <= i < len(params):
            continue  # SGD's own load reports a count mismatch
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[i].shape:
                raise ValueError(f"cannot load optimizer state: {name} of parameter {i} has shape "
                                 f"{tuple(v.shape)} in the state dict but the parameter here has "
                                 f"{tuple(params[i].shape)} (state from another model?)")


# --------------------------------------------------------------- other optimizers
_PRE_HOOKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state_of(optimizer) -> _TruncationState:
    """The optimizer's one truncation state: WormSGD's own, else one shared pre-hook."""
    if isinstance(optimizer, WormSGD):
        return optimizer._trunc
    st = _PRE_HOOKED.get(optimizer)
    if st is None:
        st = _TruncationState()
        optimizer.register_step_pre_hook(lambda opt, args, kwargs, st=st: _truncate_grads(st, opt))
        _PRE_HOOKED[optimizer] = st
    return st


def _amp_scale(optimizer) -> Optional[torch.Tensor]:
    """The loss scale GradScaler hands a fused optimizer (``optimizer.grad_scale``) while
    its gradients are still scaled; None once they are unscaled or without AMP."""
    gs = getattr(optimizer, "grad_scale", None)
    return gs if isinstance(gs, torch.Tensor) else None


def _l1_sign(p: torch.Tensor, m: Optional[torch.Tensor],
             scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sign(w) on the penalised entries; times the loss scale when the gradient it joins
    is still scaled (a fused step under GradScaler unscales it afterwards, and a penalty
    added unscaled would shrink to l1/scale). The scale is a power of two: exact."""
    s = p.detach().sign()
    s = s if m is None else s * m
    return s if scale is None else s * scale.to(device=s.device, dtype=s.dtype)


def _truncate_grads(st: _TruncationState, optimizer=None) -> None:
    """In place on p.grad, once per step: every owner's masks, then the slimming penalty."""
    _truncate_only(st)
    if st.penalised:
        scale = _amp_scale(optimizer)
        with torch.no_grad():
            for p, m, l1 in st.penalty_terms():
                if p.grad is not None:
                    _local(p.grad).add_(_local(_l1_sign(p, m, scale)), alpha=l1)
    return None


def _truncate_only(st: _TruncationState) -> None:
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
        if (g.dtype in _KERNEL_DTYPES and g.layout == torch.strided and g.is_contiguous()
                and g.numel() > 0):
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

    ``owner``: the object whose lifetime bounds this truncation (a search); when it
    is garbage collected the truncation ends. None: until :meth:`remove`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, owner=None, name: Optional[str] = None):
        self.optimizer = optimizer
        self._state = _state_of(optimizer)
        self._key = object()
        self.name = name or f"a truncation_pre_hook handle on {type(optimizer).__name__}"
        self._state.add_owner(self._key, self.name)
        if owner is not None:
            st, key = self._state, self._key
            self._owner_ref = weakref.ref(owner, lambda _ref: st.release(key))

    def claim(self, params) -> None:
        """Reserve ``params`` for this handle now (refused if another owner truncates one)."""
        self._state.claim(self._key, list(params))

    def set(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        if masks is None:
            self._state.set(self._key, None, None)
            return
        r = _check_r(r)
        known = {id(p) for p in _all_params(self.optimizer)}
        self._state.set(self._key, _pack_masks(masks, known, "GradTruncation.set"), r)

    def set_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        if bits is None:
            self._state.set(self._key, None, None)
            return
        known = {id(p) for p in _all_params(self.optimizer)}
        for p in bits:
            if id(p) not in known:
                raise ValueError("GradTruncation.set_bits: a key is not a parameter of this optimizer")
        r = _check_r(r)
        self._state.set(self._key, _check_bits(dict(bits), "GradTruncation"), r)

    def set_l1(self, where: Optional[dict], l1: float) -> None:
        """Network slimming for this handle's params: ``g = trunc(g) + l1*sign(w)``.

        ``where``: ``{param: None (every entry) or bool mask of the entries}``; None or
        ``l1 == 0`` turns it off.
        """
        l1 = float(l1)
        if not math.isfinite(l1) or l1 < 0:
            raise ValueError(f"GradTruncation.set_l1: l1 must be finite and >= 0, got {l1!r}")
        known = {id(p) for p in _all_params(self.optimizer)}
        for p, m in (where or {}).items():
            if id(p) not in known:
                raise ValueError(f"GradTruncation.set_l1: a tensor of shape {tuple(p.shape)} is not "
                                 "held by the optimizer")
            if m is not None and (m.dtype != torch.bool or m.shape != p.shape):
                raise ValueError("GradTruncation.set_l1: entry masks are bool tensors of the parameter's shape")
        if self._key not in self._state._owners:
            if where and l1:
                raise RuntimeError("this truncation handle was removed; make a new one")
            return
        self._state.set_penalty(self._key, where, l1)

    @property
    def active(self) -> bool:
        o = self._state._owners.get(self._key)
        return o is not None and o.r is not None and o.r != 1.0 and len(o.bits) > 0

    def state_dict(self) -> dict:
        index_of = {id(p): i for i, p in enumerate(_all_params(self.optimizer))}
        return self._state.owner_state(self._key, index_of)

    def load_state_dict(self, sd: dict) -> None:
        bits, r = self._state.parse(sd, _all_params(self.optimizer), "GradTruncation.load_state_dict")
        self._state.set(self._key, bits, r)

    def remove(self) -> None:
        """End this handle's truncation and free its parameters for another owner."""
        self._state.release(self._key)


def truncation_pre_hook(optimizer: torch.optim.Optimizer) -> GradTruncation:
    """Attach WORM truncation to any optimizer; returns the handle that sets masks."""
    return GradTruncation(optimizer)
