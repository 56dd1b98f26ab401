"""``mask_update_`` through every implementation against the reference
(``worm.reference.mask_update_``): window bytes and XOR counts equal exactly."""
from __future__ import annotations

import pytest
import torch

import op_cases as C
from impl_cases import (DEV, INTERPRETED, assert_same, assert_window_and_counts,
                        every_kind_scope_dtype, ratios, window, with_impls)
from worm import ops
from worm import reference as R


def _check_mask_update(ts, thr, win, head, what):
    want_win = win.cpu().clone()
    want = R.mask_update_([t.cpu() for t in ts], thr.cpu(), want_win, head)
    got = ops.mask_update_(ts, thr, win, head)
    assert_window_and_counts(win, want_win, got, want, what)


@every_kind_scope_dtype
def test_mask_update_exact(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    if impl == "triton" and INTERPRETED:  # ~1 s a call: a window of 1 and one of 3
        rs = ratios(kind, ts)
        plan = [(rs[min(1, len(rs) - 1)], 1, (0,)), (rs[-1], 3, (0, 1, 2))]
    else:
        lengths = (1, 3) if kind in C.LARGE_KINDS else (1, 2, 3, 4, 5)
        plan = [(p, n, sorted({0, n // 2, n - 1})) for p in ratios(kind, ts)[:3] for n in lengths]
    for p, length, heads in plan:
        thr = R.thresholds([t.cpu() for t in ts], p, scope).to(DEV)
        for head in heads:
            win = window(nbytes, length, seed=length * 7 + head)
            _check_mask_update(ts, thr, win, head, (kind, p, length, head))


@with_impls()
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
def test_mask_update_every_head(impl, length):
    ts = C.make("many_small", torch.float32, DEV)
    thr = R.thresholds([t.cpu() for t in ts], 0.5, "layer").to(DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for head in range(length):
        _check_mask_update(ts, thr, window(nbytes, length, length * 10 + head), head, head)


@with_impls()
def test_mask_update_thresholds_at_the_edges(impl):
    """-inf keeps all, +inf and NaN thresholds keep none, ties at thr are pruned."""
    ts = C.make("half_ties", torch.float32, DEV) + C.make("many_small", torch.bfloat16, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for v in (float("-inf"), float("inf"), float("nan"), 0.25, 0.0):
        thr = torch.full((len(ts),), v, device=DEV)
        _check_mask_update(ts, thr, window(nbytes, 2, 5), 1, v)


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
