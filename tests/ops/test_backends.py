"""The routing among implementations and what every op shares: the backends known
and built, the ops without the native extension, strided inputs, the same exception
for the same misuse on every backend, ``torch.library.opcheck`` of each op."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import op_cases as C
from impl_cases import DEV, IMPLS, assert_same, keep_bits, raises, window, with_impls
from worm import _backends, ops
from worm import reference as R


def test_every_backend_is_known_and_reference_is_there():
    assert "reference" in IMPLS
    assert ops.max_window(DEV) == _backends.choose(DEV).max_window
    assert _backends.load("reference").max_window is None  # the reference has no row limit
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
    w1, w2 = window(nb, 3, 1), window(nb, 3, 1)
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


@with_impls()
def test_bad_input_same_exception_on_every_backend(impl):
    ts = C.make("n31", torch.float32, DEV)
    dbl = [torch.zeros(3, dtype=torch.float64, device=DEV)]
    sel = ops.select_thresholds
    raises(ValueError, "one k", sel, ts, [1, 2], "global")
    raises(ValueError, "scope", sel, ts, [1], "rows")
    raises(ValueError, "outside", sel, ts, [32], "global")
    raises(ValueError, "negative", sel, ts, [-1], "global")
    raises(ValueError, "one k per tensor", sel, ts + ts, [1], "layer")
    raises(TypeError, "dtype", sel, dbl, [1], "global")
    raises(ValueError, "empty", sel, [], [0], "global")
    raises(ValueError, "no entries", sel, [torch.zeros(0, device=DEV)], [0], "global")
    raises(TypeError, "not a tensor", sel, [1.0], [0], "global")

    thr = torch.zeros(1, device=DEV)
    win = torch.zeros(2, 4, dtype=torch.uint8, device=DEV)
    mu = ops.mask_update_
    raises(TypeError, "uint8", mu, ts, thr, torch.zeros(2, 4, device=DEV), 0)
    raises(ValueError, "bytes", mu, ts, thr, torch.zeros(2, 5, dtype=torch.uint8, device=DEV), 0)
    raises(IndexError, "head", mu, ts, thr, win, 2)
    raises(IndexError, "head", mu, ts, thr, win, -1)
    raises(ValueError, "one threshold per tensor", mu, ts, torch.zeros(2, device=DEV), win, 0)
    raises(TypeError, "float32", mu, ts, thr.double(), win, 0)
    raises(ValueError, "contiguous", mu, ts, thr, torch.zeros(4, 2, dtype=torch.uint8, device=DEV).t(), 0)
    # window rows: only a backend with a limit (Triton: per-row counts in registers)
    # refuses more; the others take any number of rows, as the reference does
    long = torch.zeros(65, 4, dtype=torch.uint8, device=DEV)
    limit = ops.max_window(DEV)
    if limit is not None:
        raises(ValueError, f"at most {limit}", mu, ts, thr, long, 0)
        raises(ValueError, f"at most {limit}", ops.sample_mask_, ts, [3], "global", long, 0)
    else:
        want = long.cpu().clone()
        assert_same(mu(ts, thr, long, 3), R.mask_update_([t.cpu() for t in ts], thr.cpu(), want, 3),
                    "65 rows")
        assert_same(long, want, "65 rows window")

    g = torch.zeros(31, device=DEV)
    tr = ops.truncate_
    raises(ValueError, "ceil", tr, [g], [torch.zeros(3, dtype=torch.uint8, device=DEV)], 0.1)
    raises(TypeError, "uint8", tr, [g], [torch.zeros(4, device=DEV)], 0.1)
    raises(ValueError, "contiguous", tr, [torch.zeros(8, 4, device=DEV).t()],
            [torch.zeros(4, dtype=torch.uint8, device=DEV)], 0.1)
    raises(ValueError, "packed masks", tr, [g, g], [torch.zeros(4, dtype=torch.uint8, device=DEV)], 0.1)
    # A mask on another device: seen before any backend runs (here by the fake kernel,
    # which the dispatcher picks for the meta tensor).
    raises(ValueError, r"keep_bits\[0\] is on meta", tr, [g],
            [torch.zeros(4, dtype=torch.uint8, device="meta")], 0.1)

    p = torch.zeros(31, device=DEV)
    kw = dict(r=0.1, lr=0.1, weight_decay=0, momentum=0, dampening=0, nesterov=False,
              maximize=False)
    sgd = ops.sgd_step_
    raises(ValueError, r"grads\[0\]", sgd, [p], [torch.zeros(30, device=DEV)], [None], [None], **kw)
    raises(TypeError, r"grads\[0\] has dtype", sgd, [p], [p.half()], [None], [None], **kw)
    raises(ValueError, "ceil", sgd, [p], [p], [None], [torch.zeros(5, dtype=torch.uint8, device=DEV)], **kw)
    raises(TypeError, "dtype", sgd, [p.double()], [p.double()], [None], [None], **kw)
    raises(ValueError, "params but", sgd, [p], [p, p], [None], [None], **kw)
    raises(ValueError, "momentum buffers", sgd, [p], [p], [], [None], **kw)
    raises(ValueError, "contiguous", sgd, [torch.zeros(8, 4, device=DEV).t()],
            [torch.zeros(4, 8, device=DEV).t()], [None], [None], **kw)
    raises(ValueError, "momentum is 0", torch.ops.worm.sgd_step_, [p], [p], [p], [0], [None], **kw)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "cuda" if DEV == "cpu" else "cpp")
    with pytest.raises(RuntimeError, match="cannot run on"):
        ops.select_thresholds(C.make("n31", torch.float32, DEV), [3], "global")
    monkeypatch.setenv("WORM_BACKEND", "fortran")
    with pytest.raises(ValueError, match="not one of"):
        ops.backend(DEV)


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
                          (ts, [n // 2], "global", window(nbytes, 3, seed=2), 1))
    torch.library.opcheck(o.sample_mask_.default,
                          (ts, [t.numel() // 3 for t in ts], "layer", window(nbytes, 2, seed=3), 0))
    grads = [torch.randn(t.shape).to(t.dtype).to(DEV) for t in ts]
    bits = keep_bits(ts, seed=4)
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
