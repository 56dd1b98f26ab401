"""The search window's saved form, the same in every layout (one process, DDP, FSDP2).

``ring`` is ``{str(i): uint8 [l, rows, ceil(row / 8)]}``, one entry per parameter
holding representative entries (in the order they first appear), each row of the
parameter packed on its own (LSB first; entries outside a Q/K slice are kept). One
process and DDP save plain tensors; FSDP2 saves DTensors sharded on dim 1 like the
parameter's rows, which ``torch.distributed.checkpoint`` reshards to any world size.
So a state saved in one layout loads in any other. ``layout`` names the saver's.
States of older versions (one flat ``[l, B]`` ring, one process) still load.
"""
from __future__ import annotations

import torch

from .dtensor import is_dtensor, world
from .packing import pack, packed_nbytes, unpack

__all__ = ["row_layout", "pack_rows", "unpack_rows", "plain_state", "plain_ring", "full_value",
           "params_of", "plain_layout", "check_rows", "rows_from_flat"]

_W = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def row_layout(p) -> tuple:
    rows = p.shape[0] if p.dim() else 1
    return rows, (p.numel() // rows if rows else 0)


def pack_rows(mask: torch.Tensor, width: int) -> torch.Tensor:
    """bool [rows, ...] -> uint8 [rows, ceil(width/8)], each row packed LSB first."""
    rows = mask.shape[0] if mask.dim() else 1
    flat = mask.reshape(rows, width).to(torch.uint8)
    pad = packed_nbytes(width) * 8 - width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    return (flat.reshape(rows, packed_nbytes(width), 8) * _W.to(mask.device)).sum(dim=2, dtype=torch.uint8)


def unpack_rows(packed: torch.Tensor, width: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) & _W.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :width]


def plain_layout() -> str:
    w = world()
    return "a one-process search" if w == 1 else f"a DDP (replicated) search on {w} ranks"


def params_of(reps) -> list:
    return list(dict.fromkeys(r.param for r in reps))


def plain_state(window) -> dict:
    """The saved ``ring`` of a one-process (or DDP) :class:`worm.window.MaskWindow`."""
    params = params_of(window.reps)
    out = {str(i): [] for i in range(len(params))}
    for r in range(window.length):
        masks = window.masks(r)
        for i, p in enumerate(params):
            out[str(i)].append(pack_rows(masks[p].cpu(), row_layout(p)[1]))
    return {k: torch.stack(v) for k, v in out.items()}


def full_value(t, layout_here: str):
    """A plain tensor of a saved entry; a DTensor is gathered (it needs its process group)."""
    if not is_dtensor(t):
        return t
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"cannot load search state: it holds FSDP2 (sharded DTensor) windows and "
                         f"this search is {layout_here} without a process group; load the "
                         "checkpoint with torch.distributed.checkpoint (dcp.load fills this search's "
                         "plain state_dict) instead")
    return t.full_tensor()


def check_rows(state, params, length: int, saved: str, here: str) -> None:
    """Refuse (one error naming both layouts) a ``ring`` that does not fit these params."""
    keys = {str(i) for i in range(len(params))}
    if not isinstance(state, dict) or set(state) != keys:
        got = f"{len(state)} parameters" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"cannot load search state: saved by {saved} over {got}, this search is "
                         f"{here} over {len(params)} parameters (state from another model?)")
    for i, p in enumerate(params):
        t = state[str(i)]
        rows, width = row_layout(p)
        want = (length, rows, packed_nbytes(width))
        if tuple(t.shape) != want or t.dtype != torch.uint8:
            raise ValueError(f"cannot load search state: saved by {saved}, parameter {i}'s window is "
                             f"{t.dtype} {tuple(t.shape)}; this search ({here}) needs uint8 {want}")


def plain_ring(window, state, saved: str, here: str) -> torch.Tensor:
    """The flat ring ``[l, B]`` of a one-process window from a saved ``ring``."""
    params = params_of(window.reps)
    state = {k: full_value(v, here) for k, v in state.items()} if isinstance(state, dict) else state
    check_rows(state, params, window.length, saved, here)
    rows_out = []
    for r in range(window.length):
        masks = {p: unpack_rows(state[str(i)][r].cpu(), row_layout(p)[1]).reshape(p.shape)
                 for i, p in enumerate(params)}
        rows_out.append(pack([masks[rep.param] if rep.index is None else masks[rep.param][rep.index]
                              for rep in window.reps]))
    return torch.stack(rows_out)


def rows_from_flat(reps, flat: torch.Tensor) -> dict:
    """An old one-process flat ring [l, B] of ``reps`` as a saved ``ring`` (full rows)."""
    params = params_of(reps)
    out = {str(i): [] for i in range(len(params))}
    for r in range(flat.shape[0]):
        keeps = unpack(flat[r].contiguous().cpu(), [rep.shape for rep in reps])
        full: dict = {}
        for rep, k in zip(reps, keeps):
            if rep.index is None:
                full[rep.param] = k
            else:
                base = full.get(rep.param)
                if base is None:
                    base = torch.ones(rep.param.shape, dtype=torch.bool)
                base[rep.index] = k
                full[rep.param] = base
        for i, p in enumerate(params):
            out[str(i)].append(pack_rows(full[p], row_layout(p)[1]))
    return {k: torch.stack(v) for k, v in out.items()}
