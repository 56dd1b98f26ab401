"""One sharded sampling step: the threshold of the whole (all-rank) set and the new mask
of this rank's entries, by all-reducing small histograms only.

The plan of the single-process C++ step (docs/ops.md, "Sampling in one pass") spread
over ranks; each pass is a local op of :mod:`worm.shard_ops` (C++ on CPU) followed by
one all-reduce of its few KB:

1. **Level one** narrows a key window ``[lo, hi)`` per selection. Selections of at
   least 2^19 entries read a sample (one 4096-entry run in 16, 8 or 4): histograms of
   11 bits (2048 bins; 256 per selection in layer scope), all-reduced, until the
   window around the sample ranks ``k/N * s +- 6 standard errors (+ 16)`` is near
   its narrowest. Smaller sets, and any the sample cannot serve, take the exact
   passes, until the window holds at most 65536 keys of the whole set (or one key:
   then the threshold is known).
2. **Level two** reads every local entry once (``window_split_``): writes the
   provisional mask (window entries pruned) into the head row, XOR-counts it against
   every row, counts the entries below the window and collects those inside.
3. **Finish**: the all-reduced counts check that the window holds the k-th key
   (``below < k <= below + inside``; otherwise, or if a rank collected too many, the
   step reruns on the exact level one); histograms of the collected keys (tiny) pick
   the exact threshold; each rank sets the bits of its collected entries above it and
   corrects its counts, which the last all-reduce sums.

Every all-reduce goes through :class:`worm.collective.Collective`, so a rank that
fails makes all fail alike. The result is the k-th smallest key of the whole multiset
exactly, whatever the sample said.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate
from typing import Callable, Sequence

import torch

from .collective import Collective
from .shard_ops import key_histogram, window_fix_, window_split_

__all__ = ["sample_sharded", "kth_smallest", "SAMPLE_MIN", "EXACT_CAP"]

SAMPLE_MIN = 1 << 19    # smaller selections: exact level one
EXACT_CAP = 1 << 16     # an exact window this small goes to level two
_TOP = 1 << 31          # keys are 31 bits
_Z = 6.0                # standard errors each side of the sampled rank


def _shift_for(width: int, bins: int) -> int:
    """Smallest shift with (width - 1) >> shift < bins."""
    s = 0
    while width > 1 and ((width - 1) >> s) >= bins:
        s += 1
    return s


def _bin_of(row, rank: int, cum: int) -> tuple:
    """(bin holding the rank-th key, keys before that bin) of a histogram row, counts from cum."""
    acc = list(accumulate(row, initial=cum))      # acc[b] = keys before bin b
    b = min(bisect_left(acc, rank, 1) - 1, len(row) - 1)  # first b with acc[b + 1] >= rank
    return b, acc[b]


class _Step:
    def __init__(self, tensors, seg_of, ks, Ns, ring, head, coll: Collective, agree):
        self.tensors, self.seg_of, self.ks, self.Ns = tensors, list(seg_of), list(ks), list(Ns)
        self.ring, self.head, self.coll = ring, head, coll
        self.S, self.T = len(ks), len(tensors)
        self.bins = 2048 if self.S == 1 else 256
        self.agree = list(agree)
        self.bit_offsets = None

    def reduce(self, size: int, fn: Callable) -> list:
        agree, self.agree = self.agree, []  # what the ranks agree on rides on the first one
        return self.coll.reduce(size, fn, agree=agree)

    # ------------------------------------------------------------------ level one
    def narrow(self, stride: int):
        """Per selection (lo, hi, expected global count inside), or None: the sample failed."""
        S, bins = self.S, self.bins
        lo, hi = [0] * S, [_TOP] * S
        est = [0] * S
        done = [k == 0 for k in self.ks]
        for s in range(S):
            if done[s]:
                lo[s] = hi[s] = 0
        ranks = [None] * S  # sampled: (r_lo, r_hi, sample size)
        for _ in range(4):
            todo = [s for s in range(S) if not done[s]]
            if not todo:
                break
            qlo = [lo[s] if not done[s] else 0 for s in range(S)]
            qhi = [hi[s] if not done[s] else 0 for s in range(S)]
            shift = [_shift_for(qhi[s] - qlo[s], bins) for s in range(S)]
            h = self.reduce(S * (bins + 2), lambda: key_histogram(
                self.tensors, self.seg_of, qlo, qhi, shift, bins, stride)).view(S, bins + 2).tolist()
            for s in todo:
                row, below, bad = h[s][:bins], h[s][bins], h[s][bins + 1]
                if bad:
                    if stride > 1:
                        return None
                    self.raise_nonfinite()
                if stride == 1:
                    b, _ = _bin_of(row, self.ks[s], below)
                    lo[s], hi[s] = lo[s] + (b << shift[s]), min(hi[s], lo[s] + ((b + 1) << shift[s]))
                    est[s] = row[b]
                    done[s] = row[b] <= EXACT_CAP or hi[s] - lo[s] == 1
                    continue
                if ranks[s] is None:
                    size = below + sum(row)
                    p = self.ks[s] / self.Ns[s]
                    m = _Z * math.sqrt(size * p * (1 - p)) + 16
                    ranks[s] = (math.floor(p * size - m), math.ceil(p * size + m), size)
                r_lo, r_hi, size = ranks[s]
                b_lo = 0 if r_lo <= below else _bin_of(row, r_lo, below)[0]
                top = r_hi > below + sum(row)
                b_hi = bins - 1 if top else _bin_of(row, r_hi, below)[0]
                new_lo = lo[s] + (b_lo << shift[s])
                new_hi = hi[s] if top else min(hi[s], lo[s] + ((b_hi + 1) << shift[s]))
                inside = sum(row[b_lo:b_hi + 1])
                lo[s], hi[s] = new_lo, new_hi
                est[s] = inside * self.Ns[s] / max(size, 1)
                ideal = (r_hi - r_lo) * self.Ns[s] / max(size, 1)
                done[s] = inside <= 2 * (r_hi - r_lo) or est[s] <= 4 * ideal or hi[s] - lo[s] <= 1
        if stride > 1 and any(est[s] > max(EXACT_CAP, self.Ns[s] / 32) for s in range(S) if self.ks[s]):
            return None  # massive ties in the window: the exact passes handle them
        return lo, hi, est

    def raise_nonfinite(self):
        self.names_bad(self.reduce(self.T, lambda: torch.stack(
            [(~torch.isfinite(t)).sum().cpu() for t in self.tensors])).tolist())

    # ------------------------------------------------------------------ level two
    def split(self, lo, hi, est):
        S, T, bins, ring = self.S, self.T, self.bins, self.ring
        lo, hi = list(lo), list(hi)
        known = [None] * S  # threshold keys already exact (one-key windows)
        for s in range(S):
            if self.ks[s] and hi[s] - lo[s] == 1:
                known[s] = lo[s]
                lo[s] = hi[s] = lo[s] + 1  # keep key > t, nothing to collect
        cap = int(max(EXACT_CAP, 2 * sum(est)))
        tlo = [lo[self.seg_of[i]] for i in range(T)]
        thi = [hi[self.seg_of[i]] for i in range(T)]
        shift = [_shift_for(hi[s] - lo[s], bins) for s in range(S)]
        got = {}

        def local():
            counts, tally, keys, pos = window_split_(self.tensors, tlo, thi, ring, self.head, cap)
            sizes = tally[1].tolist()
            over = sum(sizes) > cap
            got.update(keys=keys, pos=pos, sizes=sizes)
            fh = self.collected_hist(got, lo, hi, shift) if not over else torch.zeros(S * bins, dtype=torch.int64)
            per = torch.zeros(2, S, dtype=torch.int64)
            per.index_add_(1, torch.tensor(self.seg_of), tally[:2].cpu())
            return torch.cat([per.reshape(-1), tally[2].cpu(), torch.tensor([int(over)]), counts.cpu(), fh])

        l = ring.shape[0]
        out = self.reduce(2 * S + T + 1 + l + S * bins, local)
        below, inside = out[:S].tolist(), out[S:2 * S].tolist()
        bad, over = out[2 * S:2 * S + T].tolist(), int(out[2 * S + T])
        counts = out[2 * S + T + 1:2 * S + T + 1 + l]
        fh = out[2 * S + T + 1 + l:].view(S, bins).tolist()
        self.got = got
        if any(bad):
            self.names_bad(bad)
        ok = not over and all(known[s] is not None or self.ks[s] == 0 or
                              below[s] < self.ks[s] <= below[s] + inside[s] for s in range(S))
        if not ok:
            return None
        return self.finish(lo, hi, shift, known, below, fh, counts, got)

    def names_bad(self, bad):
        names = [self.names[i] for i, c in enumerate(bad) if c]
        raise ValueError(f"NaN or Inf in representative tensor(s) {', '.join(names)}: "
                         "a mask cannot be taken from non-finite weights")

    def collected_hist(self, got, lo, hi, shift) -> torch.Tensor:
        """Histogram [S * bins] of the collected keys in [lo, hi) >> shift, per selection
        (the keys are int32 bit patterns of non-negative fp32: key_histogram reads them)."""
        keys = got["keys"].view(torch.float32).split(got["sizes"])
        h = key_histogram(list(keys), self.seg_of, lo, hi, shift, self.bins, 1)
        return h[:, :self.bins].reshape(-1).cpu()

    # --------------------------------------------------------------------- finish
    def finish(self, lo, hi, shift, known, below, fh, counts, got):
        S, bins = self.S, self.bins
        t = list(known)
        rank = [self.ks[s] - below[s] for s in range(S)]
        flo, fhi = list(lo), list(hi)
        while True:
            for s in range(S):
                if t[s] is not None or self.ks[s] == 0:
                    continue
                b, before = _bin_of(fh[s], rank[s], 0)
                rank[s] -= before
                flo[s], fhi[s] = flo[s] + (b << shift[s]), min(fhi[s], flo[s] + ((b + 1) << shift[s]))
                if fhi[s] - flo[s] == 1:
                    t[s] = flo[s]
            pending = [s for s in range(S) if t[s] is None and self.ks[s]]
            if not pending:
                break
            shift = [_shift_for(fhi[s] - flo[s], bins) for s in range(S)]
            qlo, qhi = list(flo), list(fhi)
            fh = self.reduce(S * bins, lambda: self.collected_hist(got, qlo, qhi, shift)).view(S, bins).tolist()
        return t, counts

    def fix(self, t) -> torch.Tensor:
        """Set the bits of collected entries above the threshold; the counts' corrections."""
        got = self.got
        thr = [t[s] if t[s] is not None and self.ks[s] else _TOP for s in self.seg_of]
        return window_fix_(self.ring, self.head, got["keys"], got["pos"], got["sizes"], thr).cpu()


