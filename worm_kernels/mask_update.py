"""The sampling op: new packed mask into ``window[head]`` and XOR counts, one pass.

Each program owns a run of bytes of one tensor's segment: it reads the 8 entries
behind every byte, packs ``|w| > thr`` LSB-first, reads that byte from every window
row (the old content, padding bits included, exactly as the reference counts them),
popcounts the XOR, and only then overwrites row ``head``; the same program reads and
writes the same bytes, so no ordering across programs is needed. Per-row counts are
flushed with one atomic per row per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

BYTES = 128  # 1024 entries per block
# The most window rows one call takes: each program keeps its per-row counts in
# registers (LP lanes). Only this backend has the limit (worm.ops.max_window).
MAX_WINDOW = 64


@triton.jit(do_not_specialize=["head", "L", "B"])
def _mask_update_kernel(ptr_tab, n_tab, boff_tab, prog_t, prog_s, thr, window, counts,
                        head, L, B, DT: tl.constexpr, NBYTES: tl.constexpr,
                        ITERS: tl.constexpr, LP: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    b0 = tl.load(prog_s + pid)
    ptr = tl.load(ptr_tab + t).to(tl.pointer_type(DT))
    n = tl.load(n_tab + t)
    boff = tl.load(boff_tab + t)
    th = tl.load(thr + t)
    nb = (n + 7) // 8
    rows = tl.arange(0, LP)
    acc = tl.zeros([LP], tl.int64)
    shifts = tl.arange(0, 8)
    B64 = B.to(tl.int64)
    for it in range(ITERS):
        bidx = b0 + it * NBYTES + tl.arange(0, NBYTES).to(tl.int64)
        bm = bidx < nb
        e = bidx[:, None] * 8 + shifts[None, :]
        em = e < n
        x = tl.load(ptr + e, mask=em, other=0.0)
        keep = (tl.abs(x.to(tl.float32)) > th) & em
        new = tl.sum(keep.to(tl.int32) << shifts[None, :], 1)
        where = boff + bidx
        for j in range(L):
            old = tl.load(window + j * B64 + where, mask=bm, other=0).to(tl.int32)
            c = tl.sum(tl.where(bm, C.popcount8(new ^ old), 0), 0)
            acc += tl.where(rows == j, c.to(tl.int64), 0)
        tl.store(window + head * B64 + where, new.to(tl.uint8), mask=bm)
    tl.atomic_add(counts + rows, acc, mask=(rows < L) & (acc != 0))


def _tables(tensors, device):
    numels = [t.numel() for t in tensors]
    nbytes = [(n + 7) // 8 for n in numels]
    boffs, acc = [], 0
    for b in nbytes:
        boffs.append(acc)
        acc += b
    nbyt = C.block_for(device, BYTES * 8) // 8
    iters = C.pick_iters(sum(numels), nbyt * 8)
    pk = C.Packer()
    pk.add("ptr", [t.data_ptr() for t in tensors])
    pk.add("n", numels)
    pk.add("boff", boffs)
    groups = C.add_dtype_groups(pk, [t.dtype for t in tensors], nbytes, nbyt * iters)
    return {"tab": pk.build(device), "iters": iters, "groups": groups, "nbyt": nbyt}


def mask_update_(tensors, thr, window, head):
    """Keep = |w| > thr[i] packed into window[head]; int64 [l] XOR counts per row."""
    device = tensors[0].device
    key = ("mask", device, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    plan = C.cached(key, lambda: _tables(tensors, device))
    tab = plan["tab"]
    L, B = window.shape
    counts = torch.zeros(L, dtype=torch.int64, device=device)
    lp = max(2, triton.next_power_of_2(L))
    with C.launch_ctx(device):
        for dt, nprog in plan["groups"]:
            _mask_update_kernel[(nprog,)](
                tab["ptr"], tab["n"], tab["boff"], tab[f"pt_{dt}"], tab[f"ps_{dt}"], thr,
                window, counts, head, L, B, DT=C.TL_DTYPE[dt], NBYTES=plan["nbyt"],
                ITERS=plan["iters"], LP=lp, num_warps=4)
    return counts


__all__ = ["mask_update_"]
