"""pytest-benchmark: each Triton kernel against the pure-PyTorch ways users do it today.

    pytest bench/bench_kernels.py --benchmark-only            # GPU: every row
    BENCH_SIZES=small pytest bench/bench_kernels.py            # CPU smoke: PyTorch rows

Triton rows need CUDA (the interpreter is not a benchmark) and are skipped without it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as CS  # noqa: E402

pytest.importorskip("pytest_benchmark")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = CS.SIZES[os.environ.get("BENCH_SIZES", "full" if DEV.type == "cuda" else "small")]
needs_cuda = pytest.mark.skipif(DEV.type != "cuda", reason="Triton rows need CUDA")


def _sync(fn):
    def run():
        out = fn()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module", params=sorted(SETS))
def bset(request):
    ts = CS.make_set(SETS[request.param], DEV)
    return request.param, ts, CS.k_of(ts)


@pytest.mark.parametrize("impl", ["sort", "kthvalue", "topk", "quantile",
                                  pytest.param("triton", marks=needs_cuda)])
def test_threshold(benchmark, bset, impl):
    name, ts, k = bset
    n = sum(t.numel() for t in ts)
    if impl == "quantile" and n > 16_000_000:
        pytest.skip("torch.quantile takes at most 16M elements")
    fn = getattr(CS, f"thr_{impl}")
    benchmark.group = f"threshold {name}"
    benchmark(_sync(lambda: fn(ts, k)))


@pytest.mark.parametrize("impl", ["foreach", pytest.param("optim_fused", marks=needs_cuda),
                                  pytest.param("triton", marks=needs_cuda)])
def test_trunc_sgd(benchmark, bset, impl):
    name, ts, _k = bset
    from worm import reference as R
    grads = [torch.randn_like(t) for t in ts]
    bufs = [torch.zeros_like(t) for t in ts]
    keep = [torch.rand(t.shape, device=DEV) < 0.5 for t in ts]
    benchmark.group = f"trunc+sgd {name}"
    if impl == "foreach":
        keep_f = [torch.where(m, 1.0, 3e-3) for m in keep]
        benchmark(_sync(lambda: CS.sgd_foreach(ts, grads, bufs, keep_f)))
    elif impl == "optim_fused":
        ps = [torch.nn.Parameter(t.clone()) for t in ts]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)
        benchmark(_sync(opt.step))
    else:
        import worm_kernels as K
        bits = [R.pack([m]) for m in keep]
        kw = dict(r=3e-3, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
                  nesterov=False, maximize=False)
        benchmark(_sync(lambda: K.sgd_step_(ts, grads, bufs, [0] * len(ts), bits, **kw)))


@needs_cuda
def test_mask_update(benchmark, bset):
    import worm_kernels as K
    name, ts, k = bset
    from worm import reference as R
    thr, _ = K.select_thresholds(ts, [k], "global")
    B = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(5, B, dtype=torch.uint8, device=DEV)
    benchmark.group = f"mask_update {name}"
    benchmark(_sync(lambda: K.mask_update_(ts, thr, win, 0)))
