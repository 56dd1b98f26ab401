"""Network slimming (EarlyBird(l1=...)): g <- trunc(g) + l1*sign(w) on the representative
weights, then weight decay and momentum (METHOD.md); l1 = 0 is exactly the plain step."""
import pytest
import torch

from testkit import train_steps
from torch import nn

import worm


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))





def _keep(seed=3):
    return torch.rand(9, generator=torch.Generator().manual_seed(seed)) > 0.4


def _hooked(model, l1, keep=None, r=3e-3):
    """The oracle: gradient hooks doing truncation, then the penalty on the gamma only."""
    bn = model[1]
    def on_weight(g):
        if keep is not None:
            g = g * torch.where(keep, torch.ones(()), torch.full((), r))
        return g + l1 * bn.weight.detach().sign()
    bn.weight.register_hook(on_weight)
    if keep is not None:
        bn.bias.register_hook(lambda g: g * torch.where(keep, torch.ones(()), torch.full((), r)))


def _same(a, b, exact=True):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


HYPER = [dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.0), dict(momentum=0.9, nesterov=True)]


@pytest.mark.parametrize("hyper", HYPER)
def test_l1_zero_is_exactly_the_plain_step(hyper):
    a, b = _model(), _model()
    train_steps(a, torch.optim.SGD(a.parameters(), lr=0.1, **hyper))
    opt = worm.WormSGD(b.parameters(), lr=0.1, **hyper)
    search = worm.EarlyBird(b, opt, mode="eb", l1=0.0)
    assert not opt._worm_truncation.penalised
    train_steps(b, opt)
    _same(a, b)


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("truncating", [False, True])
def test_l1_equals_sgd_with_gradient_hooks_reference(hyper, truncating, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "reference")
    l1, keep = 1e-2, _keep()
    a, b = _model(), _model()
    _hooked(a, l1, keep if truncating else None)
    train_steps(a, torch.optim.SGD(a.parameters(), lr=0.1, **hyper))
    opt = worm.WormSGD(b.parameters(), lr=0.1, **hyper)
    search = worm.EarlyBird(b, opt, mode="worm", l1=l1)
    if truncating:
        search._truncation.set({b[1].weight: keep, b[1].bias: keep}, r=3e-3)
    train_steps(b, opt)
    _same(a, b)
    search.close()  # the penalty goes with the search
    assert not opt._worm_truncation.penalised


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_l1_on_the_fused_path_matches_the_reference(backend, monkeypatch):
    info = worm.backend_info("cpu").get(backend)
    if info != "ok":
        pytest.skip(f"{backend} cannot run on CPU here: {info}")
    l1, keep = 1e-2, _keep()
    a, b = _model(), _model()
    _hooked(a, l1, keep)
    train_steps(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    monkeypatch.setenv("WORM_BACKEND", backend)
    opt = worm.WormSGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    search = worm.EarlyBird(b, opt, mode="worm", l1=l1)
    search._truncation.set({b[1].weight: keep, b[1].bias: keep}, r=3e-3)
    opt.set_truncation({b[0].weight: torch.ones_like(b[0].weight, dtype=torch.bool)}, r=3e-3)  # composes
    called = []
    real = worm.ops.backend
    monkeypatch.setattr(worm.ops, "backend", lambda d=None: called.append(1) or real(d))
    train_steps(b, opt)
    assert called, "the fused path did not run"
    _same(a, b, exact=False)
    # the penalty was not truncated: a pruned gamma still moved by about lr * l1 per step


def test_l1_pre_step_pass_for_adamw(monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "reference")
    l1, keep = 1e-2, _keep()
    a, b = _model(), _model()
    _hooked(a, l1, keep)
    train_steps(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1))
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    search = worm.EarlyBird(b, opt, mode="worm", l1=l1)
    search._truncation.set({b[1].weight: keep, b[1].bias: keep}, r=3e-3)
    train_steps(b, opt)
    _same(a, b)


def test_penalty_is_applied_after_truncation():
    # one step from zero loss gradient: a pruned gamma moves by lr*l1 (not lr*l1*r)
    m = nn.BatchNorm1d(4)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    opt = worm.WormSGD(m.parameters(), lr=1.0)
    search = worm.EarlyBird(m, opt, mode="eb", l1=0.25)  # the penalty lives until close()
    opt.set_truncation({m.weight: torch.tensor([True, False, True, False])}, r=0.0)
    m.weight.grad = torch.full((4,), 8.0)
    m.bias.grad = torch.zeros(4)
    opt.step()
    assert m.weight.detach().tolist() == [1.0 - 8.25, -1.0 + 0.25, 2.0 - 8.25, 0.5 - 0.25]
    assert m.bias.detach().tolist() == [0.0] * 4  # the penalty is on gammas, not betas
    assert m.weight.grad.tolist() == [8.0] * 4     # p.grad is left as backward made it
    del search  # the optimizer holds the penalty: dropping the search does not end it
    import gc
    gc.collect()
    assert opt._worm_truncation.penalised
    m.weight.grad = torch.zeros(4)
    before = m.weight.detach().clone()
    opt.step()
    assert torch.equal(m.weight.detach(), before - 0.25 * before.sign())


def test_bad_l1_is_refused_at_construction():
    m = _model()
    opt = worm.WormSGD(m.parameters(), lr=0.1)
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="l1"):
            worm.EarlyBird(m, opt, l1=bad)
    with pytest.raises(ValueError, match="needs the optimizer"):
        worm.EarlyBird(m, None, mode="eb", l1=1e-4)
    with pytest.raises(ValueError, match="maximize"):
        worm.EarlyBird(m, worm.WormSGD(m.parameters(), lr=0.1, maximize=True), l1=1e-4)
    assert worm.EarlyBird(m, opt, l1=1e-4).state_dict()["config"]["l1"] == 1e-4
