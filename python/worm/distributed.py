"""The exact search over sharded (FSDP2) and replicated (DDP) parameters.

METHOD.md, "Sharded and replicated parameters". A representative set whose tensors
are DTensors sharded on dim 0 (``fully_shard``) is searched where it lives:

* **Threshold**: a radix select over the fp32 bit patterns of ``|w|`` (for finite
  non-negative floats the int32 pattern orders like the value). Each of the four
  passes histograms one 8-bit digit of the local entries that still match the prefix
  chosen so far (256 int32 bins per selection, int64 past 2**31 entries, plus the
  NaN/Inf counts on the first pass), all-reduces the histogram (SUM) and picks the digit holding the k-th
  smallest entry. The result is the k-th smallest score of the whole multiset,
  bit for bit ``torch.kthvalue``'s, with ties, ``k = round(p * N)`` and ``k = 0 ->
  -inf`` exactly as :mod:`worm.reference`. No weight leaves its rank.
* **Masks**: each rank keeps its own ring of packed masks over its local entries
  (the layout of :mod:`worm.reference` applied to the local pieces), written by the
  backend's fused ``mask_update_`` with the global threshold; the per-row XOR counts
  are summed by one all-reduce. FSDP's padding is never seen: ``to_local()`` is the
  unpadded shard, and an empty shard contributes nothing.
* **Placement**: masks come back as DTensors in their parameter's placement
  (:func:`full_masks` gathers them on request); truncation bits are the packed
  local masks, so optimizers run on local shards (:func:`local`, :func:`sgd_step_`).
* **Resume**: :meth:`ShardedMaskWindow.state` turns the ring into one uint8 DTensor
  per parameter (``[l, rows, ceil(row/8)]``, sharded like the parameter's rows), the
  form ``torch.distributed.checkpoint`` saves and loads shard by shard.

Replicated parameters (DDP, plain tensors) need no communication at all: every rank
computes the same mask. With ``WORM_CHECK_REPLICAS=1`` (or ``check_replicas = True``
here) each sampling step checks that the ranks agree (a debug aid, it syncs).

Supported placements: a mesh dimension with ``Shard(0)`` (FSDP2) plus any number of
``Replicate()`` dimensions (HSDP). Other layouts are refused by name.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from . import ops
from . import reference as _ref
from .packing import bit_weights
from .rep import Entries
from .window import MaskWindow, check_length

__all__ = ["is_dtensor", "local", "local_numel", "sharded_window", "ShardedMaskWindow", "full_masks",
           "distribute_like", "check_replicated_window",
           "kth_smallest", "check_replicas", "replicas_agree", "sgd_step_",
           "RADIX_BITS", "bytes_per_sample", "counter_dtype"]

RADIX_BITS = 8
_BINS = 1 << RADIX_BITS
_SHIFTS = tuple(range(32 - RADIX_BITS, -1, -RADIX_BITS))  # 24, 16, 8, 0

# Debug: every sampling step on replicated (DDP) parameters checks the ranks agree.
check_replicas = os.environ.get("WORM_CHECK_REPLICAS", "") not in ("", "0")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor (an alias: in-place edits reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_numel(t) -> int:
    return local(t).numel()


def _dist():
    import torch.distributed as dist
    return dist


def _replicated_world() -> int:
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


# ----------------------------------------------------------------- the select
def counter_dtype(largest_selection: int) -> torch.dtype:
    """int32 histogram counters while no selection can overflow them (half the bytes)."""
    return torch.int32 if largest_selection < 2 ** 31 else torch.int64


def _radix_pass_hist_compacted(segments, shift, device, dtype) -> tuple:
    """(histogram [S * 256] of digit ``shift``, the digits); all entries match the prefix (CPU)."""
    n_seg = len(segments)
    hist = torch.zeros(n_seg * _BINS, dtype=torch.int64, device=device)
    digits = []
    for s, bit_tensors in enumerate(segments):
        digits.append([])
        for bits in bit_tensors:
            digit = (bits >> shift) & (_BINS - 1)
            digits[-1].append(digit)
            if bits.numel():
                hist[s * _BINS:(s + 1) * _BINS] += torch.bincount(digit, minlength=_BINS)
    return hist.to(dtype), digits


def _radix_pass_hist(segments, prefix, shift, device, dtype) -> torch.Tensor:
    """Histogram [S * 256] of digit ``shift`` over entries matching ``prefix`` above it."""
    n_seg = len(segments)
    hist = torch.zeros(n_seg * _BINS + 1, dtype=dtype, device=device)  # last bin: no match
    one = torch.ones((), dtype=dtype, device=device)
    for s, bit_tensors in enumerate(segments):
        for bits in bit_tensors:
            digit = (bits >> shift) & (_BINS - 1)
            idx = digit.long() + s * _BINS
            if shift + RADIX_BITS < 32:
                match = (bits >> (shift + RADIX_BITS)) == (prefix[s] >> (shift + RADIX_BITS))
                idx = torch.where(match, idx, n_seg * _BINS)
            hist.scatter_add_(0, idx, one.expand(idx.shape))
    return hist[:-1]


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor onto ``device`` without a host sync (pinned, non-blocking copy)."""
    if device is None or torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def kth_smallest(segments: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], group=None,
                 extra: Optional[torch.Tensor] = None, device=None, dtype=torch.int64):
    """The k-th smallest (1-indexed) of each segment's multiset, summed over ``group``.

    ``segments[s]``: this rank's tensors of selection ``s`` (fp32, finite, >= 0; may
    be empty). ``ks[s]``: k over the whole (all-rank) segment; 0 gives ``-inf``.
    ``extra`` (integers, optional) rides along with the first all-reduce and comes back
    summed. ``dtype``: the counters (int32 when no summed count can reach 2**31, see
    :func:`counter_dtype`). Returns (fp32 [S] thresholds, summed extra). No host sync.
    """
    dist = _dist()
    bits = [[t.reshape(-1).view(torch.int32) for t in seg] for seg in segments]
    n_seg = len(segments)
    kk = _to_device(torch.tensor(list(ks), dtype=torch.int64), device)
    prefix = torch.zeros(n_seg, dtype=torch.int64, device=device)
    # On CPU the entries outside the chosen bin are dropped after each pass (boolean
    # indexing would sync a GPU, which instead re-reads all entries with a prefix test).
    compact = device is None or torch.device(device).type == "cpu"
    for p, shift in enumerate(_SHIFTS):
        if compact:
            hist, digits = _radix_pass_hist_compacted(bits, shift, device, dtype)
        else:
            hist = _radix_pass_hist(bits, prefix, shift, device, dtype)
        if p == 0 and extra is not None:
            hist = torch.cat([hist, extra.to(device=device, dtype=dtype)])
        if group is not False and _replicated_world() > 1:
            dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        if p == 0 and extra is not None:
            hist, extra = hist[:n_seg * _BINS], hist[n_seg * _BINS:]
        cum = hist.view(n_seg, _BINS).cumsum(1, dtype=torch.int64)
        digit = (cum < kk[:, None]).sum(1).clamp(max=_BINS - 1)  # bin holding the k-th entry
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None]).squeeze(1),
                            torch.zeros_like(digit))
        kk = kk - below
        prefix = prefix | (digit << shift)
        if compact and p + 1 < len(_SHIFTS):
            d = digit.tolist()
            bits = [[b[g == d[s]] for b, g in zip(seg, dg)] for s, (seg, dg) in enumerate(zip(bits, digits))]
    thr = prefix.to(torch.int32).view(torch.float32)
    zero_k = _to_device(torch.tensor([k == 0 for k in ks]), device)
    thr = torch.where(zero_k, torch.full_like(thr, -math.inf), thr)
    return thr, extra


