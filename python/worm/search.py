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

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import _ops
from . import reference as _ref
from .layers import select
from .ops import MAX_WINDOW
from .optim import GradTruncation, _check_r

__all__ = ["EarlyBird", "Record"]

MODES = ("worm", "eb", "truncate")
# float64 is ranked by its fp32 score, the reference's |w| in fp32.
_SCORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Rows per mask_update_ call: the op counts at most MAX_WINDOW rows at once (Triton).
_ROWS_PER_CALL = MAX_WINDOW


def _finite(name: str, v, lo: float, lo_ok: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < lo or (v == lo and not lo_ok):
        raise ValueError(f"{name} must be a finite number {'>=' if lo_ok else '>'} {lo}, got {v!r}")
    return v


def _positive_int(name: str, v, least: int, why: str):
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{name} must be an integer >= {least} ({why}), got {v!r}")
    return v


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
        # Every argument is checked here, before anything is built or hooked.
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        window = _positive_int("window", window, 2, "distances need an older mask")
        stop = _finite("stop (s)", stop, 0.0, lo_ok=False)
        delta = _finite("delta", delta, 0.0, lo_ok=True)
        if every is not None:
            every = _positive_int("every", every, 1, "optimizer steps between samples; None: call step()")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
            raise TypeError(f"prune_ratio must be a number, got {type(prune_ratio).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.prune_ratio = _ref.check_ratio(prune_ratio)
        self.mode, self.window, self.stop, self.delta = mode, window, stop, delta
        self.r = _check_r(r)
        self.scope, self.every = scope, every
        self.model, self.optimizer = model, optimizer

        self.reps = select(model, layers)
        for rep in self.reps:
            if rep.param.dtype not in _SCORED_DTYPES or rep.param.is_sparse:
                raise TypeError(f"representative tensor {rep.name} is {rep.param.dtype}"
                                f"{' sparse' if rep.param.is_sparse else ''}; masks rank dense "
                                "fp32/bf16/fp16/fp64 tensors (pass other tensors in layers=)")
        self.params = [rep.param for rep in self.reps]
        numels = [rep.numel for rep in self.reps]
        self.numel = sum(numels)
        if scope == "global":
            self._ks = [_ref.num_pruned(self.numel, self.prune_ratio)]
        else:
            self._ks = [_ref.num_pruned(n, self.prune_ratio) for n in numels]
        self._offsets = _ref.byte_offsets(numels)
        self.device = self.reps[0].param.device
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
        if every is not None and optimizer is None:
            raise ValueError("every= counts optimizer steps and needs the optimizer")
        if mode != "eb":
            # One owner per parameter: a second search on these params is refused here.
            names = ", ".join(rep.name for rep in self.reps[:3]) + (", ..." if len(self.reps) > 3 else "")
            self._truncation = GradTruncation(optimizer, owner=self,
                                              name=f"an EarlyBird search (mode={mode!r}, tensors {names})")
            try:
                self._truncation.claim([p for rep in self.reps for p in [rep.param, *rep.covers]])
            except ValueError:
                self._truncation.remove()
                raise
            self._hooks.append(self._truncation)
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
        out: dict = {}
        for i, rep in enumerate(self.reps):
            keep = _ref.unpack(self._segment(row, i).contiguous(), [rep.shape])[0]
            out[rep.param] = rep.full_mask(keep, out.get(rep.param))
        return out

    def _truncation_bits(self, row: int) -> dict:
        """{param: packed keep bits} for the newest mask; BN biases share their gamma's."""
        bits: dict = {}
        sliced = []
        for i, rep in enumerate(self.reps):
            if rep.index is None:  # segments are in logical (row-major) order, any layout
                seg = self._segment(row, i).clone()
                for p in [rep.param, *rep.covers]:
                    bits[p] = seg
            else:
                sliced.append(rep)
        if sliced:  # packed Q/K/V weights: slices placed in a full mask (V stays kept)
            full = self._masks_of_row(row)
            for rep in sliced:
                if rep.param not in bits:
                    bits[rep.param] = _ref.pack([full[rep.param]])
        return bits

    def _apply_truncation(self, on: bool, row: Optional[int] = None) -> None:
        if self._truncation is None:  # mode "eb", or closed
            return
        bits = self._truncation_bits(self._newest_row() if row is None else row) if on else None
        self._truncation.set_bits(bits, self.r)

    def _mask_update(self, be, tensors, thr, head: int) -> torch.Tensor:
        """mask_update_ over the whole window, in calls of at most _ROWS_PER_CALL rows."""
        if self.window <= _ROWS_PER_CALL:
            return be.mask_update_(tensors, thr, self._ring, head)
        parts = []
        for lo in range(0, self.window, _ROWS_PER_CALL):
            rows = self._ring[lo:lo + _ROWS_PER_CALL]  # a contiguous block of rows
            if lo <= head < lo + rows.shape[0]:
                parts.append(be.mask_update_(tensors, thr, rows, head - lo))
            else:  # counts only: the op writes its head row, put that row back
                keep = rows[0].clone()
                parts.append(be.mask_update_(tensors, thr, rows, 0))
                rows[0].copy_(keep)
        return torch.cat(parts)

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> Record:
        """Sample a mask, push it into the window, and decide (METHOD.md steps 2-3)."""
        if self.found:
            return self.history[-1]
        t0 = time.perf_counter()
        tensors = [rep.contiguous_values() for rep in self.reps]
        tensors = [t.float() if t.dtype == torch.float64 else t for t in tensors]
        be = _ops.resolve(self.device)
        thr, nonfinite = be.select_thresholds(tensors, self._ks, self.scope)
        bad = torch.nonzero(nonfinite).flatten().tolist()  # one sync: errors must name the tensor
        if bad:
            names = ", ".join(self.reps[i].name for i in bad)
            raise ValueError(f"NaN or Inf in representative tensor(s) {names}: "
                             "a mask cannot be taken from non-finite weights")
        head = self._count % self.window
        saved = self._ring[head].clone()  # a failed step leaves the window as it was
        try:
            counts = self._mask_update(be, tensors, thr, head)
            count, found, truncating = self._count + 1, self.found, self.truncating
            d_max = d_avg = dists = None
            if count >= self.window:
                older = [(head + j) % self.window for j in range(1, self.window)]  # oldest first
                c = counts.tolist()
                dists = [c[j] / self.numel for j in older]
                d_max, d_avg = max(dists), sum(dists) / len(dists)
                if d_max < self.stop:
                    found = True
                elif self.mode == "worm" and d_avg < self.stop + self.delta:
                    truncating = True
            if self.mode == "truncate":
                truncating = True
            if found:
                truncating = False
            self._apply_truncation(truncating, head)
        except BaseException:
            self._ring[head].copy_(saved)
            raise
        self._count, self.found, self.truncating = count, found, truncating

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
        """The ticket (the newest mask) once found, else None."""
        return self.mask if self.found else None

    @property
    def packed_mask(self) -> Optional[torch.Tensor]:
        """The newest mask in the packed layout of :mod:`worm.reference` (a copy)."""
        return None if self._count == 0 else self._ring[self._newest_row()].clone()

    def close(self) -> None:
        """Switch truncation off and remove the hooks this search registered."""
        if self.truncating:
            self._apply_truncation(False)
        for h in self._hooks:
            h.remove()  # the truncation handle's remove() also frees the params for another search
        self._hooks = []
        self._truncation = None

    # ------------------------------------------------------------- state dict
    def _config(self) -> dict:
        return {"mode": self.mode, "prune_ratio": self.prune_ratio, "window": self.window,
                "stop": self.stop, "delta": self.delta, "r": self.r, "scope": self.scope,
                "every": self.every, "numel": self.numel, "names": [rep.name for rep in self.reps],
                "shapes": [list(rep.shape) for rep in self.reps]}

    def state_dict(self) -> dict:
        return {"version": 1, "config": self._config(), "ring": self._ring.clone().cpu(),
                "count": self._count, "opt_steps": self._opt_steps, "found": self.found,
                "truncating": self.truncating, "history": [asdict(h) for h in self.history]}

    def load_state_dict(self, sd: dict) -> None:
        mine = self._config()
        theirs = sd.get("config", {})
        # Everything is checked and parsed before anything changes.
        for key in ("mode", "prune_ratio", "window", "scope", "every"):
            if theirs.get(key) != mine[key]:
                raise ValueError(f"cannot load search state: {key} is {theirs.get(key)!r} in the "
                                 f"state dict but {mine[key]!r} here")
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
        ring = sd["ring"]
        if ring.shape != self._ring.shape or ring.dtype != torch.uint8:
            raise ValueError(f"cannot load search state: window buffer {tuple(ring.shape)} "
                             f"{ring.dtype}, expected {tuple(self._ring.shape)} uint8")
        stop = _finite("stop (s)", theirs["stop"], 0.0, lo_ok=False)
        delta = _finite("delta", theirs["delta"], 0.0, lo_ok=True)
        r = _check_r(theirs["r"])
        history = [Record(**h) for h in sd["history"]]
        count, opt_steps = int(sd["count"]), int(sd["opt_steps"])
        found, truncating = bool(sd["found"]), bool(sd["truncating"])
        old_ring, old_r = self._ring.clone(), self.r
        self._ring.copy_(ring)
        self.r = r
        try:
            if truncating and count > 0:
                self._apply_truncation(True, (count - 1) % self.window)
            else:
                self._apply_truncation(False)
        except BaseException:
            self._ring.copy_(old_ring)
            self.r = old_r
            raise
        self.stop, self.delta = stop, delta
        self._count, self._opt_steps = count, opt_steps
        self.found, self.truncating = found, truncating
        self.history = history
