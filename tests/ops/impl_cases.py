"""What the op test files share: the implementations here, the fixtures' parameters,
the kth oracle, exact comparison, and small builders (windows, packed keep bits).

Each op's test file (tests/ops/test_<op>.py) runs every implementation this machine
has, the reference among them (``reference`` is always in IMPLS), against
``worm.reference`` (the oracle): the reference stands beside every backend. The
``impl`` fixture (tests/ops/conftest.py) forces one with WORM_BACKEND.
"""
from __future__ import annotations

import pytest
import torch

import op_cases as C
from worm import _backends
from worm import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = _backends.available(DEV)
INTERPRETED = DEV == "cpu"  # Triton on CPU runs in the (slow) interpreter
slow = pytest.mark.slow


def slow_for_triton(impl, heavy):
    return [slow] if heavy and impl == "triton" and INTERPRETED else []


def impl_params(heavy=False):
    return [pytest.param(i, marks=slow_for_triton(i, heavy), id=i) for i in IMPLS]


def with_impls(heavy=False):
    return pytest.mark.parametrize("impl", impl_params(heavy), indirect=True)


def impl_kind_params(kinds):
    return [pytest.param(i, k, marks=slow_for_triton(i, k in C.LARGE_KINDS), id=f"{i}-{k}")
            for i in IMPLS for k in kinds]


def every_kind_scope_dtype(test):
    """Runs test(impl, kind, dtype, scope) on every implementation, case kind, scope, dtype."""
    test = pytest.mark.parametrize("dtype", C.DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("scope", ["global", "layer"])(test)
    return pytest.mark.parametrize("impl,kind", impl_kind_params(C.KINDS), indirect=["impl"])(test)


def ks_of(tensors, p, scope):
    if scope == "global":
        return [R.num_pruned(sum(t.numel() for t in tensors), p)]
    return [R.num_pruned(t.numel(), p) for t in tensors]


def ratios(kind, tensors):
    if kind in C.LARGE_KINDS:
        return (0.5,) + tuple(C.k_edge_ratios(tensors)[1:2])
    return tuple(C.RATIOS) + tuple(C.k_edge_ratios(tensors))


def kth_oracle(tensors, ks, scope):
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


def window(nbytes, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length, nbytes), generator=g, dtype=torch.uint8).to(DEV)


def assert_window_and_counts(win, want_win, counts, want_counts, what):
    assert counts.dtype == torch.int64 and counts.shape == (win.shape[0],)
    assert_same(win, want_win, f"{what} window bytes")
    assert_same(counts, want_counts, f"{what} xor counts")


def keep_bits(tensors, seed, none_every=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(tensors):
        if none_every and i % none_every == 1:
            out.append(None)
            continue
        out.append(R.pack([torch.rand(t.shape, generator=g) < 0.6]).to(t.device))
    return out


def raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
