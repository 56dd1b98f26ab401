"""One fused WormSGD step over many parameters: truncation, then torch.optim.SGD.

Reads param, grad, momentum buffer and packed keep bits once, writes param and buffer
once; grads are untouched. The math is fp32, but every intermediate is rounded to the
parameter dtype exactly where torch's op-by-op SGD rounds (each ``add``/``mul`` of the
reference ends in a tensor of that dtype), so bf16/fp16 follow the same rounding path.

Tolerance against ``worm.reference.sgd_step_`` (python/worm/ops/sgd_step.py): fp32 is bitwise except where an
``a + alpha * b`` is contracted to an FMA on one side and not the other (torch's CPU
vector kernels use fmadd; the Triton interpreter never fuses; Triton on CUDA may):
then 1 ulp of the result. bf16/fp16: at most 1 ulp of the param dtype per step (the
same FMA question, seen through one more rounding). ``r == 1`` skips truncation
entirely, so it is exactly the untruncated step.

The scalars (lr, weight decay, momentum, dampening, r) stay fp32, as in ATen's CUDA
kernels (opmath), so on CUDA this is torch's CUDA SGD rounding. ATen's CPU vector loop
rounds ``alpha`` to the parameter dtype first (its scalar tail does not); against
torch.optim.SGD on CPU (for-loop or foreach) a bf16/fp16 step therefore stays within
1 ulp of the dtype at the operand scale, the bound torch's own foreach and for-loop
paths keep between each other (tests/ops/test_sgd_step.py; measured: bench/README.md).

Scalars (lr, r, weight decay, momentum, dampening) are runtime arguments: changing
them never recompiles. The flags (momentum on, nesterov, maximize, weight decay on)
are compile-time, fixed for an optimizer's life.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common as C

BLOCK = 1024
# Per-tensor flags in the table.
_INIT = tl.constexpr(1)   # a fresh buffer: write the clone of the (truncated, decayed) grad
_TRUNC = tl.constexpr(2)  # this param has keep bits


@triton.jit
def _sgd_kernel(p_tab, g_tab, m_tab, b_tab, n_tab, f_tab, prog_t, prog_s,
                r, lr, wd, mom, one_minus_damp,
                DT: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DO_TRUNC: tl.constexpr,
                BLK: tl.constexpr, ITERS: tl.constexpr, EMU: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    start = tl.load(prog_s + pid)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(DT))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(DT))
    n = tl.load(n_tab + t)
    flags = tl.load(f_tab + t)
    rr = tl.cast(r, tl.float32)
    neg_lr = -tl.cast(lr, tl.float32)
    wd = tl.cast(wd, tl.float32)
    mom = tl.cast(mom, tl.float32)
    one_minus_damp = tl.cast(one_minus_damp, tl.float32)
    for it in range(ITERS):
        e = start + it * BLK + tl.arange(0, BLK).to(tl.int64)
        m = e < n
        g = tl.load(g_ptr + e, mask=m, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + e, mask=m, other=0.0).to(tl.float32)
        if DO_TRUNC:
            if (flags & _TRUNC) != 0:
                b_ptr = tl.load(b_tab + t).to(tl.pointer_type(tl.uint8))
                byte = tl.load(b_ptr + (e >> 3), mask=m, other=0).to(tl.int32)
                keep = ((byte >> (e & 7).to(tl.int32)) & 1) != 0
                g = tl.where(keep, g, C.round_to(g * rr, DT))
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            g = C.round_to(C.fma(p, wd, g, EMU), DT)
        if HAS_MOM:
            m_ptr = tl.load(m_tab + t).to(tl.pointer_type(DT))
            if (flags & _INIT) != 0:
                buf = g
            else:
                buf = tl.load(m_ptr + e, mask=m, other=0.0).to(tl.float32)
                buf = C.round_to(buf * mom, DT)
                buf = C.round_to(C.fma(g, one_minus_damp, buf, EMU), DT)
            tl.store(m_ptr + e, buf.to(DT), mask=m)
            if NESTEROV:
                g = C.round_to(C.fma(buf, mom, g, EMU), DT)
            else:
                g = buf
        p = C.round_to(C.fma(g, neg_lr, p, EMU), DT)
        tl.store(p_ptr + e, p.to(DT), mask=m)


def _tables(params, grads, bufs, bits, flags, device):
    numels = [p.numel() for p in params]
    pk = C.Packer()
    pk.add("p", [p.data_ptr() for p in params])
    pk.add("g", [g.data_ptr() for g in grads])
    pk.add("m", [b.data_ptr() if b is not None else 0 for b in bufs])
    pk.add("b", [b.data_ptr() if b is not None else 0 for b in bits])
    pk.add("n", numels)
    pk.add("f", flags)
    blk = C.block_for(device, BLOCK)
    iters = C.pick_iters(sum(numels), blk)
    groups = C.add_dtype_groups(pk, [p.dtype for p in params], numels, blk * iters)
    return {"tab": pk.build(device), "iters": iters, "groups": groups, "blk": blk}


def sgd_step_(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
              momentum, dampening, nesterov, maximize):
    """One fused step in the op's signature: buffers allocated by the caller (none when
    momentum == 0), ``fresh[i]`` set where this step initialises buffer i."""
    device = params[0].device
    r = float(r)
    bits = list(keep_bits)
    do_trunc = r != 1.0 and any(b is not None for b in bits)
    has_mom = momentum != 0
    bufs = list(momentum_buffers) if has_mom else [None] * len(params)
    fresh = list(fresh) if has_mom else [0] * len(params)
    flags = [(_INIT.value if f else 0) | (_TRUNC.value if kb is not None else 0)
             for f, kb in zip(fresh, bits)]
    key = ("sgd", device, has_mom, tuple(flags),
           tuple((p.data_ptr(), g.data_ptr(), p.numel(), p.dtype,
                  b.data_ptr() if b is not None else 0,
                  kb.data_ptr() if kb is not None else 0)
                 for p, g, b, kb in zip(params, grads, bufs, bits)))
    plan = C.cached(key, lambda: _tables(params, grads, bufs, bits, flags, device))
    tab = plan["tab"]
    with C.launch_ctx(device):
        for dt, nprog in plan["groups"]:
            _sgd_kernel[(nprog,)](
                tab["p"], tab["g"], tab["m"], tab["b"], tab["n"], tab["f"],
                tab[f"pt_{dt}"], tab[f"ps_{dt}"],
                r, float(lr), float(weight_decay), float(momentum), float(1 - dampening),
                DT=C.TL_DTYPE[dt], HAS_WD=weight_decay != 0, HAS_MOM=has_mom,
                NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), DO_TRUNC=do_trunc,
                BLK=plan["blk"], ITERS=plan["iters"], EMU=device.type != "cuda",
                num_warps=4)


__all__ = ["sgd_step_"]
