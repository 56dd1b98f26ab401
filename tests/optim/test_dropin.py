"""WormSGD is a drop-in SGD wherever SGD works (issue 9): each case the issue found,
as a user meets it, on the backend that runs here and on the reference."""
import os

import pytest
import torch

from testkit import backward_and_step, truncating_hook
from torch import nn

import worm
from worm import reference as ref

BACKENDS = ["default", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("WORM_BACKEND", "reference")
    return request.param


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2))





def _keep(p, seed=3):
    return torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def _pair(make, opt_kw, truncate, r=0.01):
    """(SGD + hooks, WormSGD + set_truncation) on two copies; truncate: model -> params."""
    a, b = make(), make()
    for p in truncate(a):
        p.register_hook(truncating_hook(_keep(p), r))
    oa = torch.optim.SGD(a.parameters(), **opt_kw)
    ob = worm.WormSGD(b.parameters(), **opt_kw)
    ob.set_truncation({p: _keep(p) for p in truncate(b)}, r=r)
    return a, oa, b, ob


def _run(model, opt, xs, scaler=None, autocast=None):
    for x in xs:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = model(x).float().pow(2).mean()
        backward_and_step(loss, opt, scaler)


def _inputs(n=3, channels_last=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 8, 8, generator=g).to(dtype) for _ in range(n)]
    return [x.to(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def _close(a, b, exact):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------ layouts and dtypes
def test_channels_last_cnn_truncates_from_the_first_step(backend):
    make = lambda: _cnn().to(memory_format=torch.channels_last)  # noqa: E731
    bn_and_conv = lambda m: [m[0].weight, m[1].weight, m[1].bias]  # noqa: E731
    a, oa, b, ob = _pair(make, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), bn_and_conv)
    xs = _inputs(channels_last=True)
    _run(a, oa, xs)
    _run(b, ob, xs)
    _close(a, b, exact=backend == "reference")
    assert b[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_cnn_with_the_search(backend):
    m = _cnn().to(memory_format=torch.channels_last)
    opt = worm.WormSGD(m.parameters(), lr=0.1, momentum=0.9)
    s = worm.EarlyBird(m, opt, mode="truncate")
    assert s.step().truncating
    _run(m, opt, _inputs(channels_last=True))  # raised at the first step before


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_float64_and_complex_params(dtype, backend):
    def make():
        torch.manual_seed(0)
        return nn.ParameterList([nn.Parameter(torch.randn(5, 3).to(dtype)),
                                 nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(4, 6).t())])
    a, oa, b, ob = _pair(make, dict(lr=0.1, momentum=0.9, nesterov=True), lambda m: list(m))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in a]
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            sum(((p * gr).real if p.is_complex() else p * gr).sum() for p, gr in zip(m, grads)).backward()
            o.step()
    for p, q in zip(a, b):  # float64/complex and the transposed weight: torch's path, bit for bit;
        if p.dtype == torch.float32 and p.is_contiguous():  # the fp32 kernel: 1 ulp (FMA)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q)


def test_float64_model_with_the_search(backend):
    m = _cnn().double()
    opt = worm.WormSGD(m.parameters(), lr=0.1, momentum=0.9)
    s = worm.EarlyBird(m, opt, mode="truncate")
    s.step()
    _run(m, opt, _inputs(dtype=torch.float64))
    s.step()
    # a float64 score ranks as its fp32 value, as in the reference
    thr = ref.thresholds([m[1].weight.detach().float()], 0.5)
    assert torch.equal(s.mask[m[1].weight], m[1].weight.detach().float().abs() > thr[0])


def test_half_after_momentum_buffers_exist(backend):
    a, oa, b, ob = _pair(_cnn, dict(lr=0.1, momentum=0.9), lambda m: [m[1].weight, m[1].bias])
    for m, o in ((a, oa), (b, ob)):
        _run(m, o, _inputs(1))
        m.half()  # fp16 params, fp32 momentum buffers: SGD's own path takes them
        _run(m, o, _inputs(2, dtype=torch.float16))
    assert b[1].weight.dtype == torch.float16
    assert ob.state[b[1].weight]["momentum_buffer"].dtype == torch.float32
    _close(a, b, exact=backend == "reference")


# -------------------------------------------------------- foreach / fused / AMP
@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_and_fused_requests_are_torch_paths_bit_for_bit(flags, dtype):
    make = lambda: _cnn().to(dtype)  # noqa: E731
    a, oa, b, ob = _pair(make, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, **flags),
                         lambda m: [m[1].weight, m[1].bias])
    xs = _inputs(dtype=dtype)
    _run(a, oa, xs)
    _run(b, ob, xs)
    _close(a, b, exact=True)


