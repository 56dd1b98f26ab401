"""prune_channels on CNNs it has no code for: torchvision models built with random
weights (never a download) and a user's own net with concat, depthwise and grouped
convs and squeeze-excitation. The result is a plain, smaller nn.Module that computes
what the original computes with the removed channels zeroed."""
import copy
import io

import pytest
import torch

from testkit import zeroed_realised
from torch import nn

import worm
import worm.paper.models
from worm import reference
from worm.prune import count_flops, count_params, floor_ticket, prune_channels

torchvision = pytest.importorskip("torchvision")


class _SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 4), 1), nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def _cbr(i, o, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class UserNet(nn.Module):
    """A plain chain, a concat of two branches into a grouped conv, a depthwise conv
    with SE, a residual add."""

    def __init__(self, c=3):
        super().__init__()
        self.a, self.b = nn.Sequential(_cbr(c, 12), _cbr(12, 8)), _cbr(c, 8)
        self.g = _cbr(16, 16, groups=4, stride=2)
        self.dw = _cbr(16, 16, groups=16)
        self.se = _SE(16)
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.g(torch.cat([self.a(x), self.b(x)], 1))
        x = torch.relu(x + self.pw(self.se(self.dw(x))))
        return self.head(x.mean((2, 3)))


def _tv(name, **kw):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kw)


ARCHS = {
    "resnet18": _tv("resnet18"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "regnet_x_400mf": _tv("regnet_x_400mf"),          # grouped convs
    "densenet_tiny": lambda: torchvision.models.DenseNet(8, (2, 2), 16, num_classes=10),  # concat
    "user": UserNet,
}


def _random_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.05)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _global_ticket(model, p=0.5):
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return dict(zip(gammas, reference.masks([g.detach().float() for g in gammas], p, scope="global")))





def _no_hooks(model):
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m).__name__
        assert not hasattr(m, "parametrizations")


@pytest.fixture(scope="module", params=list(ARCHS))
def pruned(request):
    torch.manual_seed(0)
    model = _random_bn(ARCHS[request.param](), seed=1).eval()
    ticket = _global_ticket(model)
    x = torch.randn(2, 3, 32, 32)
    small, plan = prune_channels(model, ticket, x[:1], return_plan=True)
    return request.param, model, ticket, small, plan, x


def test_smaller_plain_module_that_computes_the_zeroed_original(pruned):
    name, model, ticket, small, plan, x = pruned
    assert count_params(small) < count_params(model)
    assert count_flops(small, (1, 3, 32, 32)) < count_flops(model, (1, 3, 32, 32))
    _no_hooks(small)
    _no_hooks(model)
    assert not small.training
    with torch.no_grad():
        got, want, full = small(x), zeroed_realised(model, plan)(x), model(x)
    assert not torch.allclose(full, want, rtol=1e-4, atol=1e-4), "pruning changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the plan accounts for every ticket BN, and "any" keeps every channel the ticket keeps
    # except where a grouped conv forces the same positions in every slice
    assert set(plan.realised) == set(plan.ticket) and plan.channels == sum(k.numel() for k in ticket.values())
    grouped = any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels for m in model.modules())
    assert plan.removed == 0 or grouped
    assert 0 <= plan.departure < 1 and plan.groups > 0


def test_state_dict_round_trips(pruned):
    name, model, ticket, small, plan, x = pruned
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    other = copy.deepcopy(small)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        torch.testing.assert_close(other(x), small(x), rtol=0, atol=0)


