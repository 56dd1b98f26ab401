"""``select_thresholds`` through every implementation against the reference
(``worm.reference.select_thresholds`` / ``thresholds``, torch.kthvalue): thresholds
and NaN/Inf counts equal exactly."""
from __future__ import annotations

import pytest
import torch

import op_cases as C
from impl_cases import (DEV, IMPLS, INTERPRETED, assert_same, every_kind_scope_dtype, kth_oracle,
                        ks_of, ratios, with_impls)
from worm import ops
from worm import reference as R


# ------------------------------------------------------------------ thresholds
@every_kind_scope_dtype
def test_select_thresholds_exact(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    rs = ratios(kind, ts)
    if impl == "triton" and INTERPRETED:
        rs = (0.5,) + tuple(C.k_edge_ratios(ts))
    for p in rs:
        thr, nonfinite = ops.select_thresholds(ts, ks_of(ts, p, scope), scope)
        assert thr.dtype == torch.float32 and thr.shape == (len(ts),)
        assert nonfinite.dtype == torch.int64
        assert_same(thr, R.thresholds([t.cpu() for t in ts], p, scope), (kind, p, scope))
        assert_same(nonfinite, torch.zeros(len(ts), dtype=torch.int64), "nonfinite")
        ref_thr, ref_nf = R.select_thresholds([t.cpu() for t in ts], ks_of(ts, p, scope), scope)
        assert_same(thr, ref_thr, (kind, p, scope, "reference op"))
        assert_same(nonfinite, ref_nf, "reference nonfinite")


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
            thr, _ = ops.select_thresholds(ts, ks_of(ts, p, scope), scope)
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
        assert_same(thr, kth_oracle(ts, ks, scope), (scope, ks))


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
        thr, nonfinite = ops.select_thresholds(ts, ks_of(ts, 0.5, scope), scope)
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
                thr, _ = ops.select_thresholds(ts, ks_of(ts, p, scope), scope)
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
    thr, nf = ops.select_thresholds(ts, ks_of(ts, 0.5, "global"), "global")
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


# ------------------------------------------- the sharded select's passes (live path)
# The per-pass radix select of worm.distributed (the histograms the ranks all-reduce),
# run in one process: pass by pass it selects the reference's thresholds.
def _kth_smallest(ts, ks, scope, shards=1):
    from worm.distributed import kth_smallest
    pieces = [[t.detach().float().abs().reshape(-1)[r::shards] for r in range(shards)] for t in ts]
    if scope == "global":
        thr, _ = kth_smallest([[x for ps in pieces for x in ps]], ks, group=False)
        return thr.expand(len(ts)).clone()
    thr, _ = kth_smallest(pieces, ks, group=False)
    return thr


@pytest.mark.parametrize("kind", C.SMALL_KINDS + ("small_and_large",))
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_radix_passes_match_reference(kind, dtype, scope):
    ts = C.make(kind, dtype)
    for p in ratios(kind, ts):
        thr = _kth_smallest(ts, ks_of(ts, p, scope), scope)
        assert_same(thr, R.thresholds(ts, p, scope), (kind, p, scope))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_radix_histograms_summed_over_shards_give_the_same_threshold(scope):
    """Each 'rank' holds a slice of every tensor; summing the pass histograms (what an
    all_reduce does) selects exactly the threshold of the whole set."""
    ts = C.make("half_ties", torch.float32) + C.make("n4097", torch.bfloat16)
    ks = ks_of(ts, 0.4, scope)
    assert_same(_kth_smallest(ts, ks, scope, shards=3), R.thresholds(ts, 0.4, scope), scope)


@with_impls()
def test_select_marks_nonfinite_segments(impl):
    ts = C.make("many_small", torch.float32, DEV)
    ts[4][0] = float("nan")
    for select in (ops.select_thresholds, R.select_thresholds):
        thr, nf = select(ts, [1] * len(ts), "layer")
        assert int(nf[4]) == 1 and int(nf.sum()) == 1
        assert torch.isnan(thr).all()  # NaN anywhere: NaN everywhere, as every kernel does
