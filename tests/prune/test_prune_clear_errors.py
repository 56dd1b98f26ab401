"""prune_channels / prune_report / apply_masks under the inputs users try (issue 17):
no ticket yet, a norm-layer ticket, a graph Torch-Pruning cannot follow, a long
trace, tuple inputs, coupled channels, a BN ticket's beta. Oracles from torch alone."""
import re

import pytest
import torch
from torch import nn

import worm
import worm.depgraph
from worm import reference

torchvision = pytest.importorskip("torchvision")


def _global_ticket(model, p=0.5, seed=0):
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(m.num_features, generator=g) for m in bns.values()]
    return worm.Ticket({f"{n}.weight": k for n, k in zip(bns, reference.masks(scores, p, scope="global"))})


def test_no_ticket_yet_is_a_clear_error():
    model = torchvision.models.resnet18(num_classes=10)
    search = worm.EarlyBird(model, None, mode="eb")
    assert search.ticket is None
    with pytest.raises(TypeError, match="no ticket yet .*search.found"):
        worm.prune_channels(model, search.ticket)
    with pytest.raises(TypeError, match="no ticket yet"):
        worm.apply_masks(model, None)


class _NormNet(nn.Module):
    """ConvNeXt-style: GroupNorm and a channels-last LayerNorm, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)
        self.c2, self.ln = nn.Conv2d(8, 8, 1), nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c2(torch.relu(self.gn(self.c1(x))))
        return self.head(self.ln(x.permute(0, 2, 3, 1)).mean((1, 2)))


def test_norm_search_ranks_gammas_and_prune_channels_points_at_apply_masks():
    torch.manual_seed(0)
    model = _NormNet()
    with torch.no_grad():
        for m in (model.gn, model.ln):
            m.weight.copy_(torch.rand(8) + 0.1)
            m.bias.copy_(torch.rand(8) + 0.1)
    search = worm.EarlyBird(model, None, mode="eb", layers="norm", window=2, stop=1.0, delta=0.0)
    search.step()
    assert search.step().found
    t = search.ticket
    assert list(t) == ["gn.weight", "ln.weight"] and t.kind == "channels" and t.layers == "norm"
    # the mask is the reference's over the gammas
    want = reference.masks([model.gn.weight.detach(), model.ln.weight.detach()], 0.5)
    assert torch.equal(t["gn.weight"], want[0]) and torch.equal(t["ln.weight"], want[1])
    with pytest.raises(ValueError, match="gn.weight of a GroupNorm .*layers='norm'.*worm.apply_masks"):
        worm.prune_channels(model, t, torch.zeros(1, 3, 8, 8))
    # apply_masks holds gamma AND beta of each pruned channel at zero
    worm.apply_masks(model, t)
    for m, k in ((model.gn, t["gn.weight"]), (model.ln, t["ln.weight"])):
        assert (m.weight[~k] == 0).all() and (m.bias[~k] == 0).all() and (m.bias[k] != 0).all()


def test_apply_masks_with_a_bn_ticket_zeroes_beta_so_the_channel_is_gone():
    """Oracle: torch's own BN with the pruned channels' gamma and beta set to zero by
    hand outputs exact zeros there; apply_masks gives the same output."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(6) + 0.1)
        bn.bias.copy_(torch.randn(6))
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn, nn.ReLU())
    keep = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    ref = nn.BatchNorm2d(6).eval()
    ref.load_state_dict(bn.state_dict())
    with torch.no_grad():
        ref.weight[~keep] = 0
        ref.bias[~keep] = 0
    for ticket in ({bn.weight: keep}, {"1.weight": keep}, worm.Ticket({"1.weight": keep}, covers={"1.bias": "1.weight"})):
        with torch.no_grad():
            bn.bias.copy_(ref.bias + (~keep).float())  # beta alive at the pruned channels
        worm.apply_masks(model, ticket)
        x = torch.randn(2, 3, 8, 8)
        model.eval()
        with torch.no_grad():
            h = model[0](x)
            assert torch.equal(model[1](h), ref(h))
            assert (model[1](h)[:, ~keep] == 0).all()
        worm.remove_masks(model)


