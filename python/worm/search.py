"""The Early-Bird / WORM ticket search (docs/method.md, "The search and its trigger").

Three lines in a user's loop::

    search = worm.EarlyBird(model, optimizer, mode="worm")
    ...                              # train one epoch
    if search.step().found: break    # at each sampling point

:class:`EarlyBird` is a thin coordinator: the representative set comes from
:mod:`worm.layers`, the masks live in a :class:`worm.window.MaskWindow` (bit-packed
ring of the last ``window`` masks; one threshold selection and one fused mask-update
op per sampling step), the decision is the pure rule of :mod:`worm.decision`, and the
truncation bits go to the optimizer (:class:`worm.WormSGD`, or a step pre-hook).
"""
from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import distributed as _dist
from . import reference as _ref
from .decision import MODES, Trace, check_delta, check_stop, decide, summarize
from .heads import check_ratios, is_structured, parse_kinds, structured_ks
from .layers import select
from .step_counter import UpdatedSteps
from .truncation import WHERE, GradTruncation, is_number
from .ticket import Ticket, from_reps
from .truncation import check_r as _check_r
from .window import SCORED_DTYPES, MaskWindow

__all__ = ["EarlyBird", "Record"]


def _finite(name: str, v, lo: float, lo_ok: bool) -> float:
    if not is_number(v):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < lo or (v == lo and not lo_ok):
        raise ValueError(f"{name} must be a finite number {'>=' if lo_ok else '>'} {lo}, got {v!r}")
    return v


def _positive_int(name: str, v, least: int, why: str) -> int:
    if not is_number(v) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{name} must be an integer >= {least} ({why}), got {v!r}")
    return int(v)


@dataclass
class Record:
    """What one sampling step saw. Distances are None until the window is full."""

    index: int                      # 1-based count of sampling steps
    epoch: Optional[int]            # == index when sampling per epoch (every=None)
    step: Optional[int]             # optimizer steps taken so far, when every= is set
    d_max: Optional[float]
    d_avg: Optional[float]
    distances: Optional[list]       # d_i against each older mask, oldest first
    truncating: bool                # truncation on after this step
    found: bool
    seconds: float                  # wall time of the sampling step itself
    pruned: Optional[float] = None  # share of the entries the mask prunes (> p with ties)


def _check_worm_r(r) -> float:
    """WORM's truncation factor: a number in [0, 1] (r = 1 is the plain step)."""
    r = _check_r(r)
    if r > 1:
        raise ValueError(f"r={r!r} > 1 would amplify the gradients of the weights the mask "
                         "prunes; WORM truncates them: use 0 <= r <= 1 (paper: 3e-3)")
    return r