@pytest.mark.parametrize("fused", [True, None])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_grad_scaler_honoured_as_sgd_does(fused, autocast, backend):
    a, oa, b, ob = _pair(_cnn, dict(lr=0.1, momentum=0.9, fused=fused),
                         lambda m: [m[1].weight, m[1].bias])
    assert getattr(ob, "_step_supports_amp_scaling", False) == getattr(oa, "_step_supports_amp_scaling", False)
    xs = _inputs(4)
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2))
    _run(a, oa, xs, sa, autocast)
    _run(b, ob, xs, sb, autocast)
    _close(a, b, exact=bool(fused) or backend == "reference")
    assert sa.get_scale() == sb.get_scale()


def test_grad_scaler_inf_step_is_skipped_with_fused():
    a, oa, b, ob = _pair(_cnn, dict(lr=0.1, momentum=0.9, fused=True), lambda m: [m[1].weight])
    for m, o in ((a, oa), (b, ob)):
        sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        o.zero_grad()
        sc.scale(m(_inputs(1)[0]).pow(2).mean()).backward()
        m[1].weight.grad[0] = float("inf")
        before = [p.detach().clone() for p in m.parameters()]
        sc.step(o)
        sc.update()
        assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
        assert sc.get_scale() == 2.0 ** 15


def test_pre_hook_with_fused_adamw_and_grad_scaler():
    a, b = _cnn(), _cnn()
    for p in (a[1].weight, a[1].bias):
        p.register_hook(truncating_hook(_keep(p), 0.01))
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    worm.truncation_pre_hook(ob).set({p: _keep(p) for p in (b[1].weight, b[1].bias)}, r=0.01)
    xs = _inputs(3)
    _run(a, oa, xs, torch.amp.GradScaler("cpu"), torch.bfloat16)
    _run(b, ob, xs, torch.amp.GradScaler("cpu"), torch.bfloat16)
    _close(a, b, exact=True)


# ----------------------------------------------------------- hooks, owners, grad
def test_step_hooks_run_once_per_step_when_an_sgd_exists():
    torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)  # wraps SGD.step with the hook runner
    x = nn.Parameter(torch.randn(20))
    opt = worm.WormSGD([x], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    s = worm.EarlyBird(None, opt, mode="worm", layers=[x], every=2, window=3)
    for i in range(6):
        if i == 3:
            opt.set_truncation(None)
        x.grad = torch.randn(20)
        opt.step()
    assert calls == ["pre", "post"] * 6
    assert [r.step for r in s.history] == [2, 4, 6]


@pytest.mark.parametrize("kind", ["wormsgd", "adamw"])
def test_searches_on_different_params_compose(kind):
    a, b = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10))
    opt = worm.WormSGD([a, b], lr=1.0) if kind == "wormsgd" else torch.optim.SGD([a, b], lr=1.0)
    s1 = worm.EarlyBird(None, opt, mode="truncate", layers=[a], r=0.01)
    s2 = worm.EarlyBird(None, opt, mode="truncate", layers=[b], r=0.5)
    s1.step()
    s2.step()
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.ones(10), torch.ones(10)
    opt.step()
    assert torch.equal(a.detach(), a0 - torch.where(s1.mask[a], 1.0, 0.01))
    assert torch.equal(b.detach(), b0 - torch.where(s2.mask[b], 1.0, 0.5))
    s1.close()  # one search's end leaves the other's truncation on
    a.grad, b.grad = torch.ones(10), torch.ones(10)
    b1 = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b1 - torch.where(s2.mask[b], 1.0, 0.5))


@pytest.mark.parametrize("kind", ["wormsgd", "adamw"])
def test_second_search_on_the_same_params_is_refused(kind):
    m = _cnn()
    opt = worm.WormSGD(m.parameters(), lr=0.1) if kind == "wormsgd" else torch.optim.AdamW(m.parameters())
    s1 = worm.EarlyBird(m, opt, mode="worm")
    with pytest.raises(ValueError, match="already truncated by an EarlyBird search"):
        worm.EarlyBird(m, opt, mode="worm")
    worm.EarlyBird(m, opt, mode="eb")  # a search that never truncates is fine
    if kind == "wormsgd":
        with pytest.raises(ValueError, match="already truncated"):
            opt.set_truncation({m[1].weight: torch.ones(4, dtype=torch.bool)})
        opt.set_truncation({m[0].weight: _keep(m[0].weight)})  # other params: composes
    s1.close()
    worm.EarlyBird(m, opt, mode="worm")  # closed: its params are free again


