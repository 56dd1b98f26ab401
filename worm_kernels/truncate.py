"""Multi-tensor gradient truncation in place: ``g *= keep ? 1 : r``.

Bit-exact with the reference: the product ``g * r`` is formed in fp32 (``r`` an fp32
scalar) and rounded once to the gradient's dtype, with round-to-nearest-even done in
integer ops (see ``_common.round_to``). Kept entries are not rewritten at all.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common as C

BLOCK = 1024


@triton.jit
def _truncate_kernel(g_tab, bits_tab, n_tab, prog_t, prog_s, r,
                     DT: tl.constexpr, BLK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    start = tl.load(prog_s + pid)
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(DT))
    b_ptr = tl.load(bits_tab + t).to(tl.pointer_type(tl.uint8))
    n = tl.load(n_tab + t)
    rr = tl.cast(r, tl.float32)
    for it in range(ITERS):
        e = start + it * BLK + tl.arange(0, BLK).to(tl.int64)
        m = e < n
        byte = tl.load(b_ptr + (e >> 3), mask=m, other=0).to(tl.int32)
        drop = m & (((byte >> (e & 7).to(tl.int32)) & 1) == 0)
        g = tl.load(g_ptr + e, mask=drop, other=0.0).to(tl.float32)
        tl.store(g_ptr + e, C.round_to(g * rr, DT).to(DT), mask=drop)


def _tables(grads, bits, device):
    pk = C.Packer()
    pk.add("g", [g.data_ptr() for g in grads])
    pk.add("b", [b.data_ptr() for b in bits])
    numels = [g.numel() for g in grads]
    pk.add("n", numels)
    blk = C.block_for(device, BLOCK)
    iters = C.pick_iters(sum(numels), blk)
    groups = C.add_dtype_groups(pk, [g.dtype for g in grads], numels, blk * iters)
    return {"tab": pk.build(device), "iters": iters, "groups": groups, "blk": blk}


def truncate_(grads, keep_bits, r):
    """In place, for every i: grads[i] *= (keep ? 1 : r), keep from keep_bits[i]."""
    device = grads[0].device
    r = float(r)
    if r == 1.0:
        return None
    key = ("trunc", device, tuple((g.data_ptr(), g.numel(), g.dtype, b.data_ptr())
                                  for g, b in zip(grads, keep_bits)))
    plan = C.cached(key, lambda: _tables(grads, keep_bits, device))
    tab = plan["tab"]
    with C.launch_ctx(device):
        for dt, nprog in plan["groups"]:
            _truncate_kernel[(nprog,)](tab["g"], tab["b"], tab["n"], tab[f"pt_{dt}"],
                                       tab[f"ps_{dt}"], r, DT=C.TL_DTYPE[dt], BLK=plan["blk"],
                                       ITERS=plan["iters"], num_warps=4)
    return None


__all__ = ["truncate_"]
