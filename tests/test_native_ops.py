"""The native ops (worm._C: C++ on CPU, CUDA on GPUs) against worm.reference.

Cases come from tests/op_cases.py, shared with the Triton tests.
Tolerances: thresholds, nonfinite counts, packed bytes, XOR counts and truncated
gradients must be equal exactly. The SGD step rounds to the dtype after every op as
torch.optim.SGD's single-tensor path does (the reference), with fused multiply-adds
where ATen fuses them. fp32: at most 1 ulp per entry (bitwise on an AVX2/FMA CPU,
where ATen fuses every `add(alpha=)`; the 1 ulp covers CPUs where it does not).
bf16/fp16: at most 1 ulp of the dtype *at the scale of the operands*
(2^-7 resp. 2^-10, the ulp of 1, times |old| + |new| + |grad|, plus |buffer|
for the parameter): ATen itself rounds `alpha` to the
dtype in its vectorised loop but not in its scalar tail, so the reference is only
defined to that precision, and an update that cancels (p - lr*g ~ 0) cannot be held
to ulps of the tiny result. Each step is compared from the reference's state (ours is
re-synced after the check) so the bound is per step, over 4 consecutive steps with
evolving momentum buffers.
"""
from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

import op_cases as C
from worm import reference as R

try:
    from worm import _native
    _BE = _native.backend("cpp")
    _WHY = None
except (ImportError, RuntimeError) as e:  # not built: every op test skips, one test fails
    _native, _BE, _WHY = None, None, str(e)

needs_native = pytest.mark.skipif(_BE is None, reason=f"worm._C not built: {_WHY}")

DEVICES = ["cpu"]
if _BE is not None and torch.cuda.is_available() and _native.with_cuda():
    DEVICES.append("cuda")


def test_extension_is_built_where_it_can_be():
    """CI must not silently lose the native backend."""
    if os.environ.get("WORM_NO_NATIVE", "").strip() in ("1", "true", "yes"):
        pytest.skip("WORM_NO_NATIVE set: the native build was switched off on purpose")
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        pytest.skip("no C++ compiler: the native extension cannot be built here")
    assert _BE is not None, f"a C++ compiler is present but worm._C is unusable: {_WHY}"


def _ks(tensors, p, scope):
    if scope == "global":
        return [R.num_pruned(sum(t.numel() for t in tensors), p)]
    return [R.num_pruned(t.numel(), p) for t in tensors]


def _ratios(kind, tensors):
    if kind in C.LARGE_KINDS:
        return (0.5,) + tuple(C.k_edge_ratios(tensors)[1:2])
    return tuple(C.RATIOS) + tuple(C.k_edge_ratios(tensors))


# ------------------------------------------------------------------ thresholds
@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("kind", C.KINDS)
def test_select_thresholds_exact(kind, dtype, scope, device):
    ts = C.make(kind, dtype, device)
    for p in _ratios(kind, ts):
        ks = _ks(ts, p, scope)
        thr, nonfinite = _BE.select_thresholds(ts, ks, scope)
        want = R.thresholds(ts, p, scope).to(device)
        assert thr.dtype == torch.float32 and thr.shape == (len(ts),)
        assert torch.equal(thr, want), (kind, p, scope, thr, want)
        assert torch.equal(nonfinite.cpu(), torch.zeros(len(ts), dtype=torch.int64))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_select_thresholds_two_pass_plan(dtype):
    # sets of >= 2**22 entries take the two-pass plan (64 Ki-bin first digit)
    g = torch.Generator().manual_seed(7)
    big = torch.randn(4_194_311, generator=g).to(dtype)
    big[:1000] = 0.5  # ties at a value near the middle
    ts = [big, torch.randn(333, generator=g).to(dtype)]
    for scope in ("global", "layer"):
        for p in (0.5, 0.9, 1 / sum(t.numel() for t in ts)):
            thr, _ = _BE.select_thresholds(ts, _ks(ts, p, scope), scope)
            want = R.thresholds(ts, p, scope)
            assert torch.equal(thr, want), (dtype, scope, p, thr, want)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_select_thresholds_edge_ks_per_tensor(dtype, scope, device):
    """k = 0, 1 and n for each tensor in layer scope (and the set in global scope)."""
    ts = C.make("many_small", dtype, device, seed=3)
    for pick in (lambda n: 0, lambda n: 1, lambda n: n - 1, lambda n: n):
        ks = ([pick(sum(t.numel() for t in ts))] if scope == "global"
              else [pick(t.numel()) for t in ts])
        thr, _ = _BE.select_thresholds(ts, ks, scope)
        flat = [t.float().abs().reshape(-1).cpu() for t in ts]
        if scope == "global":
            flat = [torch.cat(flat)] * len(ts)
            ks = ks * len(ts)
        want = torch.stack([torch.tensor(float("-inf")) if k == 0 else torch.kthvalue(f, k).values
                            for f, k in zip(flat, ks)])
        assert torch.equal(thr.cpu(), want)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_select_thresholds_counts_nonfinite(dtype, device):
    ts = C.make("many_small", dtype, device, seed=1)
    ts[2][1] = float("nan")
    ts[5][0] = float("inf")
    ts[5][3] = float("-inf")
    for scope in ("global", "layer"):
        thr, nonfinite = _BE.select_thresholds(ts, _ks(ts, 0.5, scope), scope)
        want = torch.zeros(len(ts), dtype=torch.int64)
        want[2], want[5] = 1, 2
        assert torch.equal(nonfinite.cpu(), want)
        assert torch.isnan(thr).all()


