"""Property tests: each of the ops, on every implementation this machine runs,
against the pure-PyTorch reference (worm.reference), over random tensor sets.

Exact: thresholds, NaN/Inf counts, packed masks, XOR counts, truncation. sgd_step_:
the documented bound (fp32 bit for bit but for FMA contraction, 1 ulp; bf16/fp16
1 ulp of the dtype at the scale of the tensor).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worm
from worm import ops
from worm import reference as ref
from worm.ops.sgd_step import with_optional_buffers

IMPLS = [n for n, why in worm.backend_info("cpu").items() if why == "ok"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N = int(os.environ.get("WORM_PROP_EXAMPLES", "80"))


def _settings(impl):
    # the Triton interpreter runs a launch in ~0.1-1 s on the CPU: fewer examples there
    n = max(3, N // 8) if impl == "triton" and not torch.cuda.is_available() else N // 2
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", request.param)
    return request.param


tensor_set = st.lists(st.tuples(st.sampled_from(DTYPES), st.integers(1, 70)), min_size=1, max_size=4)


def _tensors(spec, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for dt, n in spec:
        t = torch.randn(n, generator=g)
        if ties:  # few distinct magnitudes: ties at the threshold must be pruned alike
            t = torch.round(t * 2) / 2
        out.append(t.to(dt))
    return out


def _run(impl, fn):
    @given(data=st.data())
    def inner(data):
        fn(data)
    _settings(impl)(inner)()


def test_select_thresholds_and_mask_update_match_the_reference(impl):
    def check(data):
        spec = data.draw(tensor_set)
        ts = _tensors(spec, data.draw(st.integers(0, 2 ** 16)), ties=data.draw(st.booleans()))
        scope = data.draw(st.sampled_from(["global", "layer"]))
        if scope == "global":
            ks = [data.draw(st.integers(0, sum(t.numel() for t in ts)))]
        else:
            ks = [data.draw(st.integers(0, t.numel())) for t in ts]
        thr, nonfinite = ops.select_thresholds(ts, ks, scope)
        scores = [t.float().abs() for t in ts]
        if scope == "global":
            want = ref._kth(torch.cat(scores), ks[0]).reshape(1).expand(len(ts))
        else:
            want = torch.stack([ref._kth(s, k) for s, k in zip(scores, ks)])
        assert torch.equal(thr, want) and not nonfinite.any()
        rows = data.draw(st.integers(1, 5))
        head = data.draw(st.integers(0, rows - 1))
        g = torch.Generator().manual_seed(7)
        window = torch.randint(0, 256, (rows, ref.byte_offsets([t.numel() for t in ts])[-1]),
                               generator=g, dtype=torch.uint8)
        want_window = window.clone()
        want_counts = ref.mask_update_(ts, thr, want_window, head)
        fused_window = window.clone()
        counts = ops.mask_update_(ts, thr, window, head)
        assert torch.equal(window, want_window) and torch.equal(counts, want_counts)
        # the fused step: the same thresholds, window and counts in one op
        f_thr, f_nonfinite, f_counts = ops.sample_mask_(ts, ks, scope, fused_window, head)
        assert torch.equal(f_thr, want) and not f_nonfinite.any()
        assert torch.equal(fused_window, want_window) and torch.equal(f_counts, want_counts)
    _run(impl, check)


def test_sample_mask_with_nonfinite_changes_nothing(impl):
    def check(data):
        spec = data.draw(tensor_set)
        ts = _tensors(spec, data.draw(st.integers(0, 2 ** 16)))
        i = data.draw(st.integers(0, len(ts) - 1))
        j = data.draw(st.integers(0, ts[i].numel() - 1))
        ts[i].view(-1)[j] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        scope = data.draw(st.sampled_from(["global", "layer"]))
        ks = [sum(t.numel() for t in ts) // 2] if scope == "global" else [t.numel() // 2 for t in ts]
        g = torch.Generator().manual_seed(3)
        window = torch.randint(0, 256, (3, ref.byte_offsets([t.numel() for t in ts])[-1]),
                               generator=g, dtype=torch.uint8)
        before = window.clone()
        thr, nonfinite, counts = ops.sample_mask_(ts, ks, scope, window, 1)
        assert thr.isnan().all() and nonfinite.tolist() == [int(k == i) for k in range(len(ts))]
        assert torch.equal(window, before) and counts.tolist() == [0, 0, 0]
    _run(impl, check)


def test_truncate_matches_the_reference(impl):
    def check(data):
        spec = data.draw(tensor_set)
        seed = data.draw(st.integers(0, 2 ** 16))
        r = data.draw(st.sampled_from([0.0, 3e-3, 0.5, 1.0, 2.0]))
        grads = _tensors(spec, seed)
        bits = [ref.pack([torch.rand(g.shape, generator=torch.Generator().manual_seed(seed + i)) > 0.5])
                for i, g in enumerate(grads)]
        want = [g.clone() for g in grads]
        ref.truncate_(want, bits, r)
        ops.truncate_(grads, bits, r)
        for a, b in zip(grads, want):
            assert torch.equal(a, b)
    _run(impl, check)


def test_sgd_step_matches_the_reference(impl):
    def check(data):
        spec = data.draw(tensor_set)
        seed = data.draw(st.integers(0, 2 ** 16))
        momentum = data.draw(st.sampled_from([0.0, 0.9]))
        dampening = data.draw(st.sampled_from([0.0, 0.1]))
        hyper = dict(r=data.draw(st.sampled_from([0.0, 3e-3, 1.0])), lr=data.draw(st.sampled_from([0.1, 1e-3])),
                     weight_decay=data.draw(st.sampled_from([0.0, 1e-2])), momentum=momentum,
                     dampening=dampening, nesterov=data.draw(st.booleans()) and momentum != 0 and dampening == 0,
                     maximize=data.draw(st.booleans()))
        params = _tensors(spec, seed)
        grads = _tensors(spec, seed + 1)
        fresh = [data.draw(st.booleans()) for _ in params] if momentum else [True] * len(params)
        bufs = [None if f else b for f, b in zip(fresh, _tensors(spec, seed + 2))]
        bits = [ref.pack([torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + i)) > 0.5])
                if data.draw(st.booleans()) else None for i, p in enumerate(params)]
        want_p = [p.clone() for p in params]
        want_b = with_optional_buffers(ref.sgd_step_, want_p, grads,
                                       [None if b is None else b.clone() for b in bufs], bits, **hyper)
        grads_before = [g.clone() for g in grads]
        got_b = ops.sgd_step_(params, grads, bufs, bits, **hyper)
        for g, g0 in zip(grads, grads_before):
            assert torch.equal(g, g0)  # grads are read, never written
        pairs = list(zip(params, want_p)) + ([(a, b) for a, b in zip(got_b, want_b)] if momentum else [])
        for a, b in pairs:
            if impl == "reference":
                assert torch.equal(a, b)
            else:
                bound = 2 * torch.finfo(a.dtype).eps * max(b.abs().max().item(), 1.0)
                assert (a.float() - b.float()).abs().max().item() <= bound
    _run(impl, check)
