"""Exact k-th smallest |w| over a set of tensors (global) or per tensor (layer).

Radix select on the fp32 bit pattern of |w| (31 significant bits, digits of 11, 10
and 10 bits): count the top digit, find the bucket holding the k-th key, repeat on
the keys inside it. Everything stays on the device: no sort, no concatenated copy,
no host sync; NaN/Inf are counted per tensor in the first pass (the caller raises).

Two plans:
* small (every segment <= SMALL_LIMIT entries, one dtype): ONE launch, one program
  per segment doing all three passes over its tensors in registers. This is the
  BatchNorm case (20 tensors, ~5k gammas) where launches, not bytes, cost time.
* large: ``zeros`` for the histograms, then one launch per pass with many programs
  per tensor that flush register histograms with atomics, and a tiny final launch.
  Programs of later passes re-derive the chosen buckets from the previous
  histograms themselves, so no separate "scan" launch sits between passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

SMALL_LIMIT = 1 << 16
BLOCK = 1024
# Digits of the key, most significant first: 11 + 10 + 10 bits (constexpr: the
# kernels read them as globals).
NB1, NB2, NB3 = tl.constexpr(2048), tl.constexpr(1024), tl.constexpr(1024)  # bins per pass
SHIFT1, SHIFT2 = tl.constexpr(20), tl.constexpr(10)   # the top digit's and the middle one's
HSTRIDE = tl.constexpr(NB1.value + NB2.value + NB3.value)  # a segment's histograms, end to end
NONFINITE_BIN = tl.constexpr(C.NONFINITE_KEY.value >> SHIFT1.value)  # first top digit of Inf/NaN


@triton.jit
def _find(hist, k, NB: tl.constexpr):
    """Bucket holding the k-th key (1-indexed) and k's rank inside it."""
    c = tl.cumsum(hist, 0)
    idx = tl.sum((c < k).to(tl.int32), 0)
    before = tl.sum(tl.where(tl.arange(0, NB) < idx, hist, 0), 0)
    return idx, k - before


@triton.jit
def _block_hist(ptr, offs, n, prefix, PASS: tl.constexpr, NB: tl.constexpr, DT: tl.constexpr):
    """Histogram (int32 [NB]) of this block's digits among keys matching ``prefix``,
    plus its count of non-finite keys."""
    m = offs < n
    x = tl.load(ptr + offs, mask=m, other=0.0)
    key = C.abs_key(x)
    if PASS == 1:
        sel = m
        d = key >> SHIFT1
    elif PASS == 2:
        sel = m & ((key >> SHIFT1) == prefix)
        d = (key >> SHIFT2) & (NB2 - 1)
    else:
        sel = m & ((key >> SHIFT2) == prefix)
        d = key & (NB3 - 1)
    d = tl.where(sel, d, 0)
    # Unselected lanes land in bin 0; take them back out (portable: no masked histogram).
    dropped = offs.shape[0] - tl.sum(sel.to(tl.int32), 0)
    h = tl.histogram(d, NB) - tl.where(tl.arange(0, NB) == 0, dropped, 0)
    bad = tl.sum((m & (key >= C.NONFINITE_KEY)).to(tl.int32), 0)
    return h, bad


# ------------------------------------------------------------------ small plan
@triton.jit
def _small_pass(ptr_tab, n_tab, nf_out, t0, t1, prefix,
                PASS: tl.constexpr, NB: tl.constexpr, DT: tl.constexpr, BLK: tl.constexpr):
    h = tl.zeros([NB], tl.int32)
    for t in range(t0, t1):
        ptr = tl.load(ptr_tab + t).to(tl.pointer_type(DT))
        n = tl.load(n_tab + t)
        bad = 0
        for s in range(0, n, BLK):
            offs = s + tl.arange(0, BLK).to(tl.int64)
            hb, bb = _block_hist(ptr, offs, n, prefix, PASS, NB, DT)
            h += hb
            bad += bb
        if PASS == 1:
            tl.store(nf_out + t, bad.to(tl.int64))
    return h


