"""The window of a sharded (FSDP2) search: each rank's ring over its local entries.

METHOD.md, "Sharded and replicated parameters". A representative set whose tensors
are DTensors sharded on dim 0 (``fully_shard``) is searched where it lives: each rank
keeps its own ring of packed masks over its local entries (the layout of
:mod:`worm.packing` applied to the local pieces); the threshold and the XOR counts
come from :mod:`worm.shard_select` (small all-reduced histograms, no weight leaves
its rank). FSDP's padding is never seen: ``to_local()`` is the unpadded shard, and an
empty shard contributes nothing. Masks come back as DTensors in their parameter's
placement; truncation bits are the packed local masks, so optimizers run on local
shards. The saved state is :mod:`worm.window_state`'s, the same in every layout.

Supported placements: a mesh dimension with ``Shard(0)`` (FSDP2) plus any number of
``Replicate()`` dimensions (HSDP). Other layouts are refused by name.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .collective import Collective
from .dtensor import is_dtensor, local, local_numel
from .packing import byte_offsets, pack, unpack
from .rep import Entries
from .shard_ops import MAX_ROWS
from .shard_select import sample_sharded
from .window import MaskWindow, check_length
from .window_state import check_rows, pack_rows, row_layout, rows_from_flat, unpack_rows

__all__ = ["ShardedMaskWindow", "sharded_window", "shard_layout", "layout_name"]

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class _LocalRep(Entries):
    """Where one representative tensor's local entries sit in its local shard."""

    def __init__(self, rep, shard_rows: tuple):
        self.rep = rep
        p = rep.param
        a, b = shard_rows                      # this rank's rows of the parameter
        index = rep.index
        if index is None:
            self.rows = (a, b)                 # rep rows held here, in rep coordinates
            self.local_index = None
        else:
            index = tuple(index)
            first = index[0] if index else slice(None)
            if not isinstance(first, slice) or first.step not in (None, 1):
                raise NotImplementedError(f"representative tensor {rep.name}: a sharded parameter "
                                          "can be sliced on dim 0 only by a step-1 slice")
            s, e, _ = first.indices(p.shape[0])
            for other in index[1:]:
                if not isinstance(other, slice):
                    raise NotImplementedError(f"representative tensor {rep.name}: index {index!r} "
                                              "must be a tuple of slices on a sharded parameter")
            lo, hi = max(a, s), max(min(b, e), max(a, s))
            self.rows = (lo - s, hi - s)
            self.local_index = (slice(lo - a, hi - a), *index[1:])
        self.shape = tuple(self.values().shape)
        self.numel = math.prod(self.shape)

    def _source(self) -> torch.Tensor:
        return local(self.rep._source())

    def _slice(self) -> Optional[tuple]:
        return self.local_index


