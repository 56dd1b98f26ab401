"""``sgd_step_`` through every implementation against the reference
(``worm.reference.sgd_step_``, the op's own signature) and torch.optim.SGD.

Tolerances: the SGD step rounds to the dtype after every op as
torch.optim.SGD's single-tensor path does (the reference), with fused multiply-adds
where ATen fuses them. fp32: at most 1 ulp per entry, and bitwise where the
implementation fuses exactly as ATen does (the reference; Triton's interpreter, which
emulates the fused add; C++ on an AVX2/AVX512 CPU). bf16/fp16: at most 1 ulp of the
dtype *at the scale of the operands* (2^-7 resp. 2^-10 times |old| + |new| + |grad|,
plus |buffer| for the parameter): ATen itself rounds ``alpha`` to the dtype in its
vectorised loop but not in its scalar tail, so the reference is only defined to that
precision. Each step is compared from the reference's state (ours is re-synced after
the check), so the bound is per step, over 4 steps with evolving momentum buffers.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import op_cases as C
from impl_cases import DEV, IMPLS, INTERPRETED, assert_same, keep_bits, with_impls
from worm import ops
from worm import reference as R
from worm.ops.sgd_step import with_optional_buffers


def ref_sgd_step(params, grads, bufs, bits, **kw):
    """The reference (the op's signature) called as the wrapper calls the op: None
    buffers allocated and flagged fresh; returns the buffers."""
    return with_optional_buffers(R.sgd_step_, params, grads, list(bufs), bits, **kw)


def _ordered(x):
    """Integers in the order of the floats (sign-magnitude to two's complement)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    i = x.view(bits[x.dtype]).long()
    top = 1 << (8 * x.element_size() - 1)
    return torch.where(i < 0, -(i + top), i)


def max_ulps(a, b):
    return int((_ordered(a) - _ordered(b)).abs().max()) if a.numel() else 0


_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # 1 ulp in [1, 2)


def assert_close_step(got, want, old, grad, what):
    """The documented per-step tolerance (module docstring)."""
    got, want = got.cpu(), want.cpu()
    if got.dtype == torch.float32:
        u = max_ulps(got, want)
        assert u <= 1, (what, f"{u} ulp")
        return
    scale = want.float().abs() + old.cpu().float().abs() + grad.cpu().float().abs()
    bad = (got.float() - want.float()).abs() > _EPS[got.dtype] * scale
    assert not bad.any(), (what, got[bad][:4], want[bad][:4])


def _fused_cpu():
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "default")


def _bitwise_fp32(impl):
    """Whether fp32 steps must equal the reference bit for bit (module docstring)."""
    return impl == "reference" or (DEV == "cpu" and (impl == "triton" or _fused_cpu()))


HYPER = list(itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True)))
STEPS = [(0.1, 3e-3), (0.05, 0.5), (0.2, 1.0), (0.01, 0.0)]  # (lr, r): r = 1 and r = 0 too


@with_impls()
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("given_bufs", [False, True], ids=["new_bufs", "given_bufs"])
def test_sgd_step_matches_reference(impl, dtype, given_bufs):
    exact = total = 0
    sizes = (1, 31, 257) if impl == "triton" and INTERPRETED else (1, 8, 31, 257, 4097)
    for h, (mom, damp, nest, wd, maxi) in enumerate(HYPER):
        g = torch.Generator().manual_seed(h)
        ref_params = [torch.randn(n, generator=g).to(dtype).to(DEV) for n in sizes]
        bits = keep_bits(ref_params, seed=9, none_every=3)
        ref_bufs = ([torch.randn(p.shape, generator=g).to(dtype).to(DEV) for p in ref_params]
                    if given_bufs and mom != 0 else [None] * len(ref_params))
        for step, (lr, r) in enumerate(STEPS):
            params = [p.clone() for p in ref_params]
            bufs = [None if b is None else b.clone() for b in ref_bufs]
            old_p = [p.clone() for p in params]
            old_b = [None if b is None else b.clone() for b in bufs]
            grads = [torch.randn(p.shape, generator=g).to(dtype).to(DEV) for p in params]
            grads_before = [x.clone() for x in grads]
            kw = dict(r=r, lr=lr, weight_decay=wd, momentum=mom, dampening=damp, nesterov=nest,
                      maximize=maxi)
            ref_bufs = ref_sgd_step(ref_params, grads, ref_bufs, bits, **kw)
            bufs = ops.sgd_step_(params, grads, bufs, bits, **kw)
            for x, x0 in zip(grads, grads_before):
                assert torch.equal(x, x0), "grads must be left unmodified"
            case = (mom, damp, nest, wd, maxi, lr, r, step)
            for p, q, p0, x, rb in zip(params, ref_params, old_p, grads, ref_bufs):
                scale = x.float().abs() + (0 if rb is None else rb.float().abs())
                assert_close_step(p, q, p0, scale, (case, "param"))
                exact += int((p == q).sum())
                total += p.numel()
            for b, rb, b0, x in zip(bufs, ref_bufs, old_b, grads):
                assert (b is None) == (rb is None), case
                if b is not None:
                    assert b.dtype == dtype and b.is_contiguous()
                    assert_close_step(b, rb, rb if b0 is None else b0, x, (case, "buf"))
    if dtype == torch.float32 and _bitwise_fp32(impl):
        assert exact == total, f"fp32 expected bitwise: {exact} of {total} entries equal"