@needs_native
def test_select_thresholds_rejects_bad_k():
    ts = C.make("n31")
    with pytest.raises(RuntimeError, match="k=32"):
        _BE.select_thresholds(ts, [32], "global")
    with pytest.raises(RuntimeError, match="one k per tensor"):
        _BE.select_thresholds(ts + ts, [1], "layer")
    with pytest.raises(RuntimeError, match="scope"):
        _BE.select_thresholds(ts, [1], "model")


# ----------------------------------------------------------------- mask update
def _window(nbytes, length, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length, nbytes), generator=g, dtype=torch.uint8).to(device)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("kind", C.KINDS)
def test_mask_update_exact(kind, dtype, scope, device):
    ts = C.make(kind, dtype, device)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    lengths = (1, 3) if kind in C.LARGE_KINDS else (1, 2, 3, 4, 5)
    for p in _ratios(kind, ts)[:3]:
        thr = R.thresholds(ts, p, scope).to(device)
        for length in lengths:
            for head in sorted({0, length // 2, length - 1}):
                win = _window(nbytes, length, seed=length * 7 + head, device=device)
                want_win = win.clone()
                want = R.mask_update_(ts, thr, want_win, head)
                got = _BE.mask_update_(ts, thr, win, head)
                assert got.dtype == torch.int64
                assert torch.equal(win, want_win), (kind, p, length, head)
                assert torch.equal(got.cpu(), want.cpu()), (kind, p, length, head)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_mask_update_thresholds_at_the_edges(device):
    """-inf keeps all, +inf and NaN thresholds keep none, ties at thr are pruned."""
    ts = C.make("half_ties", torch.float32, device) + C.make("many_small", torch.bfloat16, device)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for v in (float("-inf"), float("inf"), float("nan"), 0.25, 0.0):
        thr = torch.full((len(ts),), v, device=device)
        win, want_win = (_window(nbytes, 2, 5, device) for _ in range(2))
        want = R.mask_update_(ts, thr, want_win, 1)
        got = _BE.mask_update_(ts, thr, win, 1)
        assert torch.equal(win, want_win) and torch.equal(got.cpu(), want.cpu()), v


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mask_update_16bit_every_pattern(dtype):
    """Every finite, infinite and NaN 16-bit pattern against thresholds between them."""
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = t.float().abs()
    thrs = [float("-inf"), 0.0, 1e-30, 6e-8, 1e-5, 0.5, 1.0, 3.0, 65504.0, 70000.0, 1e38, float("inf")]
    thrs += [float(x) for x in vals[vals.isfinite()][::4099]]
    nbytes = R.byte_offsets([t.numel()])[-1]
    for v in thrs:
        for nudge in (v, torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))).item()):
            thr = torch.tensor([nudge])
            win = torch.zeros(1, nbytes, dtype=torch.uint8)
            want_win = win.clone()
            want = R.mask_update_([t], thr, want_win, 0)
            got = _BE.mask_update_([t], thr, win, 0)
            assert torch.equal(win, want_win) and torch.equal(got, want), nudge


