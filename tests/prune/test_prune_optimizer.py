"""prune_channels(..., optimizer=opt): the optimizer goes on with the smaller model,
its state sliced, so the next steps equal those of the same optimizer that had always
trained the smaller model. The oracle is built from torch alone: the small network
written out by hand, its weights and optimizer state cut with plain indexing."""
import copy

import pytest
import torch
from torch import nn

import worm
from worm import reference

torchvision = pytest.importorskip("torchvision")


def _net(c1=8, c2=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 4))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def _step(model, opt, seed):
    x, y = _batch(seed)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# where each parameter of _net is cut: {index in Sequential: {param: [(dim, which keep)]}}
_CUTS = {"0.weight": [(0, 1)], "0.bias": [(0, 1)], "1.weight": [(0, 1)], "1.bias": [(0, 1)],
         "3.weight": [(0, 2), (1, 1)], "4.weight": [(0, 2)], "4.bias": [(0, 2)], "8.weight": [(1, 2)],
         "8.bias": []}


def _cut(t, name, keeps):
    for dim, which in _CUTS[name]:
        t = t.index_select(dim, keeps[which].nonzero().flatten())
    return t


def _by_hand(model, opt_cls, opt_kw, opt, keeps):
    """The small net and its optimizer, built and sliced by hand."""
    k1, k2 = int(keeps[1].sum()), int(keeps[2].sum())
    small = _net(k1, k2)
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), small.parameters()):
            q.copy_(_cut(p.detach(), n, keeps))
        for i in (1, 4):
            keep = keeps[1 if i == 1 else 2].nonzero().flatten()
            small[i].running_mean.copy_(model[i].running_mean[keep])
            small[i].running_var.copy_(model[i].running_var[keep])
            small[i].num_batches_tracked.copy_(model[i].num_batches_tracked)
    hand = opt_cls(small.parameters(), **opt_kw)
    for (n, p), q in zip(model.named_parameters(), small.parameters()):
        hand.state[q] = {k: (_cut(v, n, keeps).clone() if v.dim() else v.clone()) if isinstance(v, torch.Tensor) else v
                         for k, v in opt.state[p].items()}
    return small, hand


OPTS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "wormsgd": (worm.WormSGD, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
}


@pytest.mark.parametrize("kind", list(OPTS))
def test_next_steps_equal_an_optimizer_that_always_trained_the_small_model(kind):
    opt_cls, kw = OPTS[kind]
    model = _net()
    opt = opt_cls(model.parameters(), **kw)
    for s in range(3):
        _step(model, opt, s)
    keeps = {1: torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
             2: torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)}
    ticket = worm.Ticket({"1.weight": keeps[1], "4.weight": keeps[2]})
    small_h, opt_h = _by_hand(model, opt_cls, kw, opt, keeps)
    before = copy.deepcopy(opt.state_dict())

    small, plan = worm.prune_channels(model, ticket, torch.zeros(1, 3, 8, 8), optimizer=opt,
                                      return_plan=True)
    assert plan.departure == 0  # a plain chain: the ticket exactly
    held = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for p in small.parameters()]
    assert before["state"].keys() == opt.state_dict()["state"].keys()
    for a, b in zip(small.state_dict().values(), small_h.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(small.parameters(), small_h.parameters()):
        for k, v in opt_h.state[q].items():
            assert torch.equal(opt.state[p][k], v), k
    for s in range(3, 5):   # two more steps, bit for bit
        _step(small, opt, s)
        _step(small_h, opt_h, s)
        for p, q in zip(small.parameters(), small_h.parameters()):
            assert torch.equal(p, q)


def _unsliceable(params):
    """An optimizer with factored state (one value per row), as Adafactor keeps."""
    class RowNorm(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    st["row"] = p.grad.reshape(p.shape[0], -1).norm(dim=1)
                    p.sub_(0.1 * p.grad)
    return RowNorm(params)


def test_an_optimizer_whose_state_cannot_be_sliced_is_refused_before_anything_changes():
    model = _net()
    opt = _unsliceable(model.parameters())
    _step(model, opt, 0)
    held = [p for g in opt.param_groups for p in g["params"]]
    weights = copy.deepcopy(model.state_dict())
    ticket = worm.Ticket({"1.weight": torch.tensor([1, 0] * 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="state 'row' of 0.weight has shape .* cannot be sliced"):
        worm.prune_channels(model, ticket, torch.zeros(1, 3, 8, 8), optimizer=opt)
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in held]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))
    with pytest.raises(ValueError, match="LBFGS keeps one flat history"):
        worm.prune_channels(model, ticket, torch.zeros(1, 3, 8, 8),
                            optimizer=torch.optim.LBFGS(model.parameters()))


def test_a_search_still_truncating_the_optimizer_is_refused():
    model = _net()
    opt = worm.WormSGD(model.parameters(), lr=0.1, momentum=0.9)
    search = worm.EarlyBird(model, opt, mode="truncate", window=2)
    _step(model, opt, 0)
    search.step()
    ticket = search.mask
    with pytest.raises(ValueError, match="search.close"):
        worm.prune_channels(model, ticket, torch.zeros(1, 3, 8, 8), optimizer=opt)
    search.close()
    small = worm.prune_channels(model, ticket, torch.zeros(1, 3, 8, 8), optimizer=opt)
    _step(small, opt, 1)


def test_resnet18_state_sliced_along_every_coupled_channel():
    """A residual net: the momentum of every BN's gamma is the old one at the realised
    keep mask (coupled groups included), every state tensor has its parameter's shape,
    and training goes on."""
    model = torchvision.models.resnet18(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    old = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    gammas = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    ticket = worm.Ticket({f"{n}.weight": k for n, k in zip(gammas, reference.masks(
        [torch.rand(g.shape, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(gammas.values())],
        0.5, scope="global"))})
    small, plan = worm.prune_channels(model, ticket, x[:1], optimizer=opt, return_plan=True)
    assert plan.added > 0  # coupled residual BNs keep channels beyond the ticket
    for n, p in small.named_parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape
        bn = n.rpartition(".")[0]
        if bn in plan.realised:
            assert torch.equal(buf, old[n][plan.realised[bn]])
    opt.zero_grad()
    nn.functional.cross_entropy(small(x), y).backward()
    opt.step()
