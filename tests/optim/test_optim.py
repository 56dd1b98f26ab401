"""WormSGD is torch.optim.SGD when not truncating; truncation is a gradient hook."""
import io
import itertools

import pytest
import torch

from testkit import train_steps
from torch import nn

import worm
from worm import reference as ref

HYPER = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
         for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True),
                                                 (0.0, 1e-2), (False, True))
         if not (n and (m == 0 or d != 0))]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))


def _groups(model, **hyper):
    # two param groups with different lr, the second overriding weight decay
    return [{"params": list(model[0].parameters()) + list(model[1].parameters())},
            {"params": model[3].parameters(), "lr": 0.05, "weight_decay": 0.0}]





def _masks(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=g) > 0.4 for p in (model[0].weight, model[1].weight, model[1].bias)}


def _assert_same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_no_truncation_is_sgd_bit_for_bit(hyper):
    a, b, c = _model(), _model(), _model()
    train_steps(a, torch.optim.SGD(_groups(a), lr=0.1, **hyper))
    train_steps(b, worm.WormSGD(_groups(b), lr=0.1, **hyper))
    opt_c = worm.WormSGD(_groups(c), lr=0.1, **hyper)
    opt_c.set_truncation(_masks(c), r=1.0)  # r == 1: the plain optimizer
    train_steps(c, opt_c)
    _assert_same(a, b)
    _assert_same(a, c)


@pytest.mark.parametrize("hyper", HYPER[::3], ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_truncation_equals_sgd_with_gradient_hooks(hyper, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "reference")
    r = 3e-3
    a, b = _model(), _model()
    for p, keep in _masks(a).items():
        p.register_hook(lambda g, keep=keep: g * torch.where(keep, torch.ones(()), torch.full((), r)))
    train_steps(a, torch.optim.SGD(_groups(a), lr=0.1, **hyper))
    opt = worm.WormSGD(_groups(b), lr=0.1, **hyper)
    opt.set_truncation(_masks(b), r=r)
    train_steps(b, opt)
    _assert_same(a, b)


@pytest.mark.parametrize("hyper", HYPER[::5], ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_truncation_on_default_backend_matches_reference(hyper, monkeypatch):
    # Whatever backend runs on CPU here (C++ op if built, else the reference) agrees
    # with the reference to fp32 rounding (fused kernels may contract to FMA).
    a, b = _model(), _model()
    oa = worm.WormSGD(_groups(a), lr=0.1, **hyper)
    oa.set_truncation(_masks(a), r=3e-3)
    ob = worm.WormSGD(_groups(b), lr=0.1, **hyper)
    ob.set_truncation(_masks(b), r=3e-3)
    train_steps(a, oa)
    monkeypatch.setenv("WORM_BACKEND", "reference")
    train_steps(b, ob)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trips_with_sgd_and_keeps_truncation():
    a = _model()
    opt = worm.WormSGD(a.parameters(), lr=0.1, momentum=0.9)
    masks = _masks(a)
    opt.set_truncation(masks, r=0.01)
    train_steps(a, opt, steps=2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)

    plain = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(sd)  # SGD ignores the extra key
    for p in a.parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])

    again = worm.WormSGD(a.parameters(), lr=0.5)
    again.load_state_dict(sd)
    assert again.param_groups[0]["lr"] == 0.1 and again.truncation == {"r": 0.01, "params": 3}
    for p, keep in masks.items():
        assert torch.equal(again._worm_truncation.bits[p], ref.pack([keep]))

    from_sgd = worm.WormSGD(a.parameters(), lr=0.1, momentum=0.9)
    from_sgd.load_state_dict(plain.state_dict())
    assert from_sgd.truncation is None
    assert set(opt.defaults) == set(torch.optim.SGD(a.parameters(), lr=0.1).defaults)


def test_adamw_pre_hook_equals_gradient_hooks(monkeypatch):
    r = 3e-3
    a, b = _model(), _model()
    for p, keep in _masks(a).items():
        p.register_hook(lambda g, keep=keep: g * torch.where(keep, torch.ones(()), torch.full((), r)))
    train_steps(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1))
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    trunc = worm.truncation_pre_hook(opt)
    trunc.set(_masks(b), r=r)
    train_steps(b, opt)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0) if worm.backend("cpu") == "reference" \
            else torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bad_truncation_inputs():
    m = _model()
    opt = worm.WormSGD(m.parameters(), lr=0.1)
    w = m[0].weight
    with pytest.raises(ValueError, match="shape"):
        opt.set_truncation({w: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        opt.set_truncation({w: torch.ones(w.shape)})
    with pytest.raises(ValueError, match="does not hold"):
        opt.set_truncation({nn.Parameter(torch.ones(2)): torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="r must be finite"):
        opt.set_truncation({w: torch.ones(w.shape, dtype=torch.bool)}, r=float("nan"))
    if torch.device("meta") != w.device:
        with pytest.raises(ValueError, match="on meta"):
            opt.set_truncation({w: torch.ones(w.shape, dtype=torch.bool, device="meta")})

# Sparse gradients: truncated as a hook would (tests/test_dropin.py), no longer refused.