def test_a_dropped_search_keeps_truncating_and_holds_its_params():
    # the optimizer holds what it needs (as torch's own hooks do): a search not kept in
    # a variable keeps truncating, so its parameters stay taken until close()
    m = _cnn()
    opt = torch.optim.AdamW(m.parameters())
    worm.EarlyBird(m, opt, mode="truncate").step()  # dropped at once
    import gc
    gc.collect()
    assert opt._worm_truncation.active
    with pytest.raises(ValueError, match="already truncated by an EarlyBird search"):
        worm.EarlyBird(m, opt, mode="truncate")


def test_p_grad_after_step_is_the_raw_gradient_on_every_backend(backend):
    w = nn.Parameter(torch.ones(16))
    opt = worm.WormSGD([w], lr=0.1, momentum=0.9)
    opt.set_truncation({w: torch.arange(16) % 2 == 0}, r=0.01)
    for _ in range(2):
        w.grad = torch.full((16,), 3.0)
        opt.step()
        assert torch.equal(w.grad, torch.full((16,), 3.0))


def test_pre_hook_leaves_the_truncated_gradient_as_a_hook_does(backend):
    w = nn.Parameter(torch.ones(16))
    opt = torch.optim.SGD([w], lr=0.1)
    keep = torch.arange(16) % 2 == 0
    worm.truncation_pre_hook(opt).set({w: keep}, r=0.5)
    w.grad = torch.full((16,), 3.0)
    opt.step()
    assert torch.equal(w.grad, torch.where(keep, 3.0, 1.5))


def test_sparse_gradient_truncated_like_a_hook(backend):
    def make():
        torch.manual_seed(0)
        return nn.Embedding(10, 4, sparse=True)
    a, oa, b, ob = _pair(make, dict(lr=0.1), lambda m: [m.weight], r=0.1)
    idx = torch.tensor([1, 2, 2, 7])
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        m(idx).pow(2).sum().backward()
        o.step()
    assert torch.equal(a.weight, b.weight)


# ------------------------------------------------------- failures change nothing
def test_failed_wormsgd_step_changes_nothing(monkeypatch):
    m = _cnn()
    opt = worm.WormSGD([{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.5}],
                       lr=0.1, momentum=0.9)
    opt.set_truncation({m[1].weight: _keep(m[1].weight)}, r=0.01)
    _run(m, opt, _inputs(1))
    m(_inputs(1)[0]).sum().backward()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bufs = {p: opt.state[p]["momentum_buffer"].clone() for p in m.parameters() if p in opt.state}
    real = worm.ops.backend
    calls = []

    def flaky(device):
        calls.append(device)
        if len(calls) > 1:
            raise RuntimeError("backend went away")
        return real(device)
    monkeypatch.setattr(worm.ops, "backend", flaky)
    with pytest.raises(RuntimeError, match="went away"):
        opt.step()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for p, b in bufs.items())


def test_failed_search_step_changes_nothing(monkeypatch):
    x = nn.Parameter(torch.randn(40))
    opt = worm.WormSGD([x], lr=0.1)
    s = worm.EarlyBird(None, opt, mode="truncate", layers=[x], window=3)
    s.step()
    sd = s.state_dict()
    trunc = dict(opt._worm_truncation.bits)
    with torch.no_grad():
        x.mul_(-1.5)

    def broken(bits, r):
        raise RuntimeError("cannot set masks")
    monkeypatch.setattr(s._truncation, "set_bits", broken)
    with pytest.raises(RuntimeError, match="cannot set masks"):
        s.step()
    after = s.state_dict()
    assert all(torch.equal(after["ring"][k], v) for k, v in sd["ring"].items()) and after["count"] == sd["count"]
    assert after["history"] == sd["history"] and after["truncating"] == sd["truncating"]
    assert opt._worm_truncation.bits.keys() == trunc.keys()
    assert all(torch.equal(opt._worm_truncation.bits[p], trunc[p]) for p in trunc)


def test_nonfinite_weights_leave_the_search_unchanged():
    x = nn.Parameter(torch.randn(40))
    s = worm.EarlyBird(None, None, mode="eb", layers=[x], window=3)
    s.step()
    sd = s.state_dict()
    with torch.no_grad():
        x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.step()
    now = s.state_dict()
    assert all(torch.equal(now["ring"][k], v) for k, v in sd["ring"].items()) and now["count"] == 1


