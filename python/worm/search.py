"""The Early-Bird / WORM ticket search (METHOD.md, "The search").

Three lines in a user's loop::

    search = worm.EarlyBird(model, optimizer, mode="worm")
    ...                              # train one epoch
    if search.step().found: break    # at each sampling point

Masks live bit-packed in a ring buffer of the last ``window`` masks (``window x N/8``
bytes); each sampling step is one threshold selection and one fused mask-update pass
on whatever backend runs for the parameters' device (see :mod:`worm._ops`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import _ops
from . import distributed as _dist
from . import reference as _ref
from .layers import select
from .optim import GradTruncation, WormSGD

__all__ = ["EarlyBird", "Record"]

MODES = ("worm", "eb", "truncate")


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
        prune_ratio, window, stop, delta, r, scope: METHOD.md's p, l, s, delta, r, scope.
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
        if int(window) != window or window < 2:
            raise ValueError(f"window must be an integer >= 2 (distances need an older mask), got {window!r}")
        if not (stop > 0):
            raise ValueError(f"stop (s) must be > 0, got {stop!r}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        if every is not None and (int(every) != every or every < 1):
            raise ValueError(f"every must be a positive number of optimizer steps or None, got {every!r}")
        self.prune_ratio = _ref.check_ratio(prune_ratio)
        self.mode, self.window, self.stop, self.delta = mode, int(window), float(stop), float(delta)
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
        self._offsets = _ref.byte_offsets(numels)
        self.device = self.reps[0].param.device
        # Sharded (FSDP2) sets keep a ring over their local shards; see worm.distributed.
        self._shards = _dist.plan(self.reps)
        if self._shards is not None:
            self._ring = self._shards.new_ring(self.window)
        else:
            self._ring = torch.zeros(self.window, self._offsets[-1], dtype=torch.uint8, device=self.device)
        self._count = 0          # masks pushed so far
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

    def _newest_row(self) -> int:
        return (self._count - 1) % self.window

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._opt_steps += 1
        if not self.found and self._opt_steps % self.every == 0:
            self.step()

    def _segment(self, row: int, i: int) -> torch.Tensor:
        return self._ring[row, self._offsets[i]:self._offsets[i + 1]]

    def _masks_of_row(self, row: int) -> dict:
        """{param: full-shape bool keep mask} for a ring row."""
        if self._shards is not None:
            return self._shards.masks_of_row(self._ring, row)
        out: dict = {}
        for i, rep in enumerate(self.reps):
            keep = _ref.unpack(self._segment(row, i).contiguous(), [rep.shape])[0]
            out[rep.param] = rep.full_mask(keep, out.get(rep.param))
        return out

    def _truncation_bits(self, row: int) -> dict:
        """{param: packed keep bits} for the newest mask; BN biases share their gamma's."""
        if self._shards is not None:
            return self._shards.truncation_bits(self._ring, row)
        bits: dict = {}
        sliced = []
        for i, rep in enumerate(self.reps):
            if rep.index is None and rep.param.is_contiguous():
                seg = self._segment(row, i).clone()
                for p in [rep.param, *rep.covers]:
                    bits[p] = seg
            else:
                sliced.append(rep.param)
        if sliced:  # packed Q/K/V weights: slices placed in a full mask (V stays kept)
            full = self._masks_of_row(row)
            for p in sliced:
                bits[p] = _ref.pack([full[p]])
        return bits

    def _apply_truncation(self, on: bool) -> None:
        if self.mode == "eb" or self.optimizer is None:
            return
        bits = self._truncation_bits(self._newest_row()) if on else None
        if isinstance(self.optimizer, WormSGD):
            self.optimizer.set_truncation_bits(bits, self.r)
        else:
            self._truncation.set_bits(bits, self.r)

    def _sample_here(self, head: int) -> torch.Tensor:
        """Sample on this process's full tensors (also each DDP replica's, no communication)."""
        tensors = [rep.contiguous_values() for rep in self.reps]
        be = _ops.resolve(self.device)
        thr, nonfinite = be.select_thresholds(tensors, self._ks, self.scope)
        bad = torch.nonzero(nonfinite).flatten().tolist()  # one sync: errors must name the tensor
        if bad:
            names = ", ".join(self.reps[i].name for i in bad)
            raise ValueError(f"NaN or Inf in representative tensor(s) {names}: "
                             "a mask cannot be taken from non-finite weights")
        counts = be.mask_update_(tensors, thr, self._ring, head)
        _dist.check_replicated_sample(self._ring[head], thr)
        return counts

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> Record:
        """Sample a mask, push it into the window, and decide (METHOD.md steps 2-3)."""
        if self.found:
            return self.history[-1]
        t0 = time.perf_counter()
        head = self._count % self.window
        if self._shards is not None:
            counts = self._shards.sample(self._ring, head, self._ks, self.scope)
        else:
            counts = self._sample_here(head)
        self._count += 1

        d_max = d_avg = dists = None
        if self._count >= self.window:
            older = [(head + j) % self.window for j in range(1, self.window)]  # oldest first
            c = counts.tolist()
            dists = [c[j] / self.numel for j in older]
            d_max, d_avg = max(dists), sum(dists) / len(dists)
            if d_max < self.stop:
                self.found = True
            elif self.mode == "worm" and d_avg < self.stop + self.delta:
                self.truncating = True
        if self.mode == "truncate":
            self.truncating = True
        if self.found:
            self.truncating = False
        self._apply_truncation(self.truncating)

        rec = Record(index=self._count,
                     epoch=self._count if self.every is None else None,
                     step=self._opt_steps if self.every is not None else None,
                     d_max=d_max, d_avg=d_avg, distances=dists, truncating=self.truncating,
                     found=self.found, seconds=time.perf_counter() - t0)
        self.history.append(rec)
        return rec

    # ---------------------------------------------------------------- results
    @property
    def mask(self) -> Optional[dict]:
        """The newest sampled mask, ``{param: bool keep mask}`` (None before the first)."""
        if self._count == 0:
            return None
        return self._masks_of_row(self._newest_row())

    @property
    def ticket(self) -> Optional[dict]:
        """The ticket (the newest mask) once found, else None.

        On a sharded (FSDP2) set the masks are DTensors placed like their parameters;
        ``worm.distributed.full_masks(search.ticket)`` gathers full tensors.
        """
        return self.mask if self.found else None

    @property
    def packed_mask(self) -> Optional[torch.Tensor]:
        """The newest mask in the packed layout of :mod:`worm.reference` (a copy; of the
        local shards' entries on a sharded set)."""
        return None if self._count == 0 else self._ring[self._newest_row()].clone()

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
        if self._shards is not None:  # DTensors: save with torch.distributed.checkpoint,
            # which wants a fixed key set: the history (a growing list) goes as one JSON text
            window = {"windows": self._shards.window_state(self._ring),
                      "history": json.dumps([asdict(h) for h in self.history])}
        else:
            window = {"ring": self._ring.clone().cpu()}
        return {"version": 1, "config": self._config(),
                "count": self._count, "opt_steps": self._opt_steps, "found": self.found,
                "truncating": self.truncating, "history": [asdict(h) for h in self.history], **window}

    def load_state_dict(self, sd: dict) -> None:
        mine = self._config()
        theirs = sd.get("config", {})
        for key in ("mode", "prune_ratio", "window", "scope", "numel", "every"):
            if theirs.get(key) != mine[key]:
                raise ValueError(f"cannot load search state: {key} is {theirs.get(key)!r} in the "
                                 f"state dict but {mine[key]!r} here")
        if self._shards is not None:
            self._shards.load_window_state(self._ring, sd["windows"])
            ring = self._ring
        else:
            ring = sd["ring"]
        if ring.shape != self._ring.shape or ring.dtype != torch.uint8:
            raise ValueError(f"cannot load search state: window buffer {tuple(ring.shape)} "
                             f"{ring.dtype}, expected {tuple(self._ring.shape)} uint8")
        self.stop, self.delta, self.r = theirs["stop"], theirs["delta"], theirs["r"]
        self._ring.copy_(ring)
        self._count, self._opt_steps = int(sd["count"]), int(sd["opt_steps"])
        self.found, self.truncating = bool(sd["found"]), bool(sd["truncating"])
        hist = sd["history"]
        self.history = [Record(**h) for h in (json.loads(hist) if isinstance(hist, str) else hist)]
        self._apply_truncation(self.truncating and self._count > 0)