@with_impls(heavy=True)
def test_sgd_step_a_million_entries(impl):
    g = torch.Generator().manual_seed(2)
    p = torch.randn(1000003, generator=g).to(DEV)
    want, bufs, wbufs = p.cpu().clone(), [None], [None]
    bits = keep_bits([p], 0)
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    for lr, r in ((0.1, 3e-3), (0.05, 0.1)):
        x = torch.randn(p.shape, generator=g).to(DEV)
        bufs = ops.sgd_step_([p], [x], bufs, bits, r=r, lr=lr, **hp)
        wbufs = ref_sgd_step([want], [x.cpu()], wbufs, [bits[0].cpu()], r=r, lr=lr, **hp)
        assert max_ulps(p.cpu(), want) <= 1 and max_ulps(bufs[0].cpu(), wbufs[0]) <= 1
        if _bitwise_fp32(impl):
            assert torch.equal(p.cpu(), want) and torch.equal(bufs[0].cpu(), wbufs[0])


@with_impls()
def test_sgd_step_mixed_dtypes_in_one_call(impl):
    g = torch.Generator().manual_seed(8)
    ps = [torch.randn(33, generator=g).to(dt).to(DEV) for dt in C.DTYPES]
    gs = [torch.randn(33, generator=g).to(p.dtype).to(DEV) for p in ps]
    want = [p.cpu().clone() for p in ps]
    bits = keep_bits(ps, 3)
    hp = dict(r=3e-3, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
              maximize=False)
    bufs = ops.sgd_step_(ps, gs, [None] * 3, bits, **hp)
    wbufs = ref_sgd_step(want, [x.cpu() for x in gs], [None] * 3, [b.cpu() for b in bits], **hp)
    for p, w, b, wb, x in zip(ps, want, bufs, wbufs, gs):
        assert b.dtype == p.dtype
        assert_close_step(p.cpu(), w, w, x.cpu().float().abs() + wb.float().abs(), p.dtype)


