"""The ops ``torch.ops.worm.*`` through every implementation this machine has, against
``worm.reference`` (the oracle), with ``torch.library.opcheck`` for each.

Implementations: ``reference``, ``cpp`` (worm._C on CPU), ``cuda``, ``triton`` (compiled
on CUDA, the interpreter on CPU; tests/conftest.py sets TRITON_INTERPRET=1); each test
forces one with WORM_BACKEND. Cases come from tests/op_cases.py.

Tolerances: thresholds, nonfinite counts, packed bytes, XOR counts and truncated
gradients must be equal exactly. The SGD step rounds to the dtype after every op as
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
import shutil
import subprocess
import sys

import pytest
import torch

import op_cases as C
from worm import _backends, ops, radix
from worm import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = _backends.available(DEV)
INTERPRETED = DEV == "cpu"  # Triton on CPU runs in the (slow) interpreter
slow = pytest.mark.slow


def _slow_for_triton(impl, heavy):
    return [slow] if heavy and impl == "triton" and INTERPRETED else []


def impl_params(heavy=False):
    return [pytest.param(i, marks=_slow_for_triton(i, heavy), id=i) for i in IMPLS]


@pytest.fixture
def impl(request, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", request.param)
    assert ops.backend(DEV) == request.param
    return request.param


def with_impls(heavy=False):
    return pytest.mark.parametrize("impl", impl_params(heavy), indirect=True)


def impl_kind_params(kinds):
    return [pytest.param(i, k, marks=_slow_for_triton(i, k in C.LARGE_KINDS), id=f"{i}-{k}")
            for i in IMPLS for k in kinds]


def every_kind_scope_dtype(test):
    """Runs test(impl, kind, dtype, scope) on every implementation, case kind, scope, dtype."""
    test = pytest.mark.parametrize("dtype", C.DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("scope", ["global", "layer"])(test)
    return pytest.mark.parametrize("impl,kind", impl_kind_params(C.KINDS), indirect=["impl"])(test)


def test_every_backend_is_known_and_reference_is_there():
    assert "reference" in IMPLS
    info = ops.backend_info(DEV)
    assert set(info) == set(_backends.BACKENDS)
    assert all(isinstance(v, str) and v for v in info.values())


def test_extension_is_built_where_it_can_be():
    """CI must not silently lose the native backend."""
    if os.environ.get("WORM_NO_NATIVE", "").strip() in ("1", "true", "yes"):
        pytest.skip("WORM_NO_NATIVE set: the native build was switched off on purpose")
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        pytest.skip("no C++ compiler: the native extension cannot be built here")
    why = ops.backend_info("cpu")["cpp"]
    assert why == "ok", f"a C++ compiler is present but worm._C is unusable: {why}"


def test_ops_exist_and_run_without_the_native_extension(tmp_path):
    """Nothing native importable: the ops are still defined, traceable and computing."""
    code = (
        "import sys; sys.modules['worm._C'] = None\n"  # import of worm._C fails
        "import torch, worm\n"
        "from worm import ops\n"
        "info = worm.backend_info('cpu')\n"
        "assert info['cpp'].startswith('ImportError'), info\n"
        "assert worm.backend('cpu') == 'reference'\n"
        "ts = [torch.randn(40), torch.randn(3, 5)]\n"
        "thr, nf = torch.ops.worm.select_thresholds(ts, [20], 'global')\n"
        "want = torch.cat([t.abs().reshape(-1) for t in ts]).kthvalue(20).values\n"
        "assert torch.equal(thr, want.expand(2)), (thr, want)\n"
        "f = torch.compile(lambda t: ops.select_thresholds(t, [20])[0], fullgraph=True,\n"
        "                  backend='aot_eager')\n"
        "assert torch.equal(f(ts), thr)\n"
        "print('ok')\n")
    env = dict(os.environ, WORM_BACKEND="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _ks(tensors, p, scope):
    if scope == "global":
        return [R.num_pruned(sum(t.numel() for t in tensors), p)]
    return [R.num_pruned(t.numel(), p) for t in tensors]


def _ratios(kind, tensors):
    if kind in C.LARGE_KINDS:
        return (0.5,) + tuple(C.k_edge_ratios(tensors)[1:2])
    return tuple(C.RATIOS) + tuple(C.k_edge_ratios(tensors))


def _kth_oracle(tensors, ks, scope):
    """Thresholds by torch.kthvalue straight from the definition (ks given, not p)."""
    flat = [t.float().abs().reshape(-1).cpu() for t in tensors]
    if scope == "global":
        flat, ks = [torch.cat(flat)] * len(tensors), ks * len(tensors)
    return torch.stack([torch.tensor(float("-inf")) if k == 0 else torch.kthvalue(f, k).values
                        for f, k in zip(flat, ks)])


def assert_same(got, want, what):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = got != want
    if got.is_floating_point():
        bad &= ~(torch.isnan(got) & torch.isnan(want))
    idx = bad.nonzero()
    assert idx.numel() == 0, f"{what}: {idx.shape[0]} of {want.numel()} differ, first at " \
                             f"{[tuple(i.tolist()) for i in idx[:4]]}"


# ------------------------------------------------------------------ thresholds
@every_kind_scope_dtype
def test_select_thresholds_exact(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    ratios = _ratios(kind, ts)
    if impl == "triton" and INTERPRETED:
        ratios = (0.5,) + tuple(C.k_edge_ratios(ts))
    for p in ratios:
        thr, nonfinite = ops.select_thresholds(ts, _ks(ts, p, scope), scope)
        assert thr.dtype == torch.float32 and thr.shape == (len(ts),)
        assert nonfinite.dtype == torch.int64
        assert_same(thr, R.thresholds([t.cpu() for t in ts], p, scope), (kind, p, scope))
        assert_same(nonfinite, torch.zeros(len(ts), dtype=torch.int64), "nonfinite")


@with_impls(heavy=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_select_thresholds_more_than_4m_entries(impl, dtype):
    """Sets of >= 2**22 entries (the C++ kernel's two-pass plan), ties near the middle."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(4_194_311, generator=g).to(dtype)
    big[:1000] = 0.5
    ts = [big.to(DEV), torch.randn(333, generator=g).to(dtype).to(DEV)]
    for scope in ("global", "layer"):
        for p in (0.5, 0.9, 1 / sum(t.numel() for t in ts)):
            thr, _ = ops.select_thresholds(ts, _ks(ts, p, scope), scope)
            assert_same(thr, R.thresholds([t.cpu() for t in ts], p, scope), (dtype, scope, p))


@with_impls()
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_select_thresholds_edge_ks(impl, dtype, scope):
    """k = 0, 1, n - 1 and n for each tensor (layer) or the set (global)."""
    ts = C.make("many_small", dtype, DEV, seed=3)
    for pick in (lambda n: 0, lambda n: 1, lambda n: n - 1, lambda n: n):
        ks = ([pick(sum(t.numel() for t in ts))] if scope == "global"
              else [pick(t.numel()) for t in ts])
        thr, _ = ops.select_thresholds(ts, ks, scope)
        assert_same(thr, _kth_oracle(ts, ks, scope), (scope, ks))


@with_impls()
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_select_thresholds_counts_nonfinite(impl, dtype):
    ts = C.make("many_small", dtype, DEV, seed=1)
    ts[2][1] = float("nan")
    ts[5][0] = float("inf")
    ts[5][3] = float("-inf")
    want = torch.zeros(len(ts), dtype=torch.int64)
    want[2], want[5] = 1, 2
    for scope in ("global", "layer"):
        thr, nonfinite = ops.select_thresholds(ts, _ks(ts, 0.5, scope), scope)
        assert_same(nonfinite, want, scope)
        # NaN/Inf anywhere in the set: every threshold is NaN (the caller raises on the counts).
        assert torch.isnan(thr.cpu()).all(), (scope, thr)


@pytest.mark.skipif("triton" not in IMPLS, reason="Triton is not available here")
def test_triton_select_large_plan_mixed_dtypes(monkeypatch):
    """The Triton launcher's multi-launch plan (histograms + atomics), forced on small
    data, with dtypes mixed in one call."""
    import worm_kernels.threshold_select as S
    monkeypatch.setenv("WORM_BACKEND", "triton")
    monkeypatch.setattr(S, "SMALL_LIMIT", 0)
    g = torch.Generator().manual_seed(3)
    mixed = [torch.randn(5, generator=g), torch.randn(7, 1001, generator=g).bfloat16(),
             torch.randn(13, generator=g).half(), torch.full((40,), 0.5)]
    cases = {"mixed": [t.to(DEV) for t in mixed],
             "half_ties": C.make("half_ties", torch.float16, DEV),
             "bn_like": C.make("bn_like", torch.bfloat16, DEV)}
    for name, ts in cases.items():
        for scope in ("global", "layer"):
            for p in (0.0, 0.5, 0.9) + tuple(C.k_edge_ratios(ts)):
                thr, _ = ops.select_thresholds(ts, _ks(ts, p, scope), scope)
                assert_same(thr, R.thresholds([t.cpu() for t in ts], p, scope), (name, scope, p))


@pytest.mark.skipif("triton" not in IMPLS, reason="Triton is not available here")
@pytest.mark.parametrize("large", [False, True], ids=["small_plan", "large_plan"])
def test_triton_select_counts_nonfinite_in_both_plans(large, monkeypatch):
    import worm_kernels.threshold_select as S
    monkeypatch.setenv("WORM_BACKEND", "triton")
    if large:
        monkeypatch.setattr(S, "SMALL_LIMIT", 0)
    ts = C.make("many_small", torch.float32, DEV)
    ts[2][3] = float("nan")
    ts[5][0] = float("inf")
    ts[5][1] = float("-inf")
    thr, nf = ops.select_thresholds(ts, _ks(ts, 0.5, "global"), "global")
    want = torch.zeros(len(ts), dtype=torch.int64)
    want[2], want[5] = 1, 2
    assert_same(nf, want, "nonfinite counts")
    assert torch.isnan(thr.cpu()).all(), thr


@pytest.mark.skipif("triton" not in IMPLS, reason="Triton is not available here")
def test_triton_tables_are_cached(monkeypatch):
    """A second call on the same tensors reuses the device tables (no host->device copy)."""
    import worm_kernels._common as KC
    monkeypatch.setenv("WORM_BACKEND", "triton")
    KC.clear_cache()
    ts = C.make("many_small", torch.float32, DEV)
    ops.select_thresholds(ts, [10], "global")
    n = len(KC._cache)
    for _ in range(3):
        ops.select_thresholds(ts, [10], "global")
    assert len(KC._cache) == n


# ----------------------------------------------------------- radix pass by pass
@pytest.mark.parametrize("kind", C.SMALL_KINDS + ("small_and_large",))
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_radix_passes_match_reference(kind, dtype, scope):
    ts = C.make(kind, dtype)
    for p in _ratios(kind, ts):
        thr, nf = radix.select_thresholds(ts, _ks(ts, p, scope), scope)
        assert_same(thr, R.thresholds(ts, p, scope), (kind, p, scope))
        assert int(nf.sum()) == 0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_radix_histograms_summed_over_shards_give_the_same_threshold(scope):
    """Each 'rank' holds a slice of every tensor; summing the pass histograms (what an
    all_reduce does) selects exactly the threshold of the whole set."""
    ts = C.make("half_ties", torch.float32) + C.make("n4097", torch.bfloat16)
    ks = _ks(ts, 0.4, scope)
    shards = [[t.reshape(-1)[r::3] for t in ts] for r in range(3)]
    seg = radix.segments(len(ts), scope)
    state = radix.start(ks)
    for p in range(len(radix.DIGITS)):
        h = sum(radix.histogram(sh, seg, state, p) for sh in shards)
        state = radix.descend(state, h, p)
    assert_same(radix.finish(state, seg), R.thresholds(ts, 0.4, scope), scope)


def test_radix_marks_nonfinite_segments():
    ts = C.make("many_small", torch.float32)
    ts[4][0] = float("nan")
    thr, nf = radix.select_thresholds(ts, [1] * len(ts), "layer")
    assert int(nf[4]) == 1 and int(nf.sum()) == 1
    assert torch.isnan(thr).all()  # NaN anywhere: NaN everywhere, as every kernel does


# ----------------------------------------------------------------- mask update
def _window(nbytes, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length, nbytes), generator=g, dtype=torch.uint8).to(DEV)