class EarlyBird:
    """Early-Bird ticket search; ``mode="worm"`` adds WORM's gradient truncation.

    Args:
        model: the network (needed for ``layers="bn"``/``"norm"``/``"qk"``; may be None
            with a list; its parameter names name the ticket's masks).
        optimizer: a :class:`worm.WormSGD` (truncation fused into its step), any other
            ``torch.optim.Optimizer`` (truncation by a step pre-hook), or None for
            ``mode="eb"``.
        mode: ``"worm"``, ``"eb"`` (never truncate) or ``"truncate"`` (from the first step).
        layers: ``"bn"``, ``"norm"`` (every norm layer's gamma: LayerNorm, GroupNorm, ...),
            ``"qk"``, a callable ``model -> tensors`` or a list of tensors.
        prune_ratio, window, stop, delta, r, scope: docs/method.md's p, l, s, delta, r, scope.
        every: sample automatically every ``every`` optimizer steps that updated the
            weights (a step post-hook; GradScaler's skipped steps do not count); None:
            the caller calls :meth:`step` at each sampling point.
            ``stop="auto"`` / ``delta="auto"``: the threshold-free rules of docs/method.md;
            delta None (the default) is 0.05 with a number s and "auto" with stop="auto".
        l1: network slimming (EB's recipe, 1e-4 there): ``g = trunc(g) + l1*sign(w)`` on
            the representative weights at every optimizer step until :meth:`close`
            (not on BN biases; on Q/K weights when they are the set). 0 (the default)
            leaves the step exactly as without it.
        truncate_at: ``"step"`` (default: truncation at the optimizer step, fused; what
            ran between ``backward()`` and ``step()``, gradient clipping say, saw the
            untruncated gradient) or ``"backward"`` (gradient hooks: truncated before
            clipping, accumulation and unscaling, bit for bit as ``p.register_hook``).
            docs/method.md, "Truncation", says when to pick which.

    The optimizer holds the truncation (and the ``every=`` hook) for as long as it
    lives, until :meth:`close`, whether or not the search is kept in a variable. A
    search does not pickle: save :meth:`state_dict` instead.
    """

    def __init__(self, model: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None,
                 mode: str = "worm", layers="bn", prune_ratio: float = 0.5, window: int = 5,
                 stop=0.1, delta=None, r: float = 3e-3, scope: str = "global",
                 every: Optional[int] = None, l1: float = 0.0, truncate_at: str = "step"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if truncate_at not in WHERE:
            raise ValueError(f"truncate_at must be one of {WHERE}, got {truncate_at!r}")
        # Every argument is checked here, before anything is built or hooked.
        window = _positive_int("window", window, 2, "distances need an older mask")
        stop = check_stop(stop)
        delta = check_delta(delta, stop)
        l1 = _finite("l1", l1, 0.0, lo_ok=True)
        if every is not None:
            every = _positive_int("every", every, 1, "optimizer steps between samples; None: call step()")
        ratios = check_ratios(prune_ratio, parse_kinds(layers))  # {kind: p} of structured sets
        if ratios is None and not is_number(prune_ratio):
            raise TypeError(f"prune_ratio must be a number, got {type(prune_ratio).__name__}")
        prune_ratio = prune_ratio if ratios is not None else float(prune_ratio)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.prune_ratio = ratios if ratios is not None else _ref.check_ratio(prune_ratio)
        self.mode, self.stop, self.delta = mode, stop, delta
        self.r = _check_worm_r(r)
        self.l1 = l1
        self.scope, self.every, self.truncate_at = scope, every, truncate_at
        self.model, self.optimizer = model, optimizer
        self._layers_spec = layers if isinstance(layers, str) else \
            ("+".join(layers) if parse_kinds(layers) else "callable" if callable(layers) else "list")

        self.reps = select(model, layers, scope)
        for rep in self.reps:
            if rep.param.dtype not in SCORED_DTYPES or rep.param.is_sparse:
                raise TypeError(f"representative tensor {rep.name} is {rep.param.dtype}"
                                f"{' sparse' if rep.param.is_sparse else ''}; masks rank dense "
                                "fp32/bf16/fp16/fp64 tensors (pass other tensors in layers=)")
        self.params = [rep.param for rep in self.reps]
        numels = [rep.numel for rep in self.reps]
        self.numel = sum(numels)
        self._op_scope = scope
        if is_structured(self.reps):  # kinds never share a ranking (worm.heads)
            if l1:
                raise ValueError("l1 > 0 penalises representative weights; structured sets "
                                 "(layers='heads'/'ffn') rank derived scores: use l1=0")
            self._ks, self._op_scope = structured_ks(self.reps, self.prune_ratio), "layer"
        elif scope == "global":
            self._ks = [_ref.num_pruned(self.numel, self.prune_ratio)]
        else:
            self._ks = [_ref.num_pruned(n, self.prune_ratio) for n in numels]
        self.device = self.reps[0].param.device
        # FSDP2-sharded sets get a window over their local shards (worm.distributed)
        self._window = _dist.sharded_window(self.reps, window) or MaskWindow(self.reps, window, self.device)
        _dist.bind(self)  # parameter identity checks; a sharded window agrees on the search state
        self.window = self._window.length
        self._steps = UpdatedSteps(self.params, every or 1)
        self._closed = False
        self._trace = Trace()  # what stop/delta="auto" read of the history
        self.found = False
        self.truncating = False
        self.history: list = []

        self._truncation = None
        self._hooks = []
        if mode != "eb" or l1:
            if optimizer is None:
                why = f"mode={mode!r} truncates gradients" if mode != "eb" else "l1 > 0 penalises gradients"
                raise ValueError(f"{why} and needs the optimizer")
            self._check_optimizer_holds_params(optimizer)
            if l1 and any(g.get("maximize") for g in optimizer.param_groups):
                raise ValueError("l1 > 0 with maximize=True: the slimming penalty is defined for "
                                 "minimisation; negate the loss instead")
        if every is not None and optimizer is None:
            raise ValueError("every= counts optimizer steps and needs the optimizer")
        if mode != "eb":
            # One owner per parameter: a second search on these params is refused here.
            names = ", ".join(rep.name for rep in self.reps[:3]) + (", ..." if len(self.reps) > 3 else "")
            self._truncation = GradTruncation(optimizer, at=truncate_at,
                                              name=f"an EarlyBird search (mode={mode!r}, tensors {names})")
            self._hooks.append(self._truncation)
        try:
            if self._truncation is not None:
                self._truncation.claim([p for rep in self.reps for p in [rep.param, *rep.covers]])
            if l1:
                self._penalty = self._truncation or GradTruncation(
                    optimizer, name=f"an EarlyBird search's l1 penalty (mode='eb', tensors {self.reps[0].name}, ...)")
                if self._truncation is None:
                    self._hooks.append(self._penalty)
                self._penalty.set_l1(self._l1_where(), l1)
        except BaseException:  # refused: leave the optimizer as it was
            for h in self._hooks:
                h.remove()
            raise
        if every is not None:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    # ----------------------------------------------------------------- helpers
    def _check_optimizer_holds_params(self, optimizer) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for rep in self.reps:
            for p in [rep.param, *rep.covers]:
                if id(p) not in held:
                    raise ValueError(f"representative parameter {rep.name} is not in the optimizer, "
                                     "so its gradients cannot be truncated")

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._steps.after_step(optimizer) and not self.found:
            self._sample()

    def _l1_where(self) -> dict:
        """{param: None (all entries) or bool mask}: the representative entries."""
        where: dict = {}
        for rep in self.reps:
            if rep.index is None:
                where[rep.param] = None
            else:  # a slice of a packed Q/K/V weight: only its entries
                m = where.get(rep.param)
                m = torch.zeros_like(rep.param, dtype=torch.bool) if m is None else m
                m[rep.index] = True
                where[rep.param] = m
        return where

    def _apply_truncation(self, on: bool) -> None:
        if self._truncation is None:  # mode "eb", or closed
            return
        self._truncation.set_bits(self._window.truncation_bits() if on else None, self.r)

    # ----------------------------------------------------------------- the step
    def step(self) -> Record:
        """Sample a mask, push it into the window, and decide (docs/method.md, steps 1-3).

        With ``every=`` the search samples by itself after every ``every``-th optimizer
        step, so calling this as well would push a second mask of the same weights
        (distance 0) and fake a ticket: it raises instead.
        """
        self._refuse_closed()
        if self.every is not None:
            raise RuntimeError(
                f"this search samples by itself every {self.every} optimizer steps (every="
                f"{self.every}); do not call step() as well. Read search.found and "
                "search.history[-1], or build the search with every=None to sample at your "
                "own points")
        return self._sample()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this search was closed: it samples and truncates no more (its "
                               "results, search.ticket and search.history, stay readable); build a "
                               "new EarlyBird to search again")

    @torch.no_grad()
    def _sample(self) -> Record:
        if self.found:
            return self.history[-1]
        t0 = time.perf_counter()
        _dist.before_sample(self)  # still the model's parameters? (sharded: inside the step)
        w = self._window
        head, count = w.count % w.length, w.count
        saved = w.ring[head].clone()  # a failed step leaves the window as it was
        try:
            dists = w.distances(w.push(self._ks, self._op_scope))
            _dist.check_replicated_window(w)  # DDP, debug only: do the ranks agree?
            trace = self._trace.push(dists, w.numel)
            found, truncating = decide(dists, mode=self.mode, stop=self.stop,
                                       delta=self.delta, truncating=self.truncating,
                                       numel=w.numel, trace=trace, prune_ratio=self.prune_ratio)
            self._apply_truncation(truncating)
        except BaseException:
            w.ring[head].copy_(saved)
            w.count = count
            raise
        self.found, self.truncating, self._trace = found, truncating, trace
        d_max, d_avg = summarize(dists) if dists is not None else (None, None)
        pruned = self._pruned_share()

        rec = Record(index=self._window.count,
                     epoch=self._window.count if self.every is None else None,
                     step=self._steps.count if self.every is not None else None,
                     d_max=d_max, d_avg=d_avg, distances=dists, truncating=self.truncating,
                     found=self.found, seconds=time.perf_counter() - t0, pruned=pruned)
        self.history.append(rec)
        return rec

    def _pruned_share(self) -> float:
        """The newest mask's pruned share; warns when ties push it more than a point past
        prune_ratio (a stray tie among trained weights is recorded, not warned about)."""
        pruned = self.numel - int(self._window.kept_count().item())
        asked = sum(self._ks)
        if pruned - asked > 0.01 * self.numel:
            warnings.warn(
                f"the mask prunes {pruned} of {self.numel} representative entries "
                f"({pruned / self.numel:.1%}), more than prune_ratio={self.prune_ratio} asks "
                f"({asked}): {pruned - asked} entries tie with the threshold, and ties are pruned "
                "(docs/method.md). Equal weights (a mask taken at initialisation, frozen "
                "BatchNorms) prune them all; Record.pruned shows the realised share",
                RuntimeWarning, stacklevel=5)  # the caller of step()
        return pruned / self.numel

    # ---------------------------------------------------------------- results
    @property
    def mask(self) -> Optional[Ticket]:
        """The newest sampled mask as a :class:`worm.Ticket` ``{parameter name: bool keep}``
        with its provenance (None before the first sample)."""
        if self._window.count == 0:
            return None
        rec = self.history[-1] if self.history else None
        spec = self._layers_spec
        return from_reps(self._window.masks(), self.reps, self.model,
                         kind="channels" if spec in ("bn", "norm") else
                         "structures" if is_structured(self.reps) else None,
                         prune_ratio=self.prune_ratio, scope=self.scope, layers=spec,
                         found=self.found, **{k: getattr(rec, k, None) for k in
                                              ("index", "epoch", "step", "d_max", "d_avg")})

    @property
    def ticket(self) -> Optional[Ticket]:
        """The ticket (the newest mask, a :class:`worm.Ticket`) once found, else None.

        On an FSDP2-sharded set the masks are DTensors placed like their parameters;
        ``search.ticket.full()`` (or ``worm.distributed.full_masks``) gathers them.
        """
        return self.mask if self.found else None

    @property
    def packed_mask(self) -> Optional[torch.Tensor]:
        """The newest mask in the packed layout of :mod:`worm.packing` (a copy)."""
        w = self._window
        return None if w.count == 0 else w.ring[w.newest_row()].clone()

    def close(self) -> None:
        """End the search: truncation off, the l1 penalty and every hook removed, its
        parameters free for another search. Later :meth:`step` calls raise; the results
        (:attr:`ticket`, :attr:`history`) stay readable."""
        for h in self._hooks:
            h.remove()  # the handle's remove() also frees the params and ends the l1 penalty
        self._hooks = []
        self._truncation = None
        self.truncating = False
        self._closed = True

    def __getstate__(self):
        raise TypeError("an EarlyBird search does not pickle or deepcopy (it hooks into the "
                        "optimizer): save search.state_dict() and, in the new process, build the "
                        "search again and call load_state_dict()")

    # ------------------------------------------------------------- state dict
    def _config(self) -> dict:
        return {"mode": self.mode, "prune_ratio": self.prune_ratio, "window": self.window,
                "stop": self.stop, "delta": self.delta, "r": self.r, "l1": self.l1, "scope": self.scope,
                "every": self.every, "numel": self.numel, "names": [rep.name for rep in self.reps],
                "shapes": [list(rep.shape) for rep in self.reps]}

    def state_dict(self) -> dict:
        # text: torch.distributed.checkpoint wants a fixed key set in every layout
        history = json.dumps([asdict(h) for h in self.history])
        return {"version": 1, "config": self._config(), **self._window.state(),
                "opt_steps": self._steps.settle(), "found": self.found,
                "truncating": self.truncating, "history": history}

    def load_state_dict(self, sd: dict) -> None:
        """Resume a search from :meth:`state_dict`. The state must come from a search
        built with the same arguments: a differing mode, p, window, scope, every, l1,
        stop, delta or r is refused (the constructor's values are never silently
        replaced), as is a corrupt window count; a refusal changes nothing."""
        self._refuse_closed()
        mine = self._config()
        theirs = sd.get("config", {})
        # Everything is checked and parsed before anything changes.
        theirs = {"l1": 0.0, **theirs}  # states saved before l1 existed had none
        stop = check_stop(theirs.get("stop"))
        delta = check_delta(theirs.get("delta"), stop)
        r = _check_worm_r(theirs.get("r"))
        # stop/delta/r too: the constructor's values are the caller's intent, a saved
        # state that differs is refused rather than silently replacing them
        for key in ("mode", "prune_ratio", "window", "scope", "every", "l1", "stop", "delta", "r"):
            if theirs.get(key) != mine[key]:
                raise ValueError(f"cannot load search state: {key} is {theirs.get(key)!r} in the "
                                 f"state dict but {mine[key]!r} here; build the search with "
                                 f"{key}={theirs.get(key)!r} to resume that run")
        shapes = theirs.get("shapes")  # absent in states saved before shapes were recorded
        if shapes is not None and len(shapes) != len(self.reps):
            raise ValueError(f"cannot load search state: it holds {len(shapes)} representative tensors, "
                             f"this search {len(self.reps)} (state from another model?)")
        for i, rep in enumerate(self.reps):
            if shapes is not None and list(shapes[i]) != list(rep.shape):
                theirs_name = (theirs.get("names") or [None] * len(shapes))[i]
                raise ValueError(f"cannot load search state: representative tensor {i} ({rep.name}) has "
                                 f"shape {tuple(rep.shape)} here but {tuple(shapes[i])} in the state dict"
                                 f"{f' ({theirs_name})' if theirs_name and theirs_name != rep.name else ''}; "
                                 "state from another model?")
        if theirs.get("numel") != mine["numel"]:
            raise ValueError(f"cannot load search state: numel is {theirs.get('numel')!r} in the "
                             f"state dict but {mine['numel']!r} here")
        history = sd["history"]
        history = [Record(**h) for h in (json.loads(history) if isinstance(history, str) else history)]
        count, opt_steps = sd["count"], sd["opt_steps"]
        for name, v in (("count", count), ("opt_steps", opt_steps)):
            if not is_number(v) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"cannot load search state: {name} must be an integer >= 0, got {v!r}")
        if count != len(history) or (history and history[-1].index != count):
            raise ValueError(f"cannot load search state: count {count!r} does not match its history "
                             f"of {len(history)} sampling steps (a corrupt or edited state dict)")
        trace = Trace.replay([h.distances for h in history], self.numel)
        opt_steps, found, truncating = int(opt_steps), bool(sd["found"]), bool(sd["truncating"])
        w = self._window
        old_ring, old_count, old_r = w.ring.clone(), w.count, self.r
        w.load(sd["ring"], sd["count"], saved=sd.get("layout", "an older worm"))  # checks first
        self.r = r
        try:
            self._apply_truncation(truncating and w.count > 0)
        except BaseException:
            w.ring.copy_(old_ring)
            w.count, self.r = old_count, old_r
            raise
        self.stop, self.delta = stop, delta
        self._steps.settle()
        self._steps.count, self.found, self.truncating = opt_steps, found, truncating
        self.history, self._trace = history, trace