@triton.jit
def _select_small_kernel(ptr_tab, n_tab, seg_tab, k_tab, thr_out, nf_out,
                         DT: tl.constexpr, BLK: tl.constexpr):
    s = tl.program_id(0)
    t0 = tl.load(seg_tab + s).to(tl.int32)
    t1 = tl.load(seg_tab + s + 1).to(tl.int32)
    k = tl.load(k_tab + s)
    h1 = _small_pass(ptr_tab, n_tab, nf_out, t0, t1, 0, 1, NB1, DT, BLK)
    b1, k2 = _find(h1, k, NB1)
    h2 = _small_pass(ptr_tab, n_tab, nf_out, t0, t1, b1, 2, NB2, DT, BLK)
    b2, k3 = _find(h2, k2, NB2)
    p2 = (b1 << SHIFT2) | b2
    h3 = _small_pass(ptr_tab, n_tab, nf_out, t0, t1, p2, 3, NB3, DT, BLK)
    b3, _k = _find(h3, k3, NB3)
    nonfinite = tl.sum(tl.where(tl.arange(0, NB1) >= NONFINITE_BIN, h1, 0), 0)
    thr = ((p2 << SHIFT2) | b3).to(tl.int32).to(tl.float32, bitcast=True)
    thr = tl.where(k == 0, float("-inf"), thr)
    thr = tl.where(nonfinite > 0, float("nan"), thr)
    for t in range(t0, t1):
        tl.store(thr_out + t, thr)


# ------------------------------------------------------------------ large plan
@triton.jit
def _prefix(hist_seg, k, PASS: tl.constexpr):
    """Re-derive the buckets chosen by earlier passes from their histograms."""
    if PASS == 1:
        return 0, k
    h1 = tl.load(hist_seg + tl.arange(0, NB1))
    b1, k2 = _find(h1, k, NB1)
    if PASS == 2:
        return b1, k2
    h2 = tl.load(hist_seg + NB1 + tl.arange(0, NB2))
    b2, k3 = _find(h2, k2, NB2)
    return (b1 << SHIFT2) | b2, k3


