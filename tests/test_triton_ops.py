"""The Triton kernels (worm_kernels) against the pure-PyTorch reference.

On CPU they run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
on CUDA compiled. Thresholds, packed masks, window bytes and XOR counts must match
exactly; SGD steps within the tolerance documented in worm_kernels/sgd_step.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import op_cases
from worm import reference as R
from worm._ops import _reference_select_thresholds

K = pytest.importorskip("worm_kernels")
from worm_kernels.threshold_select import ks_for  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BIG = "n1000003"


def _first_diff(got, exp, what):
    if got.shape != exp.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    bad = (got != exp) & ~(torch.isnan(got.float()) & torch.isnan(exp.float())) \
        if got.is_floating_point() else got != exp
    idx = bad.nonzero()
    if idx.numel() == 0:
        return None
    rows = [f"  index {tuple(i.tolist())}: got {got[tuple(i)].item()!r}, expected "
            f"{exp[tuple(i)].item()!r}" for i in idx[:8]]
    return f"{what}: {idx.shape[0]} of {exp.numel()} differ\n" + "\n".join(rows)


def assert_same(got, exp, what):
    msg = _first_diff(got.cpu(), exp.cpu(), what)
    assert msg is None, msg


def _ks(tensors, ratio, scope):
    return ks_for([t.numel() for t in tensors], ratio, scope)


# ---------------------------------------------------------------- thresholds
def _check_select(tensors, ks, scope, label):
    thr, nf = K.select_thresholds(tensors, ks, scope)
    ethr, enf = _reference_select_thresholds([t.cpu() for t in tensors], ks, scope)
    assert thr.dtype == torch.float32 and nf.dtype == torch.int64
    assert_same(nf, enf, f"{label} nonfinite")
    assert_same(thr, ethr, f"{label} thr")


@pytest.mark.parametrize("dtype", op_cases.DTYPES, ids=str)
@pytest.mark.parametrize("kind", op_cases.SMALL_KINDS)
def test_select_small_kinds(kind, dtype):
    for seed in (0,):
        ts = op_cases.make(kind, dtype, DEV, seed)
        for scope in ("global", "layer"):
            ratios = {0.5} | set(op_cases.k_edge_ratios(ts))
            for p in sorted(ratios):
                _check_select(ts, _ks(ts, p, scope), scope, f"{kind}/{scope}/p={p}/seed={seed}")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_select_k_edges_explicit(scope):
    ts = op_cases.make("many_small", torch.float32, DEV)
    n = sum(t.numel() for t in ts)
    if scope == "global":
        for k in (0, 1, n - 1, n):
            _check_select(ts, [k], scope, f"k={k}")
    else:
        for f in (lambda m: 0, lambda m: 1, lambda m: m - 1, lambda m: m):
            _check_select(ts, [f(t.numel()) for t in ts], scope, "per-tensor edges")


def test_select_large_plan_forced(monkeypatch):
    """The multi-launch (histogram + atomics) plan on small data, all dtypes mixed."""
    import worm_kernels.threshold_select as S
    monkeypatch.setattr(S, "SMALL_LIMIT", 0)
    g = torch.Generator().manual_seed(3)
    mixed = [torch.randn(5, generator=g), torch.randn(7, 1001, generator=g).bfloat16(),
             torch.randn(13, generator=g).half(), torch.full((40,), 0.5)]
    cases = {"mixed": [t.to(DEV) for t in mixed],
             "half_ties": op_cases.make("half_ties", torch.float16, DEV),
             "bn_like": op_cases.make("bn_like", torch.bfloat16, DEV)}
    for name, ts in cases.items():
        for scope in ("global", "layer"):
            for p in (0.0, 0.5, 0.9) + tuple(op_cases.k_edge_ratios(ts)):
                _check_select(ts, _ks(ts, p, scope), scope, f"large-plan {name}/{scope}/{p}")


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_select_big(scope):
    ts = op_cases.make(BIG, torch.float32, DEV)
    for p in (0.5, 1.0 / 1000003, 1000002 / 1000003):
        _check_select(ts, _ks(ts, p, scope), scope, f"{BIG}/{scope}/{p}")


@pytest.mark.parametrize("large", [False, True], ids=["small_plan", "large_plan"])
def test_select_counts_nonfinite(large, monkeypatch):
    import worm_kernels.threshold_select as S
    if large:
        monkeypatch.setattr(S, "SMALL_LIMIT", 0)
    ts = op_cases.make("many_small", torch.float32, DEV)
    ts[2][3] = float("nan")
    ts[5][0] = float("inf")
    ts[5][1] = float("-inf")
    thr, nf = K.select_thresholds(ts, _ks(ts, 0.5, "global"), "global")
    exp = torch.zeros(len(ts), dtype=torch.int64)
    exp[2], exp[5] = 1, 2
    assert_same(nf, exp, "nonfinite counts")
    assert torch.isnan(thr.cpu()).all(), f"threshold over non-finite data should be NaN, got {thr}"


def test_select_bad_input():
    ts = op_cases.make("n31", torch.float32, DEV)
    with pytest.raises(ValueError, match="one k"):
        K.select_thresholds(ts, [1, 2], "global")
    with pytest.raises(ValueError, match="scope"):
        K.select_thresholds(ts, [1], "rows")
    with pytest.raises(ValueError, match="outside"):
        K.select_thresholds(ts, [32], "global")
    with pytest.raises(TypeError, match="dtype"):
        K.select_thresholds([torch.zeros(3, dtype=torch.float64, device=DEV)], [1], "global")
    with pytest.raises(ValueError, match="empty"):
        K.select_thresholds([], [0], "global")


# --------------------------------------------------------------- mask update
def _check_mask_update(ts, thr, L, head, seed, label):
    B = R.byte_offsets([t.numel() for t in ts])[-1]
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(0, 256, (L, B), generator=g, dtype=torch.uint8).to(DEV)
    ewin = win.cpu().clone()
    counts = K.mask_update_(ts, thr, win, head)
    ecounts = R.mask_update_([t.cpu() for t in ts], thr.cpu(), ewin, head)
    assert counts.dtype == torch.int64
    assert_same(win, ewin, f"{label} window bytes")
    assert_same(counts, ecounts, f"{label} xor counts")


@pytest.mark.parametrize("dtype", op_cases.DTYPES, ids=str)
@pytest.mark.parametrize("kind", op_cases.SMALL_KINDS)
def test_mask_update_kinds(kind, dtype):
    ts = op_cases.make(kind, dtype, DEV)
    for i, (scope, p) in enumerate([("global", 0.5), ("layer", 0.3), ("global", 0.0)]):
        thr = R.thresholds([t.cpu() for t in ts], p, scope).to(DEV)
        L = 1 + i * 2          # 1, 3, 5 rows
        for head in sorted({0, L - 1, L // 2}):
            _check_mask_update(ts, thr, L, head, seed=head + 7 * i, label=f"{kind}/{scope}/L={L}/h={head}")


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5])
def test_mask_update_window_lengths(L):
    ts = op_cases.make("many_small", torch.float32, DEV)
    thr = R.thresholds([t.cpu() for t in ts], 0.5, "layer").to(DEV)
    for head in range(L):
        _check_mask_update(ts, thr, L, head, seed=L * 10 + head, label=f"L={L}/h={head}")


def test_mask_update_ring_sequence():
    """Several samplings in a row through the same ring (the search's use)."""
    L = 3
    ts = op_cases.make("bn_like", torch.float32, DEV)
    B = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(L, B, dtype=torch.uint8, device=DEV)
    ewin = win.cpu().clone()
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        for t in ts:
            t.add_(torch.randn(t.shape, generator=g).to(DEV) * 0.1)
        thr = R.thresholds([t.cpu() for t in ts], 0.5).to(DEV)
        c = K.mask_update_(ts, thr, win, step % L)
        e = R.mask_update_([t.cpu() for t in ts], thr.cpu(), ewin, step % L)
        assert_same(c, e, f"step {step} counts")
        assert_same(win, ewin, f"step {step} window")


@pytest.mark.slow
def test_mask_update_big():
    ts = op_cases.make(BIG, torch.float32, DEV)
    thr = R.thresholds([t.cpu() for t in ts], 0.5).to(DEV)
    _check_mask_update(ts, thr, 3, 1, seed=0, label=BIG)


def test_mask_update_bad_input():
    ts = op_cases.make("n31", torch.float32, DEV)
    thr = torch.zeros(1, device=DEV)
    with pytest.raises(TypeError, match="uint8"):
        K.mask_update_(ts, thr, torch.zeros(2, 4, device=DEV), 0)
    with pytest.raises(ValueError, match="bytes"):
        K.mask_update_(ts, thr, torch.zeros(2, 5, dtype=torch.uint8, device=DEV), 0)
    with pytest.raises(IndexError, match="head"):
        K.mask_update_(ts, thr, torch.zeros(2, 4, dtype=torch.uint8, device=DEV), 2)
    with pytest.raises(TypeError, match="fp32"):
        K.mask_update_(ts, torch.zeros(2, device=DEV), torch.zeros(2, 4, dtype=torch.uint8, device=DEV), 0)


# ---------------------------------------------------------------- truncation
def _rand_bits(tensors, seed, p_keep=0.5):
    g = torch.Generator().manual_seed(seed)
    return [R.pack([torch.rand(t.shape, generator=g) < p_keep]).to(DEV) for t in tensors]


@pytest.mark.parametrize("dtype", op_cases.DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["one", "n31", "n4097", "many_small", "zeros"])
def test_truncate(kind, dtype):
    gs = op_cases.make(kind, dtype, DEV, seed=1)
    bits = _rand_bits(gs, 2)
    for r in (3e-3, 0.5, 0.0, 1.0):
        got = [g.clone() for g in gs]
        exp = [g.cpu().clone() for g in gs]
        K.truncate_(got, bits, r)
        R.truncate_(exp, [b.cpu() for b in bits], r)
        for i, (a, b) in enumerate(zip(got, exp)):
            assert_same(a, b, f"{kind} r={r} grad {i}")


@pytest.mark.slow
def test_truncate_big():
    gs = op_cases.make(BIG, torch.float32, DEV)
    bits = _rand_bits(gs, 0)
    got, exp = [gs[0].clone()], [gs[0].cpu().clone()]
    K.truncate_(got, bits, 3e-3)
    R.truncate_(exp, [bits[0].cpu()], 3e-3)
    assert_same(got[0], exp[0], "big truncation")


def test_truncate_bad_input():
    g = torch.zeros(31, device=DEV)
    with pytest.raises(ValueError, match="ceil"):
        K.truncate_([g], [torch.zeros(3, dtype=torch.uint8, device=DEV)], 0.1)
    with pytest.raises(TypeError, match="uint8"):
        K.truncate_([g], [torch.zeros(4, device=DEV)], 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        K.truncate_([torch.zeros(8, 4, device=DEV).t()], [torch.zeros(4, dtype=torch.uint8, device=DEV)], 0.1)


# ----------------------------------------------------------------------- SGD
EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _close(got, exp, scale, dtype, what):
    """fp32: bitwise up to FMA contraction (1 ulp); bf16/fp16: 1 ulp of the dtype at
    the scale of the operands (see worm_kernels/sgd_step.py)."""
    got, exp, scale = got.cpu().float(), exp.cpu().float(), scale.cpu().float()
    if dtype == torch.float32:
        tol = torch.finfo(torch.float32).eps * exp.abs()
    else:
        tol = 2 * EPS[dtype] * (exp.abs() + scale.abs()) + torch.finfo(dtype).tiny
    bad = (got - exp).abs() > tol
    idx = bad.nonzero().flatten()
    assert idx.numel() == 0, f"{what}: {idx.numel()} entries off\n" + "\n".join(
        f"  index {i}: got {got[i].item()!r}, expected {exp[i].item()!r}, tol {tol[i].item():.3g}"
        for i in idx[:8].tolist())


def _run_sgd(dtype, hp, sizes, steps, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=g).to(dtype).to(DEV) for n in sizes]
    eps_ = [p.cpu().clone() for p in ps]
    bits = _rand_bits(ps, seed)
    bits[len(bits) // 2] = None  # one param without a mask
    bufs, ebufs = [None] * len(ps), [None] * len(ps)
    exact = True
    for step, (lr, r) in enumerate(steps):
        gs = [torch.randn(p.shape, generator=g).to(dtype).to(DEV) for p in ps]
        gs_before = [x.clone() for x in gs]
        old = [p.cpu().float().abs() for p in eps_]
        oldb = [b.cpu().float().abs() if b is not None else 0 for b in ebufs]
        bufs = K.sgd_step_(ps, gs, bufs, bits, r=r, lr=lr, **hp)
        ebufs = R.sgd_step_(eps_, [x.cpu() for x in gs], ebufs, [b.cpu() if b is not None else None for b in bits],
                            r=r, lr=lr, **hp)
        for i in range(len(ps)):
            assert_same(gs[i], gs_before[i], f"grad {i} must be left unmodified")
            label = f"{dtype} {hp} step {step} lr={lr} r={r} param {i}"
            exact &= torch.equal(ps[i].cpu(), eps_[i])
            ga = gs[i].cpu().float().abs()
            _close(ps[i], eps_[i], old[i] + lr * (ga + oldb[i] + old[i]), dtype, label)
            if hp["momentum"] != 0:
                exact &= torch.equal(bufs[i].cpu(), ebufs[i])
                _close(bufs[i], ebufs[i], ga + oldb[i] + old[i], dtype, label + " buffer")
            else:
                assert bufs[i] is None
        # Hold each step to its own tolerance: continue from the reference's state.
        for p, e in zip(ps, eps_):
            p.copy_(e)
        for b, e in zip(bufs, ebufs):
            if b is not None:
                b.copy_(e)
    return exact


HP = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=w, maximize=x)
      for m, d, n, w, x in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True))]


