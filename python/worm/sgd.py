"""WormSGD: ``torch.optim.SGD`` with WORM gradient truncation fused into its step.

A subclass of ``torch.optim.SGD`` (same arguments, defaults, ``param_groups`` and
``state_dict``) whose step fuses truncation into the update when a kernel backend
runs; with truncation off (or ``r == 1``) it *is* SGD's step. Its masks live in a
:class:`worm.truncation.TruncationState` on the optimizer (searches and the user
compose there); the l1 penalty is :mod:`worm.slimming`'s.

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
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.optim.sgd import sgd as _torch_sgd

from . import ops
from .distributed import local as _local
from .distributed import sgd_step_ as _sgd_step_on_shards
from .hook_grad import KERNEL_DTYPES, truncated_grad
from .slimming import swapped_grads
from .truncation import TruncationState, all_params, check_bits, check_r, check_sizes, pack_masks

__all__ = ["WormSGD"]

_STATE_KEY = "worm_truncation"
_USER = "user"  # owner key of masks set by hand (set_truncation)
_USER_NAME = "masks set by WormSGD.set_truncation"


def _unhooked_sgd_step():
    """SGD.step without the profiling wrapper that runs step hooks: WormSGD's own
    wrapper already ran them, and torch wraps SGD.step once any SGD is built."""
    fn = torch.optim.SGD.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


def _kernel_takes(p: torch.Tensor, buf: Optional[torch.Tensor]) -> bool:
    g = p.grad
    return (p.dtype in KERNEL_DTYPES and g.dtype == p.dtype and g.layout == torch.strided
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
        self._worm_truncation = TruncationState()  # truncation.ATTR: one registry, on the optimizer
        self._worm_truncation.add_owner(_USER, _USER_NAME)

    # -------------------------------------------------------------- truncation
    def set_truncation(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        """Truncate the pruned entries (``keep == False``) of these params by ``r``.

        ``masks``: ``{param: bool keep mask of the param's shape}``; None turns it off.
        Replaces the masks set by hand before; a search's masks are its own.
        """
        if masks is None:
            self._worm_truncation.set(_USER, None, None)
            return
        r = check_r(r)
        known = {id(p) for p in all_params(self)}
        self._worm_truncation.set(_USER, pack_masks(masks, known, "WormSGD.set_truncation"), r)

    def set_truncation_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        """As :meth:`set_truncation`, with masks already packed (``reference.pack``)."""
        if bits is None:
            self._worm_truncation.set(_USER, None, None)
            return
        known = {id(p) for p in all_params(self)}
        for p in bits:
            if id(p) not in known:
                raise ValueError("WormSGD.set_truncation_bits: a key is not a parameter of this optimizer")
        r = check_r(r)
        self._worm_truncation.set(_USER, check_bits(dict(bits), "WormSGD"), r)

    @property
    def truncation(self) -> Optional[dict]:
        """``{"r": r, "params": n}`` while truncation is on (r a sorted list when owners differ)."""
        return self._worm_truncation.summary()

    # -------------------------------------------------------------------- step
    def step(self, closure=None):
        st = self._worm_truncation
        if not (st.active or st.penalised):
            return _unhooked_sgd_step()(self, closure)
        loss = None
        if closure is not None:  # the gradients the step reads are the closure's
            with torch.enable_grad():
                loss = closure()
        if st.active:  # every group is checked before any is updated
            check_sizes(st.sizes, self, "WormSGD.step")
        if st.penalised:
            self._penalised_step()
        else:
            self._planned_step()
        return loss

    def _penalised_step(self) -> None:
        """The step with the slimming penalty: penalised params step on
        ``trunc(g) + l1*sign(w)`` and untruncated; everything else as usual."""
        st = self._worm_truncation
        bits, r_of = st.bits, st.r_of
        try:
            with swapped_grads(self, st.l1, bits, r_of) as done:
                st.bits = {p: b for p, b in bits.items() if id(p) not in done}
                st.r_of = {p: r for p, r in r_of.items() if id(p) not in done}
                if st.active:
                    self._planned_step()
                else:
                    _unhooked_sgd_step()(self, None)
        finally:
            st.bits, st.r_of = bits, r_of

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
            batches.setdefault((p.device, self._worm_truncation.r_of.get(p)), []).append(p)
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
                [self._worm_truncation.bits.get(p) for p in params], r=1.0 if r is None else r, lr=group["lr"], weight_decay=group["weight_decay"],
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
            bits = self._worm_truncation.bits.get(p)
            if bits is None:
                grads.append(p.grad)
            else:
                grads.append(truncated_grad(p.grad, bits, self._worm_truncation.r_of[p]))
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

    # ------------------------------------------------------ pickle and deepcopy
    def __getstate__(self):
        # torch.optim.Optimizer pickles defaults/state/param_groups only (its hooks
        # stay behind). The masks set by hand go along, as in state_dict(); a search's
        # truncation stays with the search, on this optimizer.
        state = super().__getstate__()
        mine = TruncationState()
        user = self._worm_truncation._owners.get(_USER)
        mine.add_owner(_USER, _USER_NAME)
        if user is not None and user.r is not None:
            mine.set(_USER, user.bits, user.r)
        return {**state, "_worm_truncation": mine}

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_worm_truncation" not in self.__dict__:  # a pickled torch.optim.SGD's state
            self._worm_truncation = TruncationState()
            self._worm_truncation.add_owner(_USER, _USER_NAME)

    # -------------------------------------------------------------- state dict
    def state_dict(self):
        sd = super().state_dict()
        index_of = {id(p): i for i, p in enumerate(all_params(self))}
        mine = self._worm_truncation.owner_state(_USER, index_of)
        if mine.get("bits"):  # only masks set by hand; a search saves its own
            sd[_STATE_KEY] = mine
        return sd  # otherwise exactly torch.optim.SGD's

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        trunc = state_dict.pop(_STATE_KEY, None)
        params = all_params(self)
        _check_buffer_shapes(state_dict, params)
        bits, r = self._worm_truncation.parse(trunc, params, "WormSGD.load_state_dict")
        if bits is not None:  # refused here, before SGD's own load changes anything
            self._worm_truncation.refuse_shared(_USER, list(bits), "WormSGD.load_state_dict")
        super().load_state_dict(state_dict)
        self._worm_truncation.set(_USER, bits, r)


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