def _check_mask_update(ts, thr, win, head, what):
    want_win = win.cpu().clone()
    want = R.mask_update_([t.cpu() for t in ts], thr.cpu(), want_win, head)
    got = ops.mask_update_(ts, thr, win, head)
    _assert_window_and_counts(win, want_win, got, want, what)


def _assert_window_and_counts(win, want_win, counts, want_counts, what):
    assert counts.dtype == torch.int64 and counts.shape == (win.shape[0],)
    assert_same(win, want_win, f"{what} window bytes")
    assert_same(counts, want_counts, f"{what} xor counts")


@every_kind_scope_dtype
def test_mask_update_exact(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    if impl == "triton" and INTERPRETED:  # ~1 s a call: a window of 1 and one of 3
        rs = _ratios(kind, ts)
        plan = [(rs[min(1, len(rs) - 1)], 1, (0,)), (rs[-1], 3, (0, 1, 2))]
    else:
        lengths = (1, 3) if kind in C.LARGE_KINDS else (1, 2, 3, 4, 5)
        plan = [(p, n, sorted({0, n // 2, n - 1})) for p in _ratios(kind, ts)[:3] for n in lengths]
    for p, length, heads in plan:
        thr = R.thresholds([t.cpu() for t in ts], p, scope).to(DEV)
        for head in heads:
            win = _window(nbytes, length, seed=length * 7 + head)
            _check_mask_update(ts, thr, win, head, (kind, p, length, head))


@with_impls()
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_mask_update_every_head(impl, length):
    ts = C.make("many_small", torch.float32, DEV)
    thr = R.thresholds([t.cpu() for t in ts], 0.5, "layer").to(DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for head in range(length):
        _check_mask_update(ts, thr, _window(nbytes, length, length * 10 + head), head, head)


@with_impls()
def test_mask_update_thresholds_at_the_edges(impl):
    """-inf keeps all, +inf and NaN thresholds keep none, ties at thr are pruned."""
    ts = C.make("half_ties", torch.float32, DEV) + C.make("many_small", torch.bfloat16, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for v in (float("-inf"), float("inf"), float("nan"), 0.25, 0.0):
        thr = torch.full((len(ts),), v, device=DEV)
        _check_mask_update(ts, thr, _window(nbytes, 2, 5), 1, v)


@with_impls()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mask_update_16bit_every_pattern(impl, dtype, request):
    """Every finite, infinite and NaN 16-bit pattern against thresholds between them."""
    if impl == "triton" and INTERPRETED and dtype == torch.bfloat16:
        # Known defect, kept visible: the Triton interpreter drops the three smallest
        # bf16 subnormals (|w| <= 3 * 2^-133) against a threshold of 0.
        request.applymarker(pytest.mark.xfail(strict=True, reason="Triton interpreter "
                                              "loses the smallest bf16 subnormals"))
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = t.float().abs()
    thrs = [float("-inf"), 0.0, 1e-30, 6e-8, 1e-5, 0.5, 1.0, 3.0, 65504.0, 70000.0, 1e38,
            float("inf")]
    thrs += [float(x) for x in vals[vals.isfinite()][::4099]]
    if impl == "triton" and INTERPRETED:
        thrs = thrs[::3]  # every kind of threshold still appears; the interpreter is slow
    nbytes = R.byte_offsets([t.numel()])[-1]
    for v in thrs:
        for nudge in (v, torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))).item()):
            win = torch.zeros(1, nbytes, dtype=torch.uint8, device=DEV)
            _check_mask_update([t.to(DEV)], torch.tensor([nudge], device=DEV), win, 0, nudge)


@with_impls()
def test_mask_update_ring_sequence(impl):
    """Several samplings in a row through the same ring (the search's use)."""
    L = 3
    ts = C.make("bn_like", torch.float32, DEV)
    B = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(L, B, dtype=torch.uint8, device=DEV)
    ewin = win.cpu().clone()
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        for t in ts:
            t.add_(torch.randn(t.shape, generator=g).to(DEV) * 0.1)
        thr = R.thresholds([t.cpu() for t in ts], 0.5).to(DEV)
        c = ops.mask_update_(ts, thr, win, step % L)
        e = R.mask_update_([t.cpu() for t in ts], thr.cpu(), ewin, step % L)
        assert_same(c, e, f"step {step} counts")
        assert_same(win, ewin, f"step {step} window")


# ------------------------------------------------------------------ truncation
def _keep_bits(tensors, seed, none_every=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(tensors):
        if none_every and i % none_every == 1:
            out.append(None)
            continue
        out.append(R.pack([torch.rand(t.shape, generator=g) < 0.6]).to(t.device))
    return out


@pytest.mark.parametrize("impl,kind", impl_kind_params(
    ["one", "n31", "n4097", "many_small", "zeros", "small_and_large", "n1000003"]), indirect=["impl"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_truncate_exact(impl, kind, dtype):
    grads = C.make(kind, dtype, DEV, seed=11)
    bits = _keep_bits(grads, seed=2)
    for r in (3e-3, 0.5, 0.0, 1.0):
        got = [g.clone() for g in grads]
        want = [g.cpu().clone() for g in grads]
        R.truncate_(want, [b.cpu() for b in bits], r)
        ops.truncate_(got, bits, r)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{kind} r={r} grad {i}")


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
        bits = _keep_bits(ref_params, seed=9, none_every=3)
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
            ref_bufs = R.sgd_step_(ref_params, grads, ref_bufs, bits, **kw)
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
    bits = _keep_bits([p], 0)
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    for lr, r in ((0.1, 3e-3), (0.05, 0.1)):
        x = torch.randn(p.shape, generator=g).to(DEV)
        bufs = ops.sgd_step_([p], [x], bufs, bits, r=r, lr=lr, **hp)
        wbufs = R.sgd_step_([want], [x.cpu()], wbufs, [bits[0].cpu()], r=r, lr=lr, **hp)
        assert max_ulps(p.cpu(), want) <= 1 and max_ulps(bufs[0].cpu(), wbufs[0]) <= 1
        if _bitwise_fp32(impl):
            assert torch.equal(p.cpu(), want) and torch.equal(bufs[0].cpu(), wbufs[0])


@with_impls()
def test_sgd_step_mixed_dtypes_in_one_call(impl):
    g = torch.Generator().manual_seed(8)
    ps = [torch.randn(33, generator=g).to(dt).to(DEV) for dt in C.DTYPES]
    gs = [torch.randn(33, generator=g).to(p.dtype).to(DEV) for p in ps]
    want = [p.cpu().clone() for p in ps]
    bits = _keep_bits(ps, 3)
    hp = dict(r=3e-3, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
              maximize=False)
    bufs = ops.sgd_step_(ps, gs, [None] * 3, bits, **hp)
    wbufs = R.sgd_step_(want, [x.cpu() for x in gs], [None] * 3, [b.cpu() for b in bits], **hp)
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
    bits = _keep_bits(p0, 1)
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
    bits = _keep_bits(ps, 0)
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


# ------------------------------------------------------------------- layouts
@with_impls()
def test_read_only_inputs_may_be_strided(impl):
    """Transposed weights and sliced masks give the result of their contiguous copies."""
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(9, 13, generator=g).to(DEV), torch.randn(40, generator=g).to(DEV)]
    strided = [base[0].t(), torch.randn(80, generator=g).to(DEV)[::2]]
    dense = [t.contiguous() for t in strided]
    for scope, ks in (("global", [60]), ("layer", [50, 7])):
        assert_same(ops.select_thresholds(strided, ks, scope)[0],
                    ops.select_thresholds(dense, ks, scope)[0], scope)
    thr = R.thresholds([t.cpu() for t in dense], 0.5).to(DEV)
    nb = R.byte_offsets([t.numel() for t in dense])[-1]
    w1, w2 = _window(nb, 3, 1), _window(nb, 3, 1)
    assert_same(ops.mask_update_(strided, thr, w1, 2), ops.mask_update_(dense, thr, w2, 2), "c")
    assert_same(w1, w2, "window")
    bits = [R.pack([torch.rand(t.shape, generator=g) < 0.5]).to(DEV) for t in dense]
    wide = [torch.stack([b, b], 1)[:, 0] for b in bits]  # non-contiguous packed masks
    a, b = [t.clone() for t in dense], [t.clone() for t in dense]
    ops.truncate_(a, wide, 0.25)
    ops.truncate_(b, bits, 0.25)
    for x, y in zip(a, b):
        assert_same(x, y, "truncate")
    kw = dict(r=0.1, lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False)
    pa, pb = [t.clone() for t in dense], [t.clone() for t in dense]
    ops.sgd_step_(pa, strided, [None, None], wide, **kw)
    ops.sgd_step_(pb, dense, [None, None], bits, **kw)
    for x, y in zip(pa, pb):
        assert_same(x, y, "sgd")


# ------------------------------------------------------------------ bad input
def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


@with_impls()
def test_bad_input_same_exception_on_every_backend(impl):
    ts = C.make("n31", torch.float32, DEV)
    dbl = [torch.zeros(3, dtype=torch.float64, device=DEV)]
    sel = ops.select_thresholds
    _raises(ValueError, "one k", sel, ts, [1, 2], "global")
    _raises(ValueError, "scope", sel, ts, [1], "rows")
    _raises(ValueError, "outside", sel, ts, [32], "global")
    _raises(ValueError, "negative", sel, ts, [-1], "global")
    _raises(ValueError, "one k per tensor", sel, ts + ts, [1], "layer")
    _raises(TypeError, "dtype", sel, dbl, [1], "global")
    _raises(ValueError, "empty", sel, [], [0], "global")
    _raises(ValueError, "no entries", sel, [torch.zeros(0, device=DEV)], [0], "global")
    _raises(TypeError, "not a tensor", sel, [1.0], [0], "global")

    thr = torch.zeros(1, device=DEV)
    win = torch.zeros(2, 4, dtype=torch.uint8, device=DEV)
    mu = ops.mask_update_
    _raises(TypeError, "uint8", mu, ts, thr, torch.zeros(2, 4, device=DEV), 0)
    _raises(ValueError, "bytes", mu, ts, thr, torch.zeros(2, 5, dtype=torch.uint8, device=DEV), 0)
    _raises(IndexError, "head", mu, ts, thr, win, 2)
    _raises(IndexError, "head", mu, ts, thr, win, -1)
    _raises(ValueError, "one threshold per tensor", mu, ts, torch.zeros(2, device=DEV), win, 0)
    _raises(TypeError, "float32", mu, ts, thr.double(), win, 0)
    _raises(ValueError, "contiguous", mu, ts, thr, torch.zeros(4, 2, dtype=torch.uint8, device=DEV).t(), 0)
    _raises(ValueError, "at most 64", mu, ts, thr, torch.zeros(65, 4, dtype=torch.uint8, device=DEV), 0)

    g = torch.zeros(31, device=DEV)
    tr = ops.truncate_
    _raises(ValueError, "ceil", tr, [g], [torch.zeros(3, dtype=torch.uint8, device=DEV)], 0.1)
    _raises(TypeError, "uint8", tr, [g], [torch.zeros(4, device=DEV)], 0.1)
    _raises(ValueError, "contiguous", tr, [torch.zeros(8, 4, device=DEV).t()],
            [torch.zeros(4, dtype=torch.uint8, device=DEV)], 0.1)
    _raises(ValueError, "packed masks", tr, [g, g], [torch.zeros(4, dtype=torch.uint8, device=DEV)], 0.1)
    # A mask on another device: seen before any backend runs (here by the fake kernel,
    # which the dispatcher picks for the meta tensor).
    _raises(ValueError, r"keep_bits\[0\] is on meta", tr, [g],
            [torch.zeros(4, dtype=torch.uint8, device="meta")], 0.1)

    p = torch.zeros(31, device=DEV)
    kw = dict(r=0.1, lr=0.1, weight_decay=0, momentum=0, dampening=0, nesterov=False,
              maximize=False)
    sgd = ops.sgd_step_
    _raises(ValueError, r"grads\[0\]", sgd, [p], [torch.zeros(30, device=DEV)], [None], [None], **kw)
    _raises(TypeError, r"grads\[0\] has dtype", sgd, [p], [p.half()], [None], [None], **kw)
    _raises(ValueError, "ceil", sgd, [p], [p], [None], [torch.zeros(5, dtype=torch.uint8, device=DEV)], **kw)
    _raises(TypeError, "dtype", sgd, [p.double()], [p.double()], [None], [None], **kw)
    _raises(ValueError, "params but", sgd, [p], [p, p], [None], [None], **kw)
    _raises(ValueError, "momentum buffers", sgd, [p], [p], [], [None], **kw)
    _raises(ValueError, "contiguous", sgd, [torch.zeros(8, 4, device=DEV).t()],
            [torch.zeros(4, 8, device=DEV).t()], [None], [None], **kw)
    _raises(ValueError, "momentum is 0", torch.ops.worm.sgd_step_, [p], [p], [p], [0], [None], **kw)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "cuda" if DEV == "cpu" else "cpp")
    with pytest.raises(RuntimeError, match="cannot run on"):
        ops.select_thresholds(C.make("n31", torch.float32, DEV), [3], "global")
    monkeypatch.setenv("WORM_BACKEND", "fortran")
    with pytest.raises(ValueError, match="not one of"):
        ops.backend(DEV)


# ------------------------------------------------------------------ sample_mask_
def _check_sample(ts, ks, scope, win, head, what):
    """sample_mask_ against the reference select, then the reference mask update."""
    cpu = [t.cpu() for t in ts]
    want_thr, want_nf = _backends.reference_select_thresholds(cpu, ks, scope)
    want_win = win.cpu().clone()
    if int(want_nf.sum()) == 0:
        want_counts = R.mask_update_(cpu, want_thr, want_win, head)
    else:  # NaN/Inf: the window stays as it was
        want_counts = torch.zeros(win.shape[0], dtype=torch.int64)
    thr, nf, counts = ops.sample_mask_(ts, ks, scope, win, head)
    assert_same(thr, want_thr, f"{what} thresholds")
    assert_same(nf, want_nf, f"{what} nonfinite counts")
    _assert_window_and_counts(win, want_win, counts, want_counts, what)


@every_kind_scope_dtype
def test_sample_mask_is_select_then_mask_update(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    rs = _ratios(kind, ts)
    if impl == "triton" and INTERPRETED:
        rs = rs[-1:]
    for i, p in enumerate(rs):
        length = (1, 3, 5)[i % 3]
        head = i % length
        _check_sample(ts, _ks(ts, p, scope), scope, _window(nbytes, length, seed=i), head,
                      (kind, p, length, head))


@with_impls()
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_sample_mask_leaves_the_window_on_nonfinite(impl, bad):
    ts = C.make("many_small", torch.float32, DEV)
    ts[2] = ts[2].clone()
    ts[2].view(-1)[1] = float(bad)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for scope in ("global", "layer"):
        win = _window(nbytes, 3, seed=9)
        before = win.clone()
        thr, nf, counts = ops.sample_mask_(ts, _ks(ts, 0.5, scope), scope, win, 1)
        assert thr.isnan().all(), thr
        assert nf.tolist() == [1 if i == 2 else 0 for i in range(len(ts))]
        assert_same(win, before, f"{bad} {scope}: window must be untouched")
        assert counts.tolist() == [0, 0, 0]


@with_impls()
def test_sample_mask_ring_sequence(impl):
    """Five steps round a ring of 3: every row and count as select + mask_update give."""
    ts = C.make("small_and_large", torch.float32, DEV) if not (impl == "triton" and INTERPRETED) \
        else C.make("many_small", torch.float32, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(3, nbytes, dtype=torch.uint8, device=DEV)
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        ts = [(t.cpu() + 0.3 * torch.randn(t.shape, generator=g)).to(DEV) for t in ts]
        _check_sample(ts, _ks(ts, 0.4 + 0.05 * step, "global"), "global", win, step % 3, step)


# ---------------------------------------------------------------------- opcheck
@with_impls()
def test_opcheck(impl):
    ts = C.make("many_small", torch.float32, DEV) + C.make("n31", torch.bfloat16, DEV)
    n = sum(t.numel() for t in ts)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    o = torch.ops.worm
    torch.library.opcheck(o.select_thresholds.default, (ts, [n // 2], "global"))
    torch.library.opcheck(o.select_thresholds.default,
                          (ts, [t.numel() // 3 for t in ts], "layer"))
    thr = R.thresholds([t.cpu() for t in ts], 0.5).to(DEV)
    torch.library.opcheck(o.mask_update_.default,
                          (ts, thr, torch.zeros(3, nbytes, dtype=torch.uint8, device=DEV), 1))
    torch.library.opcheck(o.sample_mask_.default,
                          (ts, [n // 2], "global", _window(nbytes, 3, seed=2), 1))
    torch.library.opcheck(o.sample_mask_.default,
                          (ts, [t.numel() // 3 for t in ts], "layer", _window(nbytes, 2, seed=3), 0))
    grads = [torch.randn(t.shape).to(t.dtype).to(DEV) for t in ts]
    bits = _keep_bits(ts, seed=4)
    torch.library.opcheck(o.truncate_.default, ([x.clone() for x in grads], bits, 3e-3))
    kw = dict(r=3e-3, lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True,
              maximize=False)
    opt_bits = [b if i % 2 else None for i, b in enumerate(bits)]
    torch.library.opcheck(o.sgd_step_.default,
                          ([t.clone() for t in ts], grads, [torch.zeros_like(t) for t in ts],
                           [i % 2 for i in range(len(ts))], opt_bits), kw)
    torch.library.opcheck(o.sgd_step_.default,
                          ([t.clone() for t in ts], grads, [], [], opt_bits),
                          dict(kw, momentum=0.0))