@pytest.mark.parametrize("dtype", op_cases.DTYPES, ids=str)
def test_sgd_all_hyperparameters(dtype):
    steps = [(0.1, 3e-3), (0.05, 0.5), (0.2, 1.0), (0.01, 0.0)]
    exact = [_run_sgd(dtype, hp, (1, 31, 257), steps, seed=i) for i, hp in enumerate(HP)]
    if dtype == torch.float32 and DEV == "cpu":
        # The interpreter path emulates torch's fused a + alpha*b: bitwise here.
        assert all(exact), "fp32 SGD should match the reference bit for bit on CPU"


@pytest.mark.parametrize("dtype", op_cases.DTYPES, ids=str)
def test_sgd_many_tensors(dtype):
    sizes = [1, 3, 8, 9, 15, 16, 17, 31, 33, 64, 100, 7, 2, 255, 256, 257, 4097]
    hp = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
    _run_sgd(dtype, hp, sizes, [(0.1, 3e-3), (0.1, 3e-3), (0.03, 0.2)], seed=11)


def test_sgd_r1_is_plain_sgd():
    """r == 1 gives exactly the untruncated step (and torch.optim.SGD's on CPU fp32)."""
    g = torch.Generator().manual_seed(4)
    p0 = [torch.randn(n, generator=g).to(DEV) for n in (31, 4097)]
    grads = [[torch.randn(p.shape, generator=g).to(DEV) for p in p0] for _ in range(3)]
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    bits = _rand_bits(p0, 1)
    a, b = [p.clone() for p in p0], [p.clone() for p in p0]
    ba, bb = [None, None], [None, None]
    for gs in grads:
        ba = K.sgd_step_(a, gs, ba, bits, r=1.0, lr=0.1, **hp)
        bb = K.sgd_step_(b, gs, bb, [None, None], r=0.5, lr=0.1, **hp)
    for x, y in zip(a, b):
        assert_same(x, y, "r=1 vs no truncation")
    if DEV == "cpu":
        ps = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
        for gs in grads:
            for p, gg in zip(ps, gs):
                p.grad = gg.clone()
            opt.step()
        for x, y in zip(a, ps):
            assert_same(x, y.detach(), "r=1 vs torch.optim.SGD")