def sample_sharded(tensors: Sequence[torch.Tensor], seg_of, ks, Ns, names, ring: torch.Tensor,
                   head: int, coll: Collective, agree=(), before_commit: Callable = None):
    """Sample this rank's mask into ``ring[head]``; (int64 [l] counts summed over ranks,
    fp32 [S] thresholds). ``before_commit`` runs after the mask is complete, before the
    last all-reduce (its failure fails every rank)."""
    step = _Step(tensors, seg_of, ks, Ns, ring, head, coll, agree)
    step.names = list(names)
    active = [Ns[s] for s in range(len(ks)) if ks[s]]
    res = None
    if active and min(active) >= SAMPLE_MIN:
        n = min(active)
        win = step.narrow(16 if n >= 1 << 23 else 8 if n >= 1 << 22 else 4)
        if win is not None:
            res = step.split(*win)
    if res is None:
        res = step.split(*step.narrow(1))
        if res is None:
            raise RuntimeError("worm internal: the exact window missed the k-th key")
    t, counts = res
    return _commit(step, t, counts, before_commit)


def _commit(step, t, counts, before_commit):
    def local():
        corr = step.fix(t)
        if before_commit is not None:
            before_commit()
        return corr

    corr = step.reduce(step.ring.shape[0], local)
    counts = (counts + corr).to(torch.int64)
    counts[step.head] = 0  # the overwritten (oldest) row: no distance is read from it
    thr = torch.tensor([t[s] if t[s] is not None else 0 for s in range(step.S)],
                       dtype=torch.int32).view(torch.float32)
    thr = torch.where(torch.tensor([k == 0 for k in step.ks]), torch.full_like(thr, -math.inf), thr)
    return counts, thr