def bytes_per_sample(numels: Sequence[int], scope: str, window: int) -> int:
    """Bytes one rank all-reduces per sampling step (payload) for tensors of ``numels``."""
    n_seg = 1 if scope == "global" else len(numels)
    largest = sum(numels) if scope == "global" else max(numels)
    width = torch.empty(0, dtype=counter_dtype(largest)).element_size()
    return width * (n_seg * _BINS * len(_SHIFTS) + len(numels)) + 8 * window


# --------------------------------------------------------- sharded rep views
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


def _shard_layout(p) -> tuple:
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
        self.count = 0
        self.reps = list(reps)
        layouts = [_shard_layout(r.param) for r in self.reps]
        mesh, d, _ = layouts[0]
        for r, (m, dd, _) in zip(self.reps, layouts):
            if m != mesh or dd != d:
                raise NotImplementedError(f"representative tensor {r.name} lives on another device "
                                          "mesh than the first one: one mesh for the whole set")
        self.mesh, self.mesh_dim = mesh, d
        self.group = mesh.get_group(d)
        self.local = [_LocalRep(r, rows) for r, (_, _, rows) in zip(self.reps, layouts)]
        self.offsets = _ref.byte_offsets([lr.numel for lr in self.local])
        self.device = local(self.reps[0].param).device
        limit = ops.max_window(self.device)  # one mask-update call covers the whole window here
        if limit is not None and self.length > limit:
            raise ValueError(f"a sharded search's window must be at most {limit} on "
                             f"{ops.backend(self.device)}, got {length!r}")
        self.params = list(dict.fromkeys(r.param for r in self.reps))  # unique, in order
        self.numels = [r.numel for r in self.reps]  # global entries per tensor
        self.numel = sum(self.numels)
        self.ring = torch.zeros(self.length, self.offsets[-1], dtype=torch.uint8, device=self.device)
        self.bytes_reduced = 0  # running count of all-reduce payload bytes (for benchmarks)

    def kept_count(self, row: Optional[int] = None) -> torch.Tensor:
        """Entries the row keeps on every rank together (one small all-reduce)."""
        n = super().kept_count(row)
        _dist().all_reduce(n, op=_dist().ReduceOp.SUM, group=self.group)
        return n

    # ---------------------------------------------------------------- sampling
    def push(self, ks, scope: str) -> torch.Tensor:
        """New mask into the oldest row; the XOR counts per row, summed over ranks (int64 [l])."""
        dist = _dist()
        ring, head = self.ring, self.count % self.length
        tensors = [lr.contiguous_values() for lr in self.local]
        scores = [t.float().abs() for t in tensors]
        nonfinite = torch.stack([(~torch.isfinite(s)).sum() for s in scores])
        segments = [scores] if scope == "global" else [[s] for s in scores]
        dtype = counter_dtype(sum(self.numels) if scope == "global" else max(self.numels))
        thr, nonfinite = kth_smallest(segments, ks, self.group, extra=nonfinite, device=self.device,
                                      dtype=dtype)
        width = torch.empty(0, dtype=dtype).element_size()
        self.bytes_reduced += width * (len(segments) * _BINS * len(_SHIFTS) + len(tensors))
        bad = torch.nonzero(nonfinite).flatten().tolist()  # the same on every rank: all raise
        if bad:
            names = ", ".join(self.reps[i].name for i in bad)
            raise ValueError(f"NaN or Inf in representative tensor(s) {names}: "
                             "a mask cannot be taken from non-finite weights")
        thr = thr.expand(len(tensors)) if scope == "global" else thr
        here = [i for i, t in enumerate(tensors) if t.numel() > 0]
        if here:
            counts = ops.mask_update_([tensors[i] for i in here], thr[here].contiguous(), ring, head)
        else:  # an empty shard holds no bits; its (empty) row is trivially the new mask
            counts = torch.zeros(ring.shape[0], dtype=torch.int64, device=self.device)
        counts = counts.to(torch.int64)
        if _replicated_world() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_reduced += 8 * counts.numel()
        self.count += 1
        return counts

    # ------------------------------------------------------------------ masks
    def local_masks(self, row: Optional[int] = None) -> dict:
        """{param: local-shard-shaped bool keep mask} for a row (default: the newest)."""
        row = self.newest_row() if row is None else row
        out: dict = {}
        for i, lr in enumerate(self.local):
            keep = _ref.unpack(self.segment(row, i).contiguous(), [lr.shape])[0]
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
        bits: dict = {}
        masks = self.local_masks(row)
        for lr in self.local:
            packed = _ref.pack([masks[lr.rep.param]]) if local_numel(lr.rep.param) else \
                torch.zeros(0, dtype=torch.uint8, device=self.device)
            for p in [lr.rep.param, *lr.rep.covers]:
                bits[p] = packed
        return bits

    # ------------------------------------------------------------- resumption
    def state(self) -> dict:
        """``ring``: {str(i): uint8 DTensor [l, rows, ceil(row/8)]} per parameter, sharded
        like the parameter's rows (what torch.distributed.checkpoint saves shard by shard)."""
        from torch.distributed.tensor import DTensor, Shard
        ring = self.ring
        per_row = [self.local_masks(r) for r in range(ring.shape[0])]
        out = {}
        for i, p in enumerate(self.params):
            rows, width = _row_layout(p)
            loc = torch.stack([_pack_rows(m[p], width) for m in per_row])
            placements = [Shard(1) if isinstance(pl, Shard) else pl for pl in p.placements]
            shape = (ring.shape[0], rows, _ref.packed_nbytes(width))
            out[str(i)] = DTensor.from_local(loc, p.device_mesh, placements, run_check=False,
                                             shape=shape, stride=(shape[1] * shape[2], shape[2], 1))
        return {"ring": out, "count": self.count}

    def load(self, state: dict, count: int) -> None:
        ring = self.ring
        if not isinstance(state, dict) or set(state) != {str(i) for i in range(len(self.params))}:
            raise ValueError("cannot load search state: the window was not saved by a search over "
                             f"the same {len(self.params)} sharded parameters")
        masks = [dict() for _ in range(ring.shape[0])]
        for i, p in enumerate(self.params):
            t = local(state[str(i)])
            _, width = _row_layout(p)
            lp = local(p)
            if t.shape[0] != ring.shape[0] or t.shape[1] != lp.shape[0] or t.dtype != torch.uint8:
                raise ValueError(f"cannot load search state: window of parameter {i} has local "
                                 f"shape {tuple(t.shape)}, expected ({ring.shape[0]}, {lp.shape[0]}, ...)")
            for r in range(ring.shape[0]):
                masks[r][p] = _unpack_rows(t[r].to(lp.device), width).reshape(lp.shape)
        for r in range(ring.shape[0]):
            new = [m[lr.local_index] if lr.local_index is not None else m
                   for lr, m in ((lr, masks[r][lr.rep.param]) for lr in self.local)]
            if self.offsets[-1]:
                ring[r].copy_(torch.cat([_ref.pack([m]) if m.numel() else
                                         torch.zeros(0, dtype=torch.uint8, device=ring.device)
                                         for m in new]))
        self.count = int(count)