@pytest.mark.slow
def test_sgd_big():
    hp = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, maximize=False)
    assert _run_sgd(torch.float32, hp, (1000003,), [(0.1, 3e-3), (0.05, 0.1)], seed=2) or DEV == "cuda"


def test_sgd_mixed_dtypes_one_call():
    g = torch.Generator().manual_seed(8)
    ps = [torch.randn(33, generator=g).to(dt).to(DEV) for dt in op_cases.DTYPES]
    gs = [torch.randn(33, generator=g).to(p.dtype).to(DEV) for p in ps]
    eps_ = [p.cpu().clone() for p in ps]
    bits = _rand_bits(ps, 3)
    hp = dict(r=3e-3, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    bufs = K.sgd_step_(ps, gs, [None] * 3, bits, **hp)
    ebufs = R.sgd_step_(eps_, [x.cpu() for x in gs], [None] * 3, [b.cpu() for b in bits], **hp)
    for i, p in enumerate(ps):
        assert bufs[i].dtype == p.dtype
        _close(p, eps_[i], eps_[i].float().abs() + 0.1 * gs[i].cpu().float().abs(), p.dtype, f"mixed {p.dtype}")


def test_sgd_bad_input():
    p = torch.zeros(31, device=DEV)
    kw = dict(r=0.1, lr=0.1, weight_decay=0, momentum=0, dampening=0, nesterov=False, maximize=False)
    with pytest.raises(ValueError, match="grads"):
        K.sgd_step_([p], [torch.zeros(30, device=DEV)], [None], [None], **kw)
    with pytest.raises(ValueError, match="ceil"):
        K.sgd_step_([p], [torch.zeros(31, device=DEV)], [None], [torch.zeros(5, dtype=torch.uint8, device=DEV)], **kw)
    with pytest.raises(TypeError, match="dtype"):
        K.sgd_step_([p.double()], [p.double()], [None], [None], **kw)
    with pytest.raises(ValueError, match="params but"):
        K.sgd_step_([p], [p, p], [None], [None], **kw)


# ------------------------------------------------------------------- plumbing
def test_backend_namespace():
    be = K.backend()
    assert be.name == "triton"
    for op in ("select_thresholds", "mask_update_", "truncate_", "sgd_step_"):
        assert callable(getattr(be, op))


def test_tables_are_cached():
    """A second call on the same tensors reuses the device tables (no host->device copy)."""
    import worm_kernels._common as C
    C.clear_cache()
    ts = op_cases.make("many_small", torch.float32, DEV)
    K.select_thresholds(ts, [10], "global")
    n = len(C._cache)
    for _ in range(3):
        K.select_thresholds(ts, [10], "global")
    assert len(C._cache) == n


def _n_compiled(fn):
    """Compiled variants of a @triton.jit function (triton < 3 keeps `cache`, later
    versions `device_caches[device][0]`)."""
    if hasattr(fn, "cache"):
        return sum(len(v) for v in fn.cache.values())
    return sum(len(v[0]) for v in fn.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need CUDA")
def test_no_recompile_on_lr_r_head():
    from worm_kernels import sgd_step as S, mask_update as M
    ps = [torch.randn(100, device="cuda")]
    gs = [torch.randn(100, device="cuda")]
    bits = _rand_bits(ps, 0)
    kw = dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    bufs = K.sgd_step_(ps, gs, [None], bits, r=0.1, lr=0.1, **kw)
    bufs = K.sgd_step_(ps, gs, bufs, bits, r=0.1, lr=0.1, **kw)
    n0 = _n_compiled(S._sgd_kernel)
    for lr, r in [(0.2, 0.3), (1e-3, 3e-3), (1.0, 0.0)]:
        bufs = K.sgd_step_(ps, gs, bufs, bits, r=r, lr=lr, **kw)
    assert _n_compiled(S._sgd_kernel) == n0
    thr = torch.zeros(1, device="cuda")
    win = torch.zeros(5, 13, dtype=torch.uint8, device="cuda")
    K.mask_update_(ps, thr, win, 0)
    m0 = _n_compiled(M._mask_update_kernel)
    for h in range(1, 5):
        K.mask_update_(ps, thr, win, h)
    assert _n_compiled(M._mask_update_kernel) == m0