def kth_smallest(segments, ks, group=None, extra=None, device=None, dtype=torch.int64):
    """The k-th smallest (1-indexed) of each segment's multiset, summed over ``group``.

    ``segments[s]``: this rank's tensors of selection ``s`` (scores: fp32 finite >= 0, or
    any float dtype, scored as ``|w|`` in fp32; may be empty). ``ks[s]``: k over the whole
    (all-rank) segment; 0 gives ``-inf``. ``group=False``: this process alone. Exact
    key-histogram passes of 11 bits (:func:`worm.shard_ops.key_histogram`), each
    all-reduced; ``extra`` (integers) rides along with the first and comes back summed.
    ``dtype`` is accepted for compatibility (the passes count in int64). Returns (fp32
    [S] thresholds, summed extra).
    """
    from .dtensor import world
    S = len(segments)
    tensors = [t for seg in segments for t in seg]
    seg_of = [s for s, seg in enumerate(segments) for _ in seg]
    if not tensors:
        tensors, seg_of = [torch.zeros(0, device=device)], [0]
    if group is False:
        n_ranks = 1
    else:
        n_ranks = world() if group is None else (n_ranks_of(group) or world())
    coll = Collective(None if group is False else group, n_ranks, "kth_smallest")
    bins = 2048
    lo, hi = [0] * S, [_TOP] * S
    extra_n = 0 if extra is None else extra.numel()
    summed = None
    first = True
    while True:
        todo = [s for s in range(S) if ks[s] and hi[s] - lo[s] > 1]
        if not todo and not first:
            break
        qlo = [lo[s] if s in todo else 0 for s in range(S)]
        qhi = [hi[s] if s in todo else 0 for s in range(S)]
        shift = [_shift_for(qhi[s] - qlo[s], bins) for s in range(S)]

        def local():
            h = key_histogram(tensors, seg_of, qlo, qhi, shift, bins, 1).reshape(-1).cpu()
            return torch.cat([h, extra.reshape(-1).cpu().long()]) if first and extra_n else h

        out = coll.reduce(S * (bins + 2) + (extra_n if first else 0), local)
        if first and extra_n:
            summed, out = out[S * (bins + 2):], out[:S * (bins + 2)]
        first = False
        h = out.view(S, bins + 2).tolist()
        for s in todo:
            b, _ = _bin_of(h[s][:bins], ks[s], h[s][bins])
            lo[s], hi[s] = lo[s] + (b << shift[s]), min(hi[s], lo[s] + ((b + 1) << shift[s]))
    thr = torch.tensor(lo, dtype=torch.int32).view(torch.float32)
    thr = torch.where(torch.tensor([k == 0 for k in ks]), torch.full_like(thr, -math.inf), thr)
    if device is not None:
        thr = thr.to(device)
    if summed is not None:
        summed = summed.to(extra.device)
    return thr, summed


def n_ranks_of(group):
    import torch.distributed as dist
    try:
        return dist.get_world_size(group)
    except Exception:  # noqa: BLE001 - not a group of this process
        return None
