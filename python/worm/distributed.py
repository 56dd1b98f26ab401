"""The exact search over sharded (FSDP2) and replicated (DDP) parameters: the public face.

METHOD.md, "Sharded and replicated parameters". The pieces live in their own modules:

* :mod:`worm.sharded_window`: the window of a set whose tensors are DTensors sharded
  on dim 0 (``fully_shard``), one ring per rank over its local entries;
* :mod:`worm.shard_select`: one sampling step across ranks, on the local kernels of
  :mod:`worm.shard_ops` (C++ on CPU): the threshold is the k-th smallest ``|w|`` of the
  whole multiset, exactly, from small all-reduced histograms; no weight leaves its rank;
* :mod:`worm.collective`: every all-reduce of a step carries a failure flag and the
  values the ranks must agree on, so ranks fail together and never drift apart;
* :mod:`worm.window_state`: the saved window, the same in every layout, so a search
  resumes across world sizes and between one process, DDP and FSDP2.

Replicated parameters (DDP, plain tensors) need no communication at all: every rank
computes the same mask. With ``WORM_CHECK_REPLICAS=1`` (or ``check_replicas = True``
here) each sampling step checks that the ranks agree (a debug aid, it syncs).

:func:`save` and :func:`load` save and restore a search (plus anything else) with
``torch.distributed.checkpoint``, whose ``CheckpointException`` (a BaseException)
comes out as :class:`CheckpointError`, which ``except Exception`` catches.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import param_identity
from .collective import RankFailure
from .dtensor import is_dtensor, local, local_numel
from .dtensor import world as _replicated_world
from .shard_select import kth_smallest
from .sharded_window import ShardedMaskWindow, layout_name, shard_layout, sharded_window

__all__ = ["is_dtensor", "local", "local_numel", "sharded_window", "ShardedMaskWindow", "full_masks",
           "distribute_like", "check_replicated_window", "RankFailure", "CheckpointError",
           "check_replicas", "replicas_agree", "sgd_step_", "bind", "before_sample", "save", "load", "layout_of",
           "bytes_per_sample", "kth_smallest", "counter_dtype"]

# Debug: every sampling step on replicated (DDP) parameters checks the ranks agree.
check_replicas = os.environ.get("WORM_CHECK_REPLICAS", "") not in ("", "0")


def _dist():
    import torch.distributed as dist
    return dist


def counter_dtype(largest_selection: int) -> torch.dtype:
    """The histogram counters' dtype (kept for callers of the old radix select: int64)."""
    return torch.int64


def bytes_per_sample(numels, scope: str, window: int) -> int:
    """Bytes one rank all-reduces in a typical sampling step (two sampled level-one passes,
    level two, the commit) for tensors of ``numels``; small sets take exact passes instead."""
    S, T = (1, len(numels)) if scope == "global" else (len(numels), len(numels))
    bins = 2048 if S == 1 else 256
    head = 1 + 2 * (2 + T)  # failure flag, agreed values (window count, length, dtypes)
    slots = head + 2 * S * (bins + 2) + 2 + (2 * S + T + 1 + window + S * bins) + 1 + window
    return 8 * slots


def layout_of(window) -> str:
    """The layout a search's window lives in, in words (for errors naming two layouts)."""
    if isinstance(window, ShardedMaskWindow):
        return window.layout()
    w = _replicated_world()
    return "a one-process search" if w == 1 else f"a DDP (replicated) search on {w} ranks"


def bind(search) -> None:
    """Record which model parameters the search samples (:mod:`worm.param_identity`); let
    a sharded window check them, agree on the search's state each step and build the
    truncation bits before the step commits (so a failure there fails every rank alike)."""
    w = search._window
    recorded = param_identity.owners(search.model, search.reps)
    search._check_params = lambda: param_identity.check(search.model, search.reps, recorded)
    if isinstance(w, ShardedMaskWindow):
        w.precheck = search._check_params
        w.agree_on = lambda: [("the search's truncating flag", int(search.truncating)),
                              ("the search's found flag", int(search.found)),
                              ("the optimizer steps seen", _steps_seen(search))]
        w.prebuild_bits = search.mode != "eb"


def before_sample(search) -> None:
    """Raise if the search's tensors are no longer the model's parameters (a sharded
    window checks inside its first all-reduce, so all ranks raise together)."""
    if not isinstance(search._window, ShardedMaskWindow):
        search._check_params()


def _steps_seen(search) -> int:
    steps = getattr(search, "_steps", None)  # worm.step_counter.UpdatedSteps
    return int(steps.count) if steps is not None else int(getattr(search, "_opt_steps", 0))


