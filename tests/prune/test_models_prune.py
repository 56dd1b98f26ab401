"""Models (shapes) and structured channel pruning (exact equivalence, counts, safety)."""
import copy

import pytest
import torch

from testkit import zeroed_realised
from torch import nn

from worm import reference
from worm.paper.models import MODELS, BasicBlock, PlainCNN, ResNet, build, scaled
from worm.prune import count_flops, count_params, prune_channels, pruning_report


# ------------------------------------------------------------------ helpers
def randomise_bn(model, seed):
    """Random gamma, beta and running stats: with BN at its init values, a pruner
    that copied the wrong channels could still pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return model


def prunable_bns(model):
    """The BNs whose channels a ticket decides alone (ResNet: block-inner bn1; the
    residual stream's BNs are coupled and decided together)."""
    if isinstance(model, ResNet):
        return [b.bn1 for b in model.blocks()]
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def random_ticket(model, seed):
    """Random keep masks on EVERY BN; one uncoupled BN loses all channels, one keeps all."""
    g = torch.Generator().manual_seed(seed)
    ticket = {m.weight: torch.rand(m.num_features, generator=g) < 0.5
              for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    bns = prunable_bns(model)
    ticket[bns[0].weight] = torch.zeros(bns[0].num_features, dtype=torch.bool)
    ticket[bns[-1].weight] = torch.ones(bns[-1].num_features, dtype=torch.bool)
    return ticket


def effective_keep(bn, keep):
    keep = keep.clone()
    if not keep.any():
        keep[bn.weight.detach().abs().argmax()] = True
    return keep


def zeroed_copy(model, ticket):
    """The original with the pruned channels' gamma and beta set to zero."""
    ref = copy.deepcopy(model)
    for bn_o, bn_r in zip(prunable_bns(model), prunable_bns(ref)):
        keep = effective_keep(bn_o, ticket[bn_o.weight])
        with torch.no_grad():
            bn_r.weight[~keep] = 0
            bn_r.bias[~keep] = 0
    return ref





def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_ch", [1, 3])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_output_shapes(name, in_ch, width):
    m = build(name, in_channels=in_ch, num_classes=7, width=width)
    assert m(torch.randn(2, in_ch, 32, 32)).shape == (2, 7)


def test_architectures_match_the_papers_models():
    r = build("resnet18")
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r.modules())
    assert [len(getattr(r, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(r, f"layer{i}")[0].bn2.num_features for i in range(1, 5)] == [64, 128, 256, 512]
    convs = [m for m in r.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in r.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 20          # stem + 16 block convs + 3 shortcuts
    assert count_params(r) == 11173962           # the usual CIFAR ResNet-18 count
    v = build("vgg11_bn")
    assert [m.out_channels for m in v.modules() if isinstance(m, nn.Conv2d)] == \
        [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in v.modules()) == 8
    assert v.classifier.in_features == 512
    assert count_params(v) == 9228362


def test_width_rounds_to_at_least_one_channel():
    assert scaled(64, 0.001) == 1 and scaled(64, 0.25) == 16 and scaled(3, 0.5) == 2
    m = build("vgg11_bn", width=0.001)
    assert all(c.out_channels == 1 for c in m.modules() if isinstance(c, nn.Conv2d))
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        build("no_such_net")
    with pytest.raises(ValueError, match="width"):
        build("mobilenet_v3_small", width=0.5)
    with pytest.raises(ValueError, match="width"):
        build("cnn", width=0)
    with pytest.raises(ValueError, match="in_channels"):
        build("cnn", in_channels=0)


# ------------------------------------------------------------------ pruning
CASES = [("resnet18", 3, 0.25), ("vgg11_bn", 3, 0.25), ("cnn", 1, 1.0)]


@pytest.mark.parametrize("name,in_ch,width", CASES)
def test_prune_is_exactly_the_zeroed_model(name, in_ch, width):
    torch.manual_seed(0)
    model = randomise_bn(build(name, in_ch, 10, width), seed=1).double().eval()
    ticket = random_ticket(model, seed=2)
    before = snapshot(model)
    small, plan = prune_channels(model, ticket, return_plan=True)

    # Channels really went, as the masks say (0 kept -> 1 kept) where a BN decides alone.
    for bn_o, bn_s in zip(prunable_bns(model), prunable_bns(small)):
        assert bn_s.num_features == int(effective_keep(bn_o, ticket[bn_o.weight]).sum())
    kept = [b.num_features for b in prunable_bns(small)]
    assert kept[0] == 1 and kept[-1] == prunable_bns(model)[-1].num_features
    names = {m: n for n, m in model.named_modules()}
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):   # coupled rule "any": only ever adds channels
            real, tick = plan.realised[names[bn]], effective_keep(bn, ticket[bn.weight])
            assert not (tick & ~real).any()
    if isinstance(model, ResNet):   # the residual stream is pruned where all its BNs agree
        assert plan.coupled_groups > 0 and plan.added > 0 and plan.removed == 0
        assert small.layer1[0].bn2.num_features < model.layer1[0].bn2.num_features
    else:                           # plain chains: the ticket exactly (empty BN -> 1 channel)
        assert plan.removed == 0 and plan.added == 1 and plan.coupled_groups == 0
    assert count_params(small) < count_params(model)
    assert count_flops(small) < count_flops(model)

    x = torch.randn(4, in_ch, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = zeroed_realised(model, plan)(x)
        got = small(x)
        full = model(x)
    assert not torch.allclose(full, want, rtol=1e-3, atol=1e-3)   # pruning mattered
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if not isinstance(model, ResNet):
        torch.testing.assert_close(got, zeroed_copy(model, ticket)(x), rtol=1e-10, atol=1e-10)

    # The original is untouched.
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.shape == before[n].shape for n, p in model.named_parameters())


@pytest.mark.parametrize("name,in_ch,width", CASES)
def test_pruned_model_trains(name, in_ch, width):
    torch.manual_seed(0)
    model = randomise_bn(build(name, in_ch, 10, width), seed=3)
    small = prune_channels(model, random_ticket(model, seed=4))
    assert small.training
    x, y = torch.randn(8, in_ch, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    w0 = [p.detach().clone() for p in small.parameters()]
    nn.functional.cross_entropy(small(x), y).backward()
    for p in small.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(w0, small.parameters()))
    # BN running stats are the pruned model's own buffers, updated by its forward.
    assert all(p.grad is None for p in model.parameters())


def test_copies_bn_stats_and_flags_of_kept_channels():
    model = randomise_bn(build("cnn", 1), seed=5).eval()
    model.features[0].weight.requires_grad_(False)
    bn = model.features[1]
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[2, 5, 11]] = True
    small = prune_channels(model, {bn.weight: keep, bn.bias: keep.clone()})
    sbn = small.features[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(sbn, name), getattr(bn, name)[keep])
    assert torch.equal(sbn.num_batches_tracked, bn.num_batches_tracked)
    assert sbn.eps == bn.eps and sbn.momentum == bn.momentum
    assert not small.training and not sbn.training
    assert not small.features[0].weight.requires_grad
    assert torch.equal(small.features[0].weight, model.features[0].weight[keep])
    assert torch.equal(small.features[4].weight, model.features[4].weight[:, keep])
    assert small.cfg == (3, "M", 32, "M", 32, "M")


def test_params_and_flops_match_a_hand_count():
    model = build("cnn", in_channels=1, num_classes=10)
    bns = prunable_bns(model)
    g = torch.Generator().manual_seed(6)
    ticket = {bn.weight: torch.rand(bn.num_features, generator=g) < 0.5 for bn in bns}
    a, b, c = (int(ticket[bn.weight].sum()) for bn in bns)

    def params(a, b, c):   # conv (no bias) + BN gamma/beta, three times, then the head
        return 1 * a * 9 + 2 * a + a * b * 9 + 2 * b + b * c * 9 + 2 * c + c * 10 + 10

    def macs(a, b, c):     # output pixels x output channels x inputs per output
        return 32 * 32 * a * 1 * 9 + 16 * 16 * b * a * 9 + 8 * 8 * c * b * 9 + c * 10

    small = prune_channels(model, ticket)
    assert count_params(model) == params(16, 32, 32)
    assert count_flops(model) == macs(16, 32, 32)
    assert count_params(small) == params(a, b, c)
    assert count_flops(small) == macs(a, b, c)
    assert count_flops(small, (5, 1, 32, 32)) == 5 * macs(a, b, c)
    rep = pruning_report(model, small)
    assert rep["params_before"] == params(16, 32, 32) and rep["params_after"] == params(a, b, c)
    assert rep["flops_before"] == macs(16, 32, 32) and rep["flops_after"] == macs(a, b, c)
    assert rep["channels"] == {"features.1": [16, a], "features.5": [32, b], "features.9": [32, c]}
    assert rep["flops_kept"] == pytest.approx(macs(a, b, c) / macs(16, 32, 32))
    assert f"{macs(a, b, c):,}" in rep["text"] and f"{params(a, b, c):,}" in rep["text"]


def test_count_flops_leaves_the_model_as_it_was():
    model = build("cnn", 3).train()
    model.features[1].eval()
    stats = snapshot(model)
    count_flops(model)
    assert model.training and not model.features[1].training and model.features[0].training
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())


def test_ticket_from_the_global_mask_rule():
    """A ticket shaped like EarlyBird's (reference.masks over all BN gammas, p=0.5)."""
    torch.manual_seed(7)
    model = randomise_bn(build("vgg11_bn", 3, 10, 0.25), seed=8).eval()
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    keeps = reference.masks([g.detach() for g in gammas], 0.5, scope="global")
    small = prune_channels(model, dict(zip(gammas, keeps)))
    total = sum(g.numel() for g in gammas)
    left = sum(m.num_features for m in small.modules() if isinstance(m, nn.BatchNorm2d))
    assert left == sum(int(k.sum()) + int(not k.any()) for k in keeps)
    assert left < total


def test_no_mask_keeps_everything():
    model = randomise_bn(build("resnet18", 3, 10, 0.25), seed=9).eval()
    small = prune_channels(model, {})
    assert count_params(small) == count_params(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


def test_dtype_is_kept():
    model = build("cnn", 1).to(torch.bfloat16)
    bn = model.features[5]
    small = prune_channels(model, {bn.weight: torch.arange(32) % 2 == 0})
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())
    assert small.features[5].num_features == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_kept():
    model = randomise_bn(build("resnet18", 3, 10, 0.25), seed=10).cuda().eval()
    ticket = {k: v.cuda() for k, v in random_ticket(model, seed=11).items()}
    small = prune_channels(model, ticket)
    assert all(p.is_cuda for p in small.parameters())
    assert all(b.is_cuda for b in small.buffers())
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed_copy(model, ticket)(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bad input
def test_untraceable_inputs_are_named():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="Sequential.*example_inputs"):
        prune_channels(seq, {seq[1].weight: torch.ones(4, dtype=torch.bool)}, torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="coupled"):
        prune_channels(seq, {}, coupled="all")
    with pytest.raises(ValueError, match="max_pruning_ratio"):
        prune_channels(seq, {}, max_pruning_ratio=1.0)


def test_bad_tickets_are_rejected():
    model, other = build("cnn", 1), build("cnn", 1)
    bn = model.features[1]
    with pytest.raises(ValueError, match="not a parameter of this PlainCNN.*worm.Ticket"):
        prune_channels(model, {other.features[1].weight: torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="features.0.weight .* not a BatchNorm's gamma.*apply_masks"):
        prune_channels(model, {model.features[0].weight: torch.ones_like(model.features[0].weight, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'features.0.weight' has shape \(16, 1, 3, 3\)"):
        prune_channels(model, {model.features[0].weight: torch.ones(16, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        prune_channels(model, {bn.weight: torch.ones(16)})
    with pytest.raises(ValueError, match=r"'features.1.weight' has shape \(16,\) .* mask is \(15,\)"):
        prune_channels(model, {bn.weight: torch.ones(15, dtype=torch.bool)})
    keep = torch.ones(16, dtype=torch.bool)
    with pytest.raises(ValueError, match="differ"):
        prune_channels(model, {bn.weight: keep, bn.bias: ~keep})
    with pytest.raises(TypeError, match="dict"):
        prune_channels(model, [keep])