def test_pruned_model_trains_and_compiles():
    model = _random_bn(UserNet(), seed=2)
    small = prune_channels(model, _global_ticket(model), torch.randn(1, 3, 32, 32))
    assert small.training
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    out = compiled(x)
    torch.testing.assert_close(out, small(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in small.parameters())


def test_floor_caps_each_layers_loss():
    model = _random_bn(UserNet(), seed=3).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        bns[0].weight.mul_(1e-3)   # the global rank would empty this layer
    ticket = _global_ticket(model)
    assert not ticket[bns[0].weight].any()
    x = torch.randn(1, 3, 32, 32)
    bare, p0 = prune_channels(model, ticket, x, return_plan=True)
    floored, p1 = prune_channels(model, ticket, x, max_pruning_ratio=0.5, return_plan=True)
    name = next(n for n, m in model.named_modules() if m is bns[0])
    assert int(p0.realised[name].sum()) == 1            # never empty, but only one left
    assert int(p1.realised[name].sum()) == 6            # 12 channels, at most half go
    kept = p1.realised[name]
    assert torch.equal(kept, bns[0].weight.abs() >= bns[0].weight.abs()[kept].min())  # strongest back
    assert count_params(floored) > count_params(bare)
    # floor_ticket does the same on the ticket itself, for any mask
    ft = floor_ticket(ticket, 0.5)
    assert all(int(k.sum()) >= (k.numel() + 1) // 2 for k in ft.values())
    assert all(torch.equal(ft[p] | ticket[p], ft[p]) for p in ticket)


def test_vote_rule_and_coupled_groups():
    model = _random_bn(torchvision.models.resnet18(weights=None, num_classes=10), seed=4).eval()
    ticket = _global_ticket(model)
    x = torch.randn(1, 3, 32, 32)
    any_, pa = prune_channels(model, ticket, x, return_plan=True)
    vote, pv = prune_channels(model, ticket, x, coupled="vote", return_plan=True)
    assert pa.coupled_groups == 4 and pa.removed == 0          # one residual stream per stage
    assert pv.removed > 0 and count_params(vote) < count_params(any_)
    # a plain chain's group holds one BN: decided exactly as the ticket says under both rules
    assert torch.equal(pa.realised["layer1.0.bn1"], ticket[model.layer1[0].bn1.weight])
    assert torch.equal(pv.realised["layer1.0.bn1"], ticket[model.layer1[0].bn1.weight])


def test_grey_inputs_and_torchvision_names_through_build():
    m = worm.paper.models.build("mobilenet_v3_small", in_channels=1, num_classes=7)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert isinstance(worm.paper.models.build("torchvision.resnet18"), torchvision.models.ResNet)
    small = prune_channels(m.eval(), _global_ticket(m), torch.randn(1, 1, 32, 32))
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_a_ticket_that_would_cut_the_output_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    keep = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="output"):
        prune_channels(net, {net[4].weight: keep}, torch.randn(1, 3, 8, 8))
    small = prune_channels(net, {net[1].weight: torch.arange(6) < 3}, torch.randn(1, 3, 8, 8))
    assert small[0].out_channels == 3 and small[3].in_channels == 3


def test_frozen_layers_are_pruned_and_stay_frozen():
    model = _random_bn(UserNet(), seed=6).eval()
    model.a[0][0].weight.requires_grad_(False)
    small = prune_channels(model, _global_ticket(model), torch.randn(1, 3, 32, 32))
    assert small.a[0][0].out_channels < model.a[0][0].out_channels
    assert not small.a[0][0].weight.requires_grad and small.a[0][1].weight.requires_grad


def test_prune_report_measures_both_models():
    model = UserNet().eval()
    small = prune_channels(model, _global_ticket(_random_bn(model, 5)), torch.randn(1, 3, 32, 32))
    rep = worm.prune_report(model, small, torch.randn(1, 3, 32, 32), reps=2, min_time=0.0)
    assert rep["params_dense"] == count_params(model) and rep["params_pruned"] == count_params(small)
    assert rep["flops_pruned"] < rep["flops_dense"] and 0 < rep["params_kept"] < 1
    assert set(rep["latency_ms"]) == {1, 32}
    for b in (1, 32):
        assert rep["latency_ms"][b]["dense"] > 0 and rep["latency_ms"][b]["pruned"] > 0
        assert rep["latency_ratio"][b] == pytest.approx(rep["latency_ms"][b]["pruned"] / rep["latency_ms"][b]["dense"])
    assert "batch 32" in rep["text"]