@needs_native
def test_mask_update_errors():
    ts = C.make("many_small")
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    thr = R.thresholds(ts, 0.5)
    with pytest.raises(RuntimeError, match="window must be uint8"):
        _BE.mask_update_(ts, thr, torch.zeros(3, nbytes, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="bytes but the tensors' packed mask needs"):
        _BE.mask_update_(ts, thr, torch.zeros(3, nbytes + 1, dtype=torch.uint8), 0)
    with pytest.raises(RuntimeError, match="head 3 is outside"):
        _BE.mask_update_(ts, thr, torch.zeros(3, nbytes, dtype=torch.uint8), 3)
    with pytest.raises(RuntimeError, match="thr must be float32"):
        _BE.mask_update_(ts, thr[:2], torch.zeros(3, nbytes, dtype=torch.uint8), 0)
    with pytest.raises(RuntimeError, match="dtype"):
        _BE.mask_update_([t.double() for t in ts], thr, torch.zeros(3, nbytes, dtype=torch.uint8), 0)


# ------------------------------------------------------------------ truncation
def _keep_bits(tensors, seed, none_every=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(tensors):
        if none_every and i % none_every == 1:
            out.append(None)
            continue
        keep = torch.rand(t.shape, generator=g) < 0.6
        out.append(R.pack([keep]).to(t.device))
    return out


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["one", "n31", "n4097", "many_small", "small_and_large"])
@pytest.mark.parametrize("r", [3e-3, 0.0, 1.0])
def test_truncate_exact(kind, dtype, r, device):
    grads = C.make(kind, dtype, device, seed=11)
    bits = _keep_bits(grads, seed=2)
    want = [g.clone() for g in grads]
    R.truncate_(want, bits, r)
    _BE.truncate_(grads, bits, r)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


@needs_native
def test_truncate_errors():
    grads = C.make("many_small")
    bits = _keep_bits(grads, seed=0)
    bits[3] = bits[3][:-1]
    with pytest.raises(RuntimeError, match=r"keep_bits\[3\] has 1 bytes but grads\[3\] has 9"):
        _BE.truncate_(grads, bits, 0.5)
    bits = _keep_bits(grads, seed=0)
    bits[0] = bits[0].to(torch.int32)
    with pytest.raises(RuntimeError, match="uint8"):
        _BE.truncate_(grads, bits, 0.5)
    # Device mismatch, seen by the CPU kernel itself (a meta tensor would otherwise
    # send the call to the fake kernel).
    bits = _keep_bits(grads, seed=0)
    bits[2] = torch.empty_like(bits[2], device="meta")
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"keep_bits\[2\] is on meta"):
        torch.ops.worm.truncate_.default.redispatch(cpu_only, grads, bits, 0.5)


# ------------------------------------------------------------------------- SGD
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
    if got.dtype == torch.float32:
        u = max_ulps(got, want)
        assert u <= 1, (what, f"{u} ulp")
        return
    scale = want.float().abs() + old.float().abs() + grad.float().abs()
    err = (got.float() - want.float()).abs()
    bad = err > _EPS[got.dtype] * scale
    assert not bad.any(), (what, got[bad][:4], want[bad][:4])


HYPER = list(itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True),
                                (1.0, 3e-3)))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
