"""``sample_mask_`` through every implementation against the reference
(``worm.reference.sample_mask_``: the reference select, then the reference mask
update, the window untouched on NaN/Inf): thresholds, counts, window bytes exactly."""
from __future__ import annotations

import pytest
import torch

import op_cases as C
from impl_cases import (DEV, INTERPRETED, assert_same, assert_window_and_counts,
                        every_kind_scope_dtype, ks_of, ratios, window, with_impls)
from worm import ops
from worm import reference as R


# ------------------------------------------------------------------ sample_mask_
def _check_sample(ts, ks, scope, win, head, what):
    """sample_mask_ against the reference select, then the reference mask update."""
    cpu = [t.cpu() for t in ts]
    want_thr, want_nf = R.select_thresholds(cpu, ks, scope)
    want_win = win.cpu().clone()
    ref_win = win.cpu().clone()
    ref = R.sample_mask_(cpu, ks, scope, ref_win, head)  # the op's reference, beside the parts
    if int(want_nf.sum()) == 0:
        want_counts = R.mask_update_(cpu, want_thr, want_win, head)
    else:  # NaN/Inf: the window stays as it was
        want_counts = torch.zeros(win.shape[0], dtype=torch.int64)
    assert_same(ref[0], want_thr, f"{what} reference thresholds")
    assert_same(ref[1], want_nf, f"{what} reference nonfinite counts")
    assert_window_and_counts(ref_win, want_win, ref[2], want_counts, f"{what} reference")
    thr, nf, counts = ops.sample_mask_(ts, ks, scope, win, head)
    assert_same(thr, want_thr, f"{what} thresholds")
    assert_same(nf, want_nf, f"{what} nonfinite counts")
    assert_window_and_counts(win, want_win, counts, want_counts, what)


@every_kind_scope_dtype
def test_sample_mask_is_select_then_mask_update(impl, kind, dtype, scope):
    ts = C.make(kind, dtype, DEV)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    rs = ratios(kind, ts)
    if impl == "triton" and INTERPRETED:
        rs = rs[-1:]
    for i, p in enumerate(rs):
        length = (1, 3, 5)[i % 3]
        head = i % length
        _check_sample(ts, ks_of(ts, p, scope), scope, window(nbytes, length, seed=i), head,
                      (kind, p, length, head))


@with_impls()
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_sample_mask_leaves_the_window_on_nonfinite(impl, bad):
    ts = C.make("many_small", torch.float32, DEV)
    ts[2] = ts[2].clone()
    ts[2].view(-1)[1] = float(bad)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    for scope in ("global", "layer"):
        win = window(nbytes, 3, seed=9)
        before = win.clone()
        thr, nf, counts = ops.sample_mask_(ts, ks_of(ts, 0.5, scope), scope, win, 1)
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
        _check_sample(ts, ks_of(ts, 0.4 + 0.05 * step, "global"), "global", win, step % 3, step)
