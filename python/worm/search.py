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
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import distributed as _dist
from . import reference as _ref
from .decision import MODES, decide, summarize
from .layers import select
from .optim import GradTruncation, WormSGD
from .window import MaskWindow

__all__ = ["EarlyBird", "Record"]


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


class EarlyBird:
    """Early-Bird ticket search; ``mode="worm"`` adds WORM's gradient truncation.

    Args:
        model: the network (needed for ``layers="bn"``/``"qk"``; may be None with a list).
        optimizer: a :class:`worm.WormSGD` (truncation fused into its step), any other
            ``torch.optim.Optimizer`` (truncation by a step pre-hook), or None for
            ``mode="eb"``.
        mode: ``"worm"``, ``"eb"`` (never truncate) or ``"truncate"`` (from the first step).
        layers: ``"bn"``, ``"qk"``, a callable ``model -> tensors`` or a list of tensors.
        prune_ratio, window, stop, delta, r, scope: docs/method.md's p, l, s, delta, r, scope.
        every: sample automatically every ``every`` optimizer steps (a step post-hook);
            None: the caller calls :meth:`step` at each sampling point.
    """

    def __init__(self, model: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None,
                 mode: str = "worm", layers="bn", prune_ratio: float = 0.5, window: int = 5,
                 stop: float = 0.1, delta: float = 0.05, r: float = 3e-3, scope: str = "global",
                 every: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if not (stop > 0):
            raise ValueError(f"stop (s) must be > 0, got {stop!r}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        if every is not None and (int(every) != every or every < 1):
            raise ValueError(f"every must be a positive number of optimizer steps or None, got {every!r}")
        self.prune_ratio = _ref.check_ratio(prune_ratio)
        self.mode, self.stop, self.delta = mode, float(stop), float(delta)
        self.r = float(r)
        self.scope, self.every = scope, every
        self.model, self.optimizer = model, optimizer

        self.reps = select(model, layers)
        self.params = [rep.param for rep in self.reps]
        numels = [rep.numel for rep in self.reps]
        self.numel = sum(numels)
        if scope == "global":
            self._ks = [_ref.num_pruned(self.numel, self.prune_ratio)]
        else:
            self._ks = [_ref.num_pruned(n, self.prune_ratio) for n in numels]
        self.device = self.reps[0].param.device
        # FSDP2-sharded sets get a window over their local shards (worm.distributed)
        self._window = _dist.sharded_window(self.reps, window) or MaskWindow(self.reps, window, self.device)
        self.window = self._window.length
        self._opt_steps = 0
        self.found = False
        self.truncating = False
        self.history: list = []

        self._truncation = None
        self._hooks = []
        if mode != "eb":
            if optimizer is None:
                raise ValueError(f"mode={mode!r} truncates gradients and needs the optimizer")
            self._check_optimizer_holds_params(optimizer)
            if not isinstance(optimizer, WormSGD):
                self._truncation = GradTruncation(optimizer)
                self._hooks.append(self._truncation)
        if every is not None:
            if optimizer is None:
                raise ValueError("every= counts optimizer steps and needs the optimizer")
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
        self._opt_steps += 1
        if not self.found and self._opt_steps % self.every == 0:
            self.step()

    def _apply_truncation(self, on: bool) -> None:
        if self.mode == "eb" or self.optimizer is None:
            return
        bits = self._window.truncation_bits() if on else None
        if isinstance(self.optimizer, WormSGD):
            self.optimizer.set_truncation_bits(bits, self.r)
        else:
            self._truncation.set_bits(bits, self.r)

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> Record:
        """Sample a mask, push it into the window, and decide (docs/method.md, steps 1-3)."""
        if self.found:
            return self.history[-1]
        t0 = time.perf_counter()
        dists = self._window.distances(self._window.push(self._ks, self.scope))
        _dist.check_replicated_window(self._window)  # DDP, debug only: do the ranks agree?
        self.found, self.truncating = decide(dists, mode=self.mode, stop=self.stop,
                                             delta=self.delta, truncating=self.truncating)
        self._apply_truncation(self.truncating)
        d_max, d_avg = summarize(dists) if dists is not None else (None, None)

        rec = Record(index=self._window.count,
                     epoch=self._window.count if self.every is None else None,
                     step=self._opt_steps if self.every is not None else None,
                     d_max=d_max, d_avg=d_avg, distances=dists, truncating=self.truncating,
                     found=self.found, seconds=time.perf_counter() - t0)
        self.history.append(rec)
        return rec

    # ---------------------------------------------------------------- results
    @property
    def mask(self) -> Optional[dict]:
        """The newest sampled mask, ``{param: bool keep mask}`` (None before the first)."""
        return None if self._window.count == 0 else self._window.masks()

    @property
    def ticket(self) -> Optional[dict]:
        """The ticket (the newest mask) once found, else None.

        On an FSDP2-sharded set the masks are DTensors placed like their parameters;
        ``worm.distributed.full_masks(search.ticket)`` gathers full tensors.
        """
        return self.mask if self.found else None

    @property
    def packed_mask(self) -> Optional[torch.Tensor]:
        """The newest mask in the packed layout of :mod:`worm.packing` (a copy)."""
        w = self._window
        return None if w.count == 0 else w.ring[w.newest_row()].clone()

    def close(self) -> None:
        """Switch truncation off and remove the hooks this search registered."""
        if self.truncating:
            self._apply_truncation(False)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------- state dict
    def _config(self) -> dict:
        return {"mode": self.mode, "prune_ratio": self.prune_ratio, "window": self.window,
                "stop": self.stop, "delta": self.delta, "r": self.r, "scope": self.scope,
                "every": self.every, "numel": self.numel, "names": [rep.name for rep in self.reps]}

    def state_dict(self) -> dict:
        history = [asdict(h) for h in self.history]
        if isinstance(self._window, _dist.ShardedMaskWindow):
            # torch.distributed.checkpoint wants a fixed key set: a growing list goes as text
            history = json.dumps(history)
        return {"version": 1, "config": self._config(), **self._window.state(),
                "opt_steps": self._opt_steps, "found": self.found,
                "truncating": self.truncating, "history": history}

    def load_state_dict(self, sd: dict) -> None:
        mine = self._config()
        theirs = sd.get("config", {})
        for key in ("mode", "prune_ratio", "window", "scope", "numel", "every"):
            if theirs.get(key) != mine[key]:
                raise ValueError(f"cannot load search state: {key} is {theirs.get(key)!r} in the "
                                 f"state dict but {mine[key]!r} here")
        self._window.load(sd["ring"], sd["count"])
        self.stop, self.delta, self.r = theirs["stop"], theirs["delta"], theirs["r"]
        self._opt_steps = int(sd["opt_steps"])
        self.found, self.truncating = bool(sd["found"]), bool(sd["truncating"])
        history = sd["history"]
        self.history = [Record(**h) for h in (json.loads(history) if isinstance(history, str) else history)]
        self._apply_truncation(self.truncating and self._window.count > 0)
