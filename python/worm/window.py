"""The mask window: the last ``l`` packed masks of a representative set, on its device.

A ring ``uint8 [l, B]`` in the packed layout of :mod:`worm.packing` (docs/ops.md).
:meth:`MaskWindow.push` samples a new mask through the ops (``sample_mask_``: threshold
selection, then the mask update that also counts the differing bits against every
row, one fused step on CPU) and
:meth:`MaskWindow.distances` turns the counts into the distances the decision rule
(:mod:`worm.decision`) reads. The window also hands out the newest mask as bool
masks (the ticket) and as packed truncation bits per parameter.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops, window_state
from .packing import byte_offsets, pack_flat, unpack
from .rep import RepTensor

__all__ = ["MaskWindow", "SCORED_DTYPES"]

# float64 weights are ranked by their fp32 score (|w| in fp32, as the reference does).
SCORED_DTYPES = ops.FLOAT_DTYPES + (torch.float64,)


def check_length(length) -> int:
    """The window length l as an int, refused unless >= 2 (distances need an older mask)."""
    if int(length) != length or length < 2:
        raise ValueError(f"window must be an integer >= 2 (distances need an older mask), "
                         f"got {length!r}")
    return int(length)


class MaskWindow:
    def __init__(self, reps: Sequence[RepTensor], length: int, device):
        self.length = check_length(length)
        self.reps = list(reps)
        numels = [rep.numel for rep in self.reps]
        self.numel = sum(numels)
        self.offsets = byte_offsets(numels)
        self.ring = torch.zeros(self.length, self.offsets[-1], dtype=torch.uint8, device=device)
        self.count = 0            # masks pushed so far
        self._bit_maps = None     # {param: int64 bit index per entry}, built on first use

    @property
    def full(self) -> bool:
        return self.count >= self.length

    def newest_row(self) -> int:
        return (self.count - 1) % self.length

    # ---------------------------------------------------------------- sampling
    def push(self, ks: Sequence[int], scope: str) -> torch.Tensor:
        """Sample the reps' mask into the oldest row; int64 [l] XOR counts per row.

        NaN/Inf in a representative tensor raises (naming it) with the window as it was.
        """
        tensors = [rep.contiguous_values() for rep in self.reps]
        tensors = [t.float() if t.dtype == torch.float64 else t for t in tensors]
        head = self.count % self.length
        limit = ops.max_window(self.ring.device)
        if limit is None or self.length <= limit:  # one fused step (docs/ops.md)
            _, nonfinite, counts = ops.sample_mask_(tensors, ks, scope, self.ring, head)
        else:
            thr, nonfinite = ops.select_thresholds(tensors, ks, scope)
            counts = None
        bad = torch.nonzero(nonfinite).flatten().tolist()  # one sync: errors must name the tensor
        if bad:
            names = ", ".join(self.reps[i].name for i in bad)
            raise ValueError(f"NaN or Inf in representative tensor(s) {names}: "
                             "a mask cannot be taken from non-finite weights")
        if counts is None:
            counts = self._mask_update(tensors, thr, head)
        self.count += 1
        return counts

    def _mask_update(self, tensors, thr, head: int) -> torch.Tensor:
        """The op over the whole ring, in calls of at most :func:`worm.ops.max_window`
        rows (the most one call of the chosen backend counts), so windows of any length
        run on every backend."""
        step = ops.max_window(self.ring.device)
        if step is None or self.length <= step:
            return ops.mask_update_(tensors, thr, self.ring, head)
        parts = []
        for lo in range(0, self.length, step):
            rows = self.ring[lo:lo + step]  # a contiguous block of rows
            if lo <= head < lo + rows.shape[0]:
                parts.append(ops.mask_update_(tensors, thr, rows, head - lo))
            else:  # counts only: the op writes its head row, so put that row back
                keep = rows[0].clone()
                parts.append(ops.mask_update_(tensors, thr, rows, 0))
                rows[0].copy_(keep)
        return torch.cat(parts)

    def distances(self, counts: torch.Tensor) -> Optional[list]:
        """The newest mask's distance to each older one, oldest first (None until full)."""
        if not self.full:
            return None
        head = self.newest_row()
        c = counts.tolist()
        return [c[(head + j) % self.length] / self.numel for j in range(1, self.length)]

    # ----------------------------------------------------------------- results
    def kept_count(self, row: Optional[int] = None) -> torch.Tensor:
        """Entries a row (default: the newest) keeps, as a 0-d int64 tensor on the device
        (padding bits are 0, so this is the row's popcount)."""
        row = self.newest_row() if row is None else row
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64,
                             device=self.ring.device)
        return table[self.ring[row].long()].sum()

    def segment(self, row: int, i: int) -> torch.Tensor:
        return self.ring[row, self.offsets[i]:self.offsets[i + 1]]

    def masks(self, row: Optional[int] = None) -> dict:
        """{param: full-shape bool keep mask} for a row (default: the newest)."""
        row = self.newest_row() if row is None else row
        out: dict = {}
        for i, rep in enumerate(self.reps):
            keep = unpack(self.segment(row, i).contiguous(), [rep.shape])[0]
            if getattr(rep, "structured", False):  # heads/neurons: every entry they own
                rep.expand(keep, out)
            else:
                out[rep.param] = rep.full_mask(keep, out.get(rep.param))
        return out

    def truncation_bits(self, row: Optional[int] = None) -> dict:
        """{param: packed keep bits} of a row (default: the newest), on the device.

        A whole, contiguous parameter's bits are its segment of the row (a BatchNorm's
        bias shares its gamma's). Parameters holding slices (packed Q/K/V) get their
        bits gathered from the row through a bit-index map built once, entries outside
        every slice (V) kept: no unpack to bool masks and re-pack on the host side.
        """
        row = self.newest_row() if row is None else row
        ring_row = self.ring[row]
        bits: dict = {}
        structured: dict = {}
        for i, rep in enumerate(self.reps):
            if getattr(rep, "structured", False):
                # expanded once per sampling step; the fused truncation then reads these bits
                rep.expand(unpack(self.segment(row, i).contiguous(), [rep.shape])[0], structured)
        for p, keep in structured.items():
            bits[p] = pack_flat(keep)
        for i, rep in enumerate(self.reps):
            if rep.index is None and not getattr(rep, "structured", False):  # any layout: the segment is in logical (row-major) order
                seg = self.segment(row, i).clone()
                for p in [rep.param, *rep.covers]:
                    bits[p] = seg
        for p, src in self._maps().items():
            byte = ring_row[src.clamp(min=0) >> 3].long()
            keep = torch.where(src >= 0, (byte >> (src & 7)) & 1, 1)
            bits[p] = pack_flat(keep)
        return bits

    def _maps(self) -> dict:
        if self._bit_maps is None:
            maps: dict = {}
            for i, rep in enumerate(self.reps):
                if rep.index is None:
                    continue
                src = maps.get(rep.param)
                if src is None:
                    src = torch.full(rep.param.shape, -1, dtype=torch.int64,
                                     device=self.ring.device)
                    maps[rep.param] = src
                pos = self.offsets[i] * 8 + torch.arange(rep.numel, device=src.device)
                src[rep.index] = pos.reshape(rep.shape)  # whole tensors were skipped above
            self._bit_maps = {p: m.reshape(-1) for p, m in maps.items()}
        return self._bit_maps

    # ------------------------------------------------------------- state dict
    def state(self) -> dict:
        """The saved form of :mod:`worm.window_state`, the same in every layout. A set of
        head/neuron scores is not entries of parameters (and runs on one process or DDP
        only), so its ring is saved as it is: the flat ``[l, B]`` form."""
        structured = any(getattr(rep, "structured", False) for rep in self.reps)
        ring = self.ring.clone() if structured else window_state.plain_state(self)
        return {"ring": ring, "count": self.count,
                "layout": window_state.plain_layout()}

    def load(self, ring, count: int, saved: str = "another search") -> None:
        if isinstance(ring, dict):  # any layout's saved ring (older states: the flat ring)
            ring = window_state.plain_ring(self, ring, saved, window_state.plain_layout())
        if ring.shape != self.ring.shape or ring.dtype != torch.uint8:
            raise ValueError(f"cannot load search state: window buffer {tuple(ring.shape)} "
                             f"{ring.dtype}, expected {tuple(self.ring.shape)} uint8")
        self.ring.copy_(ring)
        self.count = int(count)