@triton.jit
def _select_pass_kernel(ptr_tab, n_tab, segof_tab, k_tab, prog_t, prog_s, hist, nf_out,
                        PASS: tl.constexpr, NB: tl.constexpr, HOFF: tl.constexpr,
                        DT: tl.constexpr, BLK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    start = tl.load(prog_s + pid)
    seg = tl.load(segof_tab + t)
    k = tl.load(k_tab + seg)
    hist_seg = hist + seg * HSTRIDE
    prefix, _k = _prefix(hist_seg, k, PASS)
    ptr = tl.load(ptr_tab + t).to(tl.pointer_type(DT))
    n = tl.load(n_tab + t)
    h = tl.zeros([NB], tl.int32)
    bad = 0
    for it in range(ITERS):
        offs = start + it * BLK + tl.arange(0, BLK).to(tl.int64)
        hb, bb = _block_hist(ptr, offs, n, prefix, PASS, NB, DT)
        h += hb
        bad += bb
    bins = tl.arange(0, NB)
    tl.atomic_add(hist_seg + HOFF + bins, h.to(tl.int64), mask=h != 0)
    if PASS == 1:
        if bad != 0:
            tl.atomic_add(nf_out + t, bad.to(tl.int64))


@triton.jit
def _select_final_kernel(segof_tab, k_tab, hist, thr_out):
    t = tl.program_id(0)
    seg = tl.load(segof_tab + t)
    k = tl.load(k_tab + seg)
    hist_seg = hist + seg * HSTRIDE
    p2, k3 = _prefix(hist_seg, k, 3)
    h3 = tl.load(hist_seg + NB1 + NB2 + tl.arange(0, NB3))
    b3, _k = _find(h3, k3, NB3)
    h1 = tl.load(hist_seg + tl.arange(0, NB1))
    nonfinite = tl.sum(tl.where(tl.arange(0, NB1) >= NONFINITE_BIN, h1, 0), 0)
    thr = ((p2 << SHIFT2) | b3).to(tl.int32).to(tl.float32, bitcast=True)
    thr = tl.where(k == 0, float("-inf"), thr)
    thr = tl.where(nonfinite > 0, float("nan"), thr)
    tl.store(thr_out + t, thr)


# ------------------------------------------------------------------ host side
def _tables(tensors, ks, scope, device):
    numels = [t.numel() for t in tensors]
    T = len(tensors)
    if scope == "global":
        seg_bounds, segof, seg_sizes = [0, T], [0] * T, [sum(numels)]
    else:
        seg_bounds, segof, seg_sizes = list(range(T + 1)), list(range(T)), numels
    dtypes = {t.dtype for t in tensors}
    small = len(dtypes) == 1 and max(seg_sizes) <= SMALL_LIMIT
    pk = C.Packer()
    pk.add("ptr", [t.data_ptr() for t in tensors])
    pk.add("n", numels)
    pk.add("k", ks)
    plan = {"small": small, "S": len(seg_sizes), "T": T}
    if small:
        pk.add("seg", seg_bounds)
        plan["dtype"] = tensors[0].dtype
    else:
        pk.add("segof", segof)
        blk = C.block_for(device, BLOCK)
        iters = C.pick_iters(sum(numels), blk)
        plan["iters"], plan["blk"] = iters, blk
        plan["groups"] = C.add_dtype_groups(pk, [t.dtype for t in tensors], numels, blk * iters)
    plan["tab"] = pk.build(device)
    return plan


def select_thresholds(tensors, ks, scope):
    """(thr fp32 [T], nonfinite int64 [T]); see the module docstring."""
    device = tensors[0].device
    key = ("sel", scope, tuple(ks), device,
           tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    plan = C.cached(key, lambda: _tables(tensors, ks, scope, device))
    tab, T, S = plan["tab"], plan["T"], plan["S"]
    thr = torch.empty(T, dtype=torch.float32, device=device)
    with C.launch_ctx(device):
        if plan["small"]:
            nf = torch.empty(T, dtype=torch.int64, device=device)
            _select_small_kernel[(S,)](tab["ptr"], tab["n"], tab["seg"], tab["k"], thr, nf,
                                       DT=C.TL_DTYPE[plan["dtype"]], BLK=BLOCK, num_warps=4)
            if S > 1:  # NaN/Inf in any segment: every threshold is NaN, as in the reference
                thr.masked_fill_(nf.sum() > 0, float("nan"))
            return thr, nf
        Tp = T + (T % 2)  # keep the histograms 16-byte aligned
        scratch = torch.zeros(Tp + S * HSTRIDE.value, dtype=torch.int64, device=device)
        nf, hist = scratch[:T], scratch[Tp:]
        nb1, nb2, nb3 = NB1.value, NB2.value, NB3.value
        for p, nb, hoff in ((1, nb1, 0), (2, nb2, nb1), (3, nb3, nb1 + nb2)):
            for dt, nprog in plan["groups"]:
                _select_pass_kernel[(nprog,)](
                    tab["ptr"], tab["n"], tab["segof"], tab["k"], tab[f"pt_{dt}"],
                    tab[f"ps_{dt}"], hist, nf, PASS=p, NB=nb, HOFF=hoff,
                    DT=C.TL_DTYPE[dt], BLK=plan["blk"], ITERS=plan["iters"], num_warps=8)
        _select_final_kernel[(T,)](tab["segof"], tab["k"], hist, thr, num_warps=4)
        if S > 1:  # NaN/Inf in any segment: every threshold is NaN, as in the reference
            thr.masked_fill_(nf.sum() > 0, float("nan"))
    return thr, nf


__all__ = ["select_thresholds"]