@pytest.mark.parametrize("given_bufs", [False, True], ids=["new_bufs", "given_bufs"])
def test_sgd_step_matches_reference(dtype, given_bufs, device):
    exact = 0
    total = 0
    for (mom, damp, nest, wd, maxi, r) in HYPER:
        ref_params = C.make("many_small", dtype, device, seed=5) + C.make("n4097", dtype, device, seed=6)
        bits = _keep_bits(ref_params, seed=9, none_every=3)
        if given_bufs and mom != 0:
            ref_bufs = [torch.randn(p.shape).to(dtype).to(device) for p in ref_params]
        else:
            ref_bufs = [None] * len(ref_params)
        for step in range(4):
            params = [p.clone() for p in ref_params]
            bufs = [None if b is None else b.clone() for b in ref_bufs]
            old_p, old_b = [p.clone() for p in params], [None if b is None else b.clone() for b in bufs]
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + i))
                     .to(dtype).to(device) for i, p in enumerate(params)]
            grads_before = [g.clone() for g in grads]
            kw = dict(r=r, lr=0.05, weight_decay=wd, momentum=mom, dampening=damp,
                      nesterov=nest, maximize=maxi)
            ref_bufs = R.sgd_step_(ref_params, grads, ref_bufs, bits, **kw)
            bufs = _BE.sgd_step_(params, grads, bufs, bits, **kw)
            for g, g0 in zip(grads, grads_before):
                assert torch.equal(g, g0), "grads must be left unmodified"
            case = (mom, damp, nest, wd, maxi, r, step)
            for p, q, p0, g, rb in zip(params, ref_params, old_p, grads, ref_bufs):
                scale = g.float().abs() + (0 if rb is None else rb.float().abs())
                assert_close_step(p, q, p0, scale, (case, "param"))
                exact += int((p == q).sum())
                total += p.numel()
            for b, rb, b0, g in zip(bufs, ref_bufs, old_b, grads):
                assert (b is None) == (rb is None), case
                if b is not None:
                    assert_close_step(b, rb, rb if b0 is None else b0, g, (case, "buf"))
    print(f"sgd {dtype} given_bufs={given_bufs}: {exact / total:.6f} of entries bitwise equal")
    if dtype == torch.float32 and _fused_cpu():
        assert exact == total, "fp32 on an AVX2/FMA CPU is expected bitwise"


def _fused_cpu():
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "default")


@needs_native
def test_sgd_step_r1_is_torch_sgd_bitwise_fp32():
    params = C.make("many_small", torch.float32, seed=2) + C.make("n4097", torch.float32, seed=3)
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True, foreach=False)
    bufs = [None] * len(params)
    bits = _keep_bits(params, seed=1)
    for step in range(3):
        grads = [torch.randn(p.shape) for p in params]
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        opt.step()
        bufs = _BE.sgd_step_(params, grads, bufs, bits, r=1.0, lr=0.1, weight_decay=1e-2,
                             momentum=0.9, dampening=0.0, nesterov=True, maximize=False)
        for p, q in zip(params, ref):
            assert max_ulps(p, q.detach()) <= 1
            if _fused_cpu():
                assert torch.equal(p, q.detach())


@needs_native
def test_sgd_step_errors():
    params = C.make("many_small")
    grads = [torch.randn_like(p) for p in params]
    bits = _keep_bits(params, seed=0)
    bits[4] = torch.zeros(100, dtype=torch.uint8)
    kw = dict(r=0.5, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False)
    with pytest.raises(RuntimeError, match=r"keep_bits\[4\] has 100 bytes"):
        _BE.sgd_step_(params, grads, [None] * len(params), bits, **kw)
    grads[1] = grads[1].half()
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        _BE.sgd_step_(params, grads, [None] * len(params), [None] * len(params), **kw)


# ---------------------------------------------------------------------- opcheck
@needs_native
def test_opcheck_all_ops():
    ts = C.make("many_small", torch.float32) + C.make("n31", torch.bfloat16)
    n = sum(t.numel() for t in ts)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    ops = torch.ops.worm
    torch.library.opcheck(ops.select_thresholds.default, (ts, [n // 2], "global"))
    torch.library.opcheck(ops.select_thresholds.default, (ts, [t.numel() // 3 for t in ts], "layer"))
    thr = R.thresholds(ts, 0.5)
    torch.library.opcheck(ops.mask_update_.default,
                          (ts, thr, torch.zeros(3, nbytes, dtype=torch.uint8), 1))
    grads = [torch.randn_like(t) for t in ts]
    bits = _keep_bits(ts, seed=4)
    torch.library.opcheck(ops.truncate_.default, (grads, bits, 3e-3))
    bufs = [torch.zeros_like(t) for t in ts]
    kw = dict(r=3e-3, lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True,
              maximize=False)
    opt_bits = [b if i % 2 else None for i, b in enumerate(bits)]
    torch.library.opcheck(ops.sgd_step_.default,
                          ([t.clone() for t in ts], grads, bufs, [i % 2 for i in range(len(ts))],
                           opt_bits), kw)
    torch.library.opcheck(ops.sgd_step_.default,
                          ([t.clone() for t in ts], grads, [], [], opt_bits),
                          dict(kw, momentum=0.0))