def test_shufflenet_channel_shuffle_names_the_module_and_the_way_out():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    t = _global_ticket(model)
    with pytest.raises(RuntimeError) as e:
        worm.prune_channels(model, t, torch.randn(1, 3, 64, 64))
    msg = str(e.value)
    assert "cannot follow the channels of ShuffleNetV2 through" in msg
    assert re.search(r"a reshape after stage\d\.\d+\.branch2\.\d+ \(BatchNorm2d\), in stage\d\.\d+ "
                     r"\(InvertedResidual\)", msg) and "worm.apply_masks" in msg
    assert "example_inputs" not in msg      # the inputs were fine
    # ... and the named way out works
    worm.apply_masks(model, t)


def test_inputs_the_model_does_not_take_are_blamed_on_the_inputs():
    with pytest.raises(RuntimeError, match="could not run ResNet on the example inputs"):
        worm.prune_channels(torchvision.models.resnet18(num_classes=10),
                            _global_ticket(torchvision.models.resnet18()), torch.randn(1, 5, 32, 32))


def test_a_long_trace_says_so(monkeypatch, capfd):
    monkeypatch.setattr(worm.depgraph, "NOTE_AFTER", 0.0)
    model = torchvision.models.resnet18(num_classes=10)
    worm.prune_channels(model, _global_ticket(model), torch.randn(1, 3, 32, 32))
    err = capfd.readouterr().err
    assert "worm.prune_channels: tracing ResNet's dependency graph" in err and "done in" in err
    worm.prune_channels(model, _global_ticket(model), torch.randn(1, 3, 32, 32), progress=False)
    assert capfd.readouterr().err == ""


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x, scale):
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)) * scale)


def test_prune_report_takes_the_tuple_inputs_prune_channels_takes():
    model = _TwoInputs().eval()
    inputs = (torch.randn(1, 3, 8, 8), torch.ones(1, 1))
    keep = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    small = worm.prune_channels(model, {"bn.weight": keep}, inputs)
    rep = worm.prune_report(model, small, inputs, batch_sizes=(1, 4), reps=1, min_time=0.0)
    # oracle MACs: conv out 6x6 positions x C_out x 3*3*3, then the linear
    assert rep["flops_dense"] == 36 * 8 * 27 + 8 * 2 and rep["flops_pruned"] == 36 * 4 * 27 + 4 * 2
    assert set(rep["latency_ms"]) == {1, 4}
    assert "ticket keeps 4 of 8 BN channels" in rep["text"] and "0 kept beyond the ticket" in rep["text"]


def test_report_states_how_far_the_realised_model_departs_from_the_ticket():
    """DenseNet concatenations couple BNs: the realised model keeps channels the ticket
    prunes. Oracle: the channel counts of the small model's own BNs."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(8, (2, 2), 16, num_classes=10).eval()
    t = _global_ticket(model)
    x = torch.randn(1, 3, 32, 32)
    small, plan = worm.prune_channels(model, t, x, return_plan=True)
    bns = dict(small.named_modules())
    realised = sum(bns[n.rpartition(".")[0]].num_features for n in t)
    ticket_kept = sum(int(k.sum()) for k in t.values())
    assert realised > ticket_kept and plan.realised_kept == realised
    text = worm.prune_report(model, small, x, batch_sizes=(1,), reps=1, min_time=0.0)["text"]
    assert f"the realised model keeps {realised:,}" in text
    assert f"{100 * (realised - ticket_kept) / ticket_kept:+.0f}% against the ticket" in text
    assert f"{realised - ticket_kept:,} kept beyond the ticket" in text
    n_small = sum(p.numel() for p in small.parameters())
    assert f"-> {n_small:,}" in plan.text()
    table = plan.text(per_layer=True)
    assert all(n.rpartition(".")[0] in table for n in t)
    # without the recorded plan the report says it does not know, not that all is well
    del small._worm_plan
    assert "departure from the ticket unknown" in worm.prune_report(
        model, small, x, batch_sizes=(1,), reps=1, min_time=0.0)["text"]
