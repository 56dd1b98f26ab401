"""worm.recalibrate_bn against torch's own BatchNorm with momentum=None (the oracle:
a copy of the model whose BNs are reset and run in train mode over the same batches)."""
import copy

import pytest
import torch
from torch import nn

import worm


def _model(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=0.01), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 7), nn.BatchNorm1d(7))


def _batches(n=4, bs=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs + i, 3, 5, 5, generator=g) * 3 + 1, torch.zeros(bs + i, dtype=torch.long))
            for i in range(n)]


def _oracle(model, batches):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    return ref


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _stale(model):
    # statistics and weights far from what the batches give
    with torch.no_grad():
        for m in _bns(model):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(0.01)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("as_tensors", [False, True])
def test_matches_torch_bn_with_momentum_none(as_tensors):
    model = _model()
    _stale(model)
    batches = _batches()
    want = _oracle(model, batches)
    params = {k: v.clone() for k, v in model.named_parameters()}
    model.eval()
    out = worm.recalibrate_bn(model, [x for x, _ in batches] if as_tensors else batches)
    assert out is model
    for got, ref in zip(_bns(model), _bns(want)):
        assert torch.equal(got.running_mean, ref.running_mean)
        assert torch.equal(got.running_var, ref.running_var)
        assert int(got.num_batches_tracked) == int(ref.num_batches_tracked) == len(batches)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k          # weights untouched
    assert [m.momentum for m in _bns(model)] == [0.1, 0.01, 0.1]   # momentum restored
    assert not any(m.training for m in model.modules())          # eval restored


def test_per_module_modes_are_restored_and_a_dataloader_works():
    model = _model()
    model.train()
    model[1].eval()      # a frozen BN inside a training model (fine-tuning setups)
    model[7].eval()
    before = {m: m.training for m in model.modules()}
    ds = torch.utils.data.TensorDataset(*map(torch.cat, zip(*_batches())))
    loader = torch.utils.data.DataLoader(ds, batch_size=6)
    want = _oracle(model, list(loader))
    worm.recalibrate_bn(model, loader)
    assert {m: m.training for m in model.modules()} == before
    for got, ref in zip(_bns(model), _bns(want)):
        assert torch.equal(got.running_mean, ref.running_mean)
        assert torch.equal(got.running_var, ref.running_var)


def test_lifts_a_stale_model_in_eval():
    # the stale statistics make eval outputs differ from train-mode normalisation;
    # after recalibrating on the whole batch, eval equals train mode on that batch
    model = _model()
    _stale(model)
    x = torch.randn(64, 3, 5, 5) * 2 + 0.5
    model.eval()
    stale = model(x)
    worm.recalibrate_bn(model, [x])
    model.eval()
    fresh = model(x)
    bn1 = model[1]
    h = model[0](x)
    assert torch.allclose(bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn1.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4)
    assert not torch.allclose(stale, fresh, atol=1e-2)


def test_bad_input_leaves_the_statistics_as_they_were():
    model = _model()
    _stale(model)
    before = copy.deepcopy(model.state_dict())
    model.eval()
    with pytest.raises(ValueError, match="batches is empty"):
        worm.recalibrate_bn(model, [])
    with pytest.raises(TypeError, match="must be an input tensor or an \\(inputs, targets\\)"):
        worm.recalibrate_bn(model, [torch.randn(2, 3, 5, 5), "not a batch"])
    with pytest.raises(RuntimeError):                  # a forward that fails half-way
        worm.recalibrate_bn(model, [torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.momentum for m in _bns(model)] == [0.1, 0.01, 0.1]
    assert not any(m.training for m in model.modules())


def test_untracked_bn_and_no_bn():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert worm.recalibrate_bn(m, [torch.randn(5, 3)]) is m
    assert m[1].running_mean is None
    lin = nn.Linear(3, 2)
    w = lin.weight.clone()
    worm.recalibrate_bn(lin, [torch.randn(2, 3)])
    assert torch.equal(lin.weight, w)