# ----------------------------------------------------------- search arguments
@pytest.mark.parametrize("kw, match", [
    (dict(r=float("nan")), "r must be finite"), (dict(r=-1.0), "r must be finite"),
    (dict(r="0.1"), "r must be a number"), (dict(delta=float("nan")), "delta"),
    (dict(delta=-0.1), "delta"), (dict(stop=float("inf")), "stop"), (dict(stop=0.0), "stop"),
    (dict(window=2.5), "window"), (dict(window=True), "window"), (dict(window=1), "window"),
    (dict(every=0), "every"), (dict(every=1.5), "every"), (dict(prune_ratio=1.0), "prune_ratio"),
    (dict(prune_ratio=float("nan")), "prune_ratio"), (dict(mode="fast"), "mode"),
    (dict(scope="net"), "scope"), (dict(layers=lambda m: [torch.arange(4)]), "int64"),
    (dict(layers=lambda m: [torch.zeros(4, dtype=torch.complex64)]), "complex64"),
])
def test_every_argument_is_checked_at_construction(kw, match):
    m = _cnn()
    opt = worm.WormSGD(m.parameters(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        worm.EarlyBird(m, opt, **{"mode": "worm", **kw})
    assert opt._worm_truncation._owners.keys() == {"user"}  # nothing left behind
    assert not opt._optimizer_step_post_hooks


def test_optimizer_argument_type_is_checked():
    m = _cnn()
    with pytest.raises(TypeError, match="optimizer"):
        worm.EarlyBird(m, "sgd", mode="eb")


def _window_run(window, steps, backend):
    x = nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    os.environ["WORM_BACKEND"] = backend
    try:
        s = worm.EarlyBird(None, None, mode="eb", layers=[x], window=window, stop=1e-9)
        for _ in range(steps):
            with torch.no_grad():
                x.add_(torch.randn(200, generator=g) * 0.05)
            s.step()
    finally:
        del os.environ["WORM_BACKEND"]
    return s


def _backends_here():
    return ["reference"] + [b for b in ("cpp", "triton") if worm.backend_info("cpu")[b] == "ok"]


@pytest.mark.parametrize("be", _backends_here())
def test_windows_longer_than_one_op_call_are_split(be, monkeypatch):
    # a backend may take a limited number of rows per call (Triton: 64); a limit of 2
    # on every backend tests the split
    whole = _window_run(5, 9, be)
    monkeypatch.setattr(worm.ops, "max_window", lambda device=None: 2)
    split = _window_run(5, 9, be)
    assert [h.distances for h in split.history] == [h.distances for h in whole.history]
    assert whole.history[-1].distances is not None
    assert torch.equal(split._window.ring, whole._window.ring)


def test_window_over_64_on_every_backend():
    runs = {be: _window_run(65, 3, be) for be in _backends_here()}  # Triton refused > 64 before
    for s in runs.values():
        assert torch.equal(s._window.ring, runs["reference"]._window.ring)


def test_non_contiguous_bn_weight_truncates_its_bias_too():
    m = nn.BatchNorm1d(6)
    m.weight = nn.Parameter(torch.randn(12)[::2])
    opt = worm.WormSGD(m.parameters(), lr=1.0)
    s = worm.EarlyBird(m, opt, mode="truncate")
    s.step()
    assert torch.equal(opt._worm_truncation.bits[m.bias], opt._worm_truncation.bits[m.weight])
    assert torch.equal(opt._worm_truncation.bits[m.weight], ref.pack([s.mask[m.weight]]))


# ------------------------------------------------------------------ state dicts
def test_search_state_from_other_shapes_is_refused_naming_the_tensor():
    a = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(6))
    b = nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm1d(4))  # same total of 10 entries
    sa = worm.EarlyBird(a, None, mode="eb")
    sa.step()
    sb = worm.EarlyBird(b, None, mode="eb")
    with pytest.raises(ValueError, match=r"representative tensor 0 \(0.weight\) has shape \(6,\)"):
        sb.load_state_dict(sa.state_dict())
    assert sb._window.count == 0 and not sb.history


def test_optimizer_state_from_another_model_is_refused():
    a = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4))
    b = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 6))  # same counts, other shapes
    oa = worm.WormSGD(a.parameters(), lr=0.1, momentum=0.9)
    a(torch.randn(2, 4)).sum().backward()
    oa.step()
    ob = worm.WormSGD(b.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffer of parameter 0 has shape"):
        ob.load_state_dict(oa.state_dict())
    assert not ob.state