def shard_layout(p) -> tuple:
    """(mesh, shard mesh dim, (first row, end row)) of a Shard(0) DTensor on this rank."""
    from torch.distributed.tensor import Replicate, Shard
    mesh, placements = p.device_mesh, p.placements
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    ok = len(shard_dims) == 1 and placements[shard_dims[0]].dim == 0 and all(
        isinstance(pl, (Shard, Replicate)) for pl in placements)
    if not ok:
        raise NotImplementedError(f"sharded parameter with placements {placements}: worm searches "
                                  "parameters sharded on dim 0 over one mesh dimension (FSDP2's "
                                  "fully_shard, HSDP), replicated on any others")
    d = shard_dims[0]
    n0, size = p.shape[0], mesh.size(d)
    coord = mesh.get_coordinate()[d]
    chunk = -(-n0 // size)
    a = min(coord * chunk, n0)
    b = min(a + chunk, n0)
    if local(p).shape[0] != b - a:
        raise NotImplementedError(f"sharded parameter of shape {tuple(p.shape)}: local shard has "
                                  f"{local(p).shape[0]} rows, expected {b - a} (torch.chunk layout)")
    return mesh, d, (a, b)


def sharded_window(reps, length: int) -> Optional["ShardedMaskWindow"]:
    """A :class:`ShardedMaskWindow` when the representative set is sharded, else None."""
    flags = [is_dtensor(r.param) for r in reps]
    if not any(flags):
        return None
    if not all(flags):
        plain = [r.name for r, f in zip(reps, flags) if not f]
        raise ValueError(f"the representative set mixes sharded (DTensor) and plain tensors "
                         f"({', '.join(plain[:3])} are plain): shard all of them (fully_shard "
                         "the root module too) or none")
    return ShardedMaskWindow(reps, length)


class ShardedMaskWindow(MaskWindow):
    """A :class:`worm.window.MaskWindow` over the local shards of a sharded set.

    The ring holds this rank's entries only (``ring``: uint8 [l, local bytes]); the
    counts :meth:`push` returns are summed over the ranks, so :meth:`distances` (and
    the decision) are the whole set's. :meth:`masks` gives DTensors placed like their
    parameters; :meth:`truncation_bits` the packed bits of each local shard.
    """

    def __init__(self, reps, length: int):
        self.length = check_length(length)
        if self.length > MAX_ROWS:  # the local passes count every row in one read
            raise ValueError(f"a sharded search's window must be at most {MAX_ROWS}, got {length!r}")
        self.count = 0
        self.reps = list(reps)
        layouts = [shard_layout(r.param) for r in self.reps]
        mesh, d, _ = layouts[0]
        for r, (m, dd, _) in zip(self.reps, layouts):
            if m != mesh or dd != d:
                raise NotImplementedError(f"representative tensor {r.name} lives on another device "
                                          "mesh than the first one: one mesh for the whole set")
        self.mesh, self.mesh_dim = mesh, d
        self.group = mesh.get_group(d)
        self.local = [_LocalRep(r, rows) for r, (_, _, rows) in zip(self.reps, layouts)]
        self.offsets = byte_offsets([lr.numel for lr in self.local])
        self.device = local(self.reps[0].param).device
        self.params = list(dict.fromkeys(r.param for r in self.reps))  # unique, in order
        self.numels = [r.numel for r in self.reps]  # global entries per tensor
        self.numel = sum(self.numels)
        self.ring = torch.zeros(self.length, self.offsets[-1], dtype=torch.uint8, device=self.device)
        self.world = mesh.size(d)
        self.bytes_reduced = 0  # running count of all-reduce payload bytes (for benchmarks)
        self.agree_on = None    # () -> [(name, int)]: the search's state, agreed each step
        self.prebuild_bits = False  # build the truncation bits before the step commits
        self.precheck = None    # () -> None, raises: run inside the step's first all-reduce
        self._bits = None       # (row, bits) built by the last step


    def kept_count(self, row: Optional[int] = None) -> torch.Tensor:
        """Entries the row keeps on every rank together (one small all-reduce)."""
        import torch.distributed as dist
        n = super().kept_count(row)
        if self.world > 1:
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=self.group)
        return n

    # ---------------------------------------------------------------- sampling
    def push(self, ks, scope: str) -> torch.Tensor:
        """New mask into the oldest row; the XOR counts per row, summed over ranks (int64 [l]).

        Every rank raises the same error (and has written nothing the search does not
        roll back) if any rank fails, or if the ranks disagree on the window count, the
        search state or a tensor's dtype."""
        ring, head = self.ring, self.count % self.length
        tensors = [lr.contiguous_values() for lr in self.local]
        T = len(tensors)
        seg_of = [0] * T if scope == "global" else list(range(T))
        Ns = [self.numel] if scope == "global" else self.numels
        agree = [("the window count", self.count), ("the window length", self.length),
                 *(self.agree_on() if self.agree_on is not None else []),
                 *[(f"the dtype of {lr.rep.name} (here {t.dtype})", _DTYPE_CODE.get(t.dtype, 9))
                   for lr, t in zip(self.local, tensors)]]
        coll = Collective(self.group, self.world, f"sampling step {self.count + 1} of the sharded search")
        coll.precheck = self.precheck
        self._bits = None
        built = {}

        def before_commit():  # what could fail after the collectives fails before the last one
            if self.prebuild_bits:
                built["bits"] = self._build_bits(head)

        counts, _ = sample_sharded(tensors, seg_of, ks, Ns, [lr.rep.name for lr in self.local],
                                   ring, head, coll, agree, before_commit)
        self.bytes_reduced += coll.bytes
        if "bits" in built:
            self._bits = (head, built["bits"])
        self.count += 1
        return counts.to(self.device)

    # ------------------------------------------------------------------ masks
    def local_masks(self, row: Optional[int] = None) -> dict:
        """{param: local-shard-shaped bool keep mask} for a row (default: the newest)."""
        row = self.newest_row() if row is None else row
        out: dict = {}
        for i, lr in enumerate(self.local):
            keep = unpack(self.segment(row, i).contiguous(), [lr.shape])[0]
            out[lr.rep.param] = lr.full_mask(keep, out.get(lr.rep.param))
        return out

    def masks(self, row: Optional[int] = None) -> dict:
        """{param: bool keep mask as a DTensor placed like its parameter}."""
        from torch.distributed.tensor import DTensor
        return {p: DTensor.from_local(m, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
                for p, m in self.local_masks(row).items()}

    def truncation_bits(self, row: Optional[int] = None) -> dict:
        """{param: packed keep bits of its local shard}; BN biases share their gamma's."""
        row = self.newest_row() if row is None else row
        if self._bits is not None and self._bits[0] == row:
            return self._bits[1]
        return self._build_bits(row)

    def _build_bits(self, row: int) -> dict:
        bits: dict = {}
        whole = [sum(r.param is lr.rep.param for r in self.reps) == 1 and lr.local_index is None
                 for lr in self.local]
        masks = None if all(whole) else self.local_masks(row)
        for i, lr in enumerate(self.local):
            if whole[i]:  # the local shard is row-major: its segment is its packed mask
                packed = self.segment(row, i).clone()
            elif local_numel(lr.rep.param):
                packed = pack([masks[lr.rep.param]])
            else:
                packed = torch.zeros(0, dtype=torch.uint8, device=self.device)
            for p in [lr.rep.param, *lr.rep.covers]:
                bits[p] = packed
        return bits

    # ------------------------------------------------------------- resumption
    def state(self) -> dict:
        """``ring``: {str(i): uint8 DTensor [l, rows, ceil(row/8)]} per parameter, sharded
        like the parameter's rows (:mod:`worm.window_state`; DCP reshards it)."""
        from torch.distributed.tensor import DTensor, Shard
        ring = self.ring
        per_row = [self.local_masks(r) for r in range(ring.shape[0])]
        out = {}
        for i, p in enumerate(self.params):
            rows, width = row_layout(p)
            loc = torch.stack([pack_rows(m[p], width) for m in per_row])
            placements = [Shard(1) if isinstance(pl, Shard) else pl for pl in p.placements]
            shape = (ring.shape[0], rows, (width + 7) // 8)
            out[str(i)] = DTensor.from_local(loc, p.device_mesh, placements, run_check=False,
                                             shape=shape, stride=(shape[1] * shape[2], shape[2], 1))
        return {"ring": out, "count": self.count, "layout": self.layout()}

    def layout(self) -> str:
        return layout_name(self.world)

    def load(self, state, count: int, saved: str = "another search") -> None:
        ring, here = self.ring, self.layout()
        if isinstance(state, torch.Tensor):  # an old one-process state: one flat ring
            state = rows_from_flat(self.reps, state)
        check_rows(state, self.params, ring.shape[0], saved, here)  # a DTensor's shape is global
        masks = [dict() for _ in range(ring.shape[0])]
        for i, p in enumerate(self.params):
            t = state[str(i)]
            lp = local(p)
            _, _, (a, b) = shard_layout(p)
            t = local(t) if is_dtensor(t) else t[:, a:b]  # a one-process state holds every row
            _, width = row_layout(p)
            if t.shape[1] != lp.shape[0]:
                raise ValueError(f"cannot load search state: saved by {saved}, parameter {i}'s rows "
                                 f"here are {a}..{b} but the state's local piece has {t.shape[1]} rows")
            for r in range(ring.shape[0]):
                masks[r][p] = unpack_rows(t[r].to(lp.device), width).reshape(lp.shape)
        new_ring = torch.zeros_like(ring)
        for r in range(ring.shape[0]):
            new = [m[lr.local_index] if lr.local_index is not None else m
                   for lr, m in ((lr, masks[r][lr.rep.param]) for lr in self.local)]
            if self.offsets[-1]:
                new_ring[r].copy_(torch.cat([pack([m]) if m.numel() else
                                             torch.zeros(0, dtype=torch.uint8, device=ring.device)
                                             for m in new]))
        ring.copy_(new_ring)  # every check passed: now write
        self.count = int(count)
        self._bits = None


def layout_name(world_size: int) -> str:
    return f"an FSDP2 search sharded over {world_size} rank(s)"