def _row_layout(p) -> tuple:
    rows = p.shape[0] if p.dim() else 1
    return rows, (p.numel() // rows if rows else 0)


def _pack_rows(mask: torch.Tensor, width: int) -> torch.Tensor:
    """bool [rows, ...] -> uint8 [rows, ceil(width/8)], each row packed LSB first."""
    rows = mask.shape[0] if mask.dim() else 1
    flat = mask.reshape(rows, width).to(torch.uint8)
    pad = _ref.packed_nbytes(width) * 8 - width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    w = bit_weights(mask.device)
    return (flat.reshape(rows, _ref.packed_nbytes(width), 8) * w).sum(dim=2, dtype=torch.uint8)


def _unpack_rows(packed: torch.Tensor, width: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) & bit_weights(packed.device)) != 0
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :width]


def distribute_like(full: torch.Tensor, p) -> torch.Tensor:
    """``full`` (a tensor of ``p``'s full shape, the same on every rank) placed like DTensor ``p``.

    The local piece is cut, not communicated; for masks built by hand for
    ``WormSGD.set_truncation`` on FSDP2 parameters.
    """
    from torch.distributed.tensor import DTensor
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"distribute_like: shape {tuple(full.shape)} is not the parameter's {tuple(p.shape)}")
    _, _, (a, b) = _shard_layout(p)
    return DTensor.from_local(full[a:b].to(local(p).device), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def full_masks(masks: Optional[dict]) -> Optional[dict]:
    """{param: full bool tensor} from masks in their parameters' placement (gathers)."""
    if masks is None:
        return None
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