class CheckpointError(RuntimeError):
    """torch.distributed.checkpoint failed (its CheckpointException is a BaseException)."""


def save(state: dict, checkpoint_id) -> None:
    """``torch.distributed.checkpoint.save(state, checkpoint_id=...)`` with its errors as
    :class:`CheckpointError`; ``state`` may hold ``search.state_dict()`` and anything else."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.save(state, checkpoint_id=checkpoint_id)
    except BaseException as e:  # noqa: BLE001 - CheckpointException is not an Exception
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"torch.distributed.checkpoint could not save to {checkpoint_id!r}: {e}") from e


def load(state: dict, checkpoint_id) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` in place, errors as
    :class:`CheckpointError`; then pass ``state[...]`` to ``search.load_state_dict``."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.load(state, checkpoint_id=checkpoint_id)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"torch.distributed.checkpoint could not load {checkpoint_id!r} "
                              f"(was it saved from the same model and search?): {e}") from e


def distribute_like(full: torch.Tensor, p) -> torch.Tensor:
    """``full`` (a tensor of ``p``'s full shape, the same on every rank) placed like DTensor ``p``.

    The local piece is cut, not communicated; for masks built by hand for
    ``WormSGD.set_truncation`` on FSDP2 parameters.
    """
    from torch.distributed.tensor import DTensor
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"distribute_like: shape {tuple(full.shape)} is not the parameter's {tuple(p.shape)}")
    _, _, (a, b) = shard_layout(p)
    return DTensor.from_local(full[a:b].to(local(p).device), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def full_masks(masks: Optional[dict]) -> Optional[dict]:
    """{param: full bool tensor} from masks in their parameters' placement (gathers)."""
    if masks is None:
        return None
    if hasattr(masks, "full"):  # a worm.Ticket
        return masks.full()
    return {p: (m.full_tensor() if is_dtensor(m) else m) for p, m in masks.items()}


# ------------------------------------------------------------ replicated (DDP)
def replicas_agree(row: torch.Tensor, thr: Optional[torch.Tensor] = None) -> bool:
    """True when every rank holds the same packed mask row (and thresholds)."""
    dist = _dist()
    if _replicated_world() == 1:
        return True
    parts = [row.reshape(-1).to(torch.int64)]
    if thr is not None:
        parts.append(thr.reshape(-1).float().view(torch.int32).to(torch.int64))
    mine = torch.cat(parts).cpu() if dist.get_backend() == "gloo" else torch.cat(parts)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def check_replicated_window(window) -> None:
    """Debug check (``check_replicas``): raise if the ranks' newest masks disagree.

    For replicated (DDP) parameters, whose search runs on each rank with no
    communication; a sharded window is exact by construction and is not checked.
    """
    if not check_replicas or isinstance(window, ShardedMaskWindow) or window.count == 0:
        return
    if not replicas_agree(window.ring[window.newest_row()]):
        raise RuntimeError("replicated parameters differ across ranks: the ranks sampled "
                           "different masks (are the parameters really replicated, as in DDP?)")


# ---------------------------------------------------------- optimizer helpers
def sgd_step_(op, params, grads, bufs, bits, **kw) -> list:
    """``op`` (a backend's ``sgd_step_``) on the local shards of DTensor params.

    Plain tensors go straight through. Empty shards skip the op (no entries) but get
    their empty momentum buffer as ``torch.optim.SGD`` would give them.
    """
    if not any(is_dtensor(p) for p in params):
        return op(params, grads, bufs, bits, **kw)
    from torch.distributed.tensor import DTensor
    out = list(bufs)
    here = [i for i, p in enumerate(params) if local_numel(p) > 0]
    if here:
        new = op([local(params[i]) for i in here], [local(grads[i]) for i in here],
                 [local(bufs[i]) if bufs[i] is not None else None for i in here],
                 [bits[i] for i in here], **kw)
        for i, b in zip(here, new):
            out[i] = b
    for i, p in enumerate(params):
        b = out[i]
        if kw.get("momentum", 0) != 0 and b is None:
            b = torch.clone(local(grads[i])).detach()
        if bufs[i] is not None:  # updated in place by contract; keep the caller's DTensor
            if b is not None and b is not bufs[i] and b is not local(bufs[i]):
                local(bufs[i]).copy_(b)
            b = bufs[i]
        elif b is not None and not is_dtensor(b):
            b = DTensor.from_local(b, p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        out[i] = b
    return out