@with_impls()
def test_sgd_step_r1_is_torch_sgd(impl):
    """r == 1 is exactly the untruncated step, and torch.optim.SGD's (bitwise in fp32
    where the implementation fuses as ATen does)."""
    g = torch.Generator().manual_seed(4)
    p0 = [torch.randn(n, generator=g).to(DEV) for n in (31, 4097)]
    grads = [[torch.randn(p.shape, generator=g).to(DEV) for p in p0] for _ in range(3)]
    hp = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
    bits = keep_bits(p0, 1)
    a, b = [p.clone() for p in p0], [p.clone() for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = torch.optim.SGD(ref, lr=0.1, foreach=False, **hp)
    ba, bb = [None, None], [None, None]
    for gs in grads:
        ba = ops.sgd_step_(a, gs, ba, bits, r=1.0, lr=0.1, **hp)
        bb = ops.sgd_step_(b, gs, bb, [None, None], r=0.5, lr=0.1, **hp)
        for q, x in zip(ref, gs):
            q.grad = x.clone()
        opt.step()
    for x, y, q in zip(a, b, ref):
        assert_same(x, y, "r=1 vs no truncation")
        assert max_ulps(x.cpu(), q.detach().cpu()) <= 1
        if _bitwise_fp32(impl):
            assert torch.equal(x, q.detach())


def _n_compiled(fn):
    """Compiled variants of a @triton.jit function (triton < 3 keeps `cache`, later
    versions `device_caches[device][0]`)."""
    if hasattr(fn, "cache"):
        return sum(len(v) for v in fn.cache.values())
    return sum(len(v[0]) for v in fn.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in IMPLS,
                    reason="compiled Triton kernels need CUDA")
def test_triton_no_recompile_on_lr_r_head(monkeypatch):
    from worm_kernels import mask_update as M, sgd_step as S
    monkeypatch.setenv("WORM_BACKEND", "triton")
    ps = [torch.randn(100, device="cuda")]
    gs = [torch.randn(100, device="cuda")]
    bits = keep_bits(ps, 0)
    kw = dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    bufs = ops.sgd_step_(ps, gs, [None], bits, r=0.1, lr=0.1, **kw)
    bufs = ops.sgd_step_(ps, gs, bufs, bits, r=0.1, lr=0.1, **kw)
    n0 = _n_compiled(S._sgd_kernel)
    for lr, r in [(0.2, 0.3), (1e-3, 3e-3), (1.0, 0.0)]:
        bufs = ops.sgd_step_(ps, gs, bufs, bits, r=r, lr=lr, **kw)
    assert _n_compiled(S._sgd_kernel) == n0
    thr = torch.zeros(1, device="cuda")
    win = torch.zeros(5, 13, dtype=torch.uint8, device="cuda")
    ops.mask_update_(ps, thr, win, 0)
    m0 = _n_compiled(M._mask_update_kernel)
    for h in range(1, 5):
        ops.mask_update_(ps, thr, win, h)
    assert _n_compiled(M._mask_update_kernel) == m0


@with_impls()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sgd_step_16bit_within_torch_sgds_own_bound(impl, dtype):
    """bf16/fp16 against torch.optim.SGD itself, for-loop and foreach: within 1 ulp of the
    dtype at the operand scale (assert_close_step). The Triton kernels keep lr and the
    other scalars in fp32, as ATen's CUDA kernels do (opmath); ATen's CPU vector loop
    rounds alpha to the dtype first, so on CPU the two differ inside this bound, the
    bound torch's own foreach and for-loop paths keep between each other (checked too)."""
    n = 257 if impl == "triton" and INTERPRETED else 4097
    for mom, nest, wd, maxi in ((0.0, False, 0.0, False), (0.9, False, 1e-2, True),
                                (0.9, True, 1e-2, False)):
        g = torch.Generator().manual_seed(int(mom * 10) + nest)
        p0 = torch.randn(n, generator=g).to(dtype).to(DEV)
        hp = dict(momentum=mom, nesterov=nest, weight_decay=wd, maximize=maxi, dampening=0.0)
        torch_ps = {fe: torch.nn.Parameter(p0.clone()) for fe in (False, True)}
        opts = {fe: torch.optim.SGD([q], lr=0.1, foreach=fe, **hp) for fe, q in torch_ps.items()}
        for step in range(3):
            x = torch.randn(n, generator=g).to(dtype).to(DEV)
            q = torch_ps[False]
            old = q.detach().clone()
            old_buf = opts[False].state[q].get("momentum_buffer")
            old_buf = None if old_buf is None else old_buf.clone()
            ours = old.clone()
            ops.sgd_step_([ours], [x], [None if old_buf is None else old_buf.clone()], [None],
                          r=1.0, lr=0.1, **hp)
            for fe, qq in torch_ps.items():
                with torch.no_grad():
                    qq.copy_(old)  # each from the same state: the bound is per step
                    if old_buf is not None:
                        opts[fe].state[qq]["momentum_buffer"] = old_buf.clone()
                qq.grad = x.clone()
                opts[fe].step()
            scale = x.float().abs() + (0 if old_buf is None else old_buf.float().abs())
            for fe, qq in torch_ps.items():
                assert_close_step(ours, qq.detach(), old, scale, (impl, mom, nest, step, fe))
            assert_close_step(torch_ps[True].detach(), q.detach(), old, scale, ("torch", step))
