"""worm.apply_masks / remove_masks: an unstructured ticket stays applied through retraining.

The author's code let pruned weights grow back (``prune.remove``); these tests pin
that they stay exactly zero, under optimizers that would otherwise move them: SGD
with momentum and weight decay whose momentum buffer was filled before pruning, and
AdamW with moments filled before pruning. Each scenario first checks that it would
really move the pruned weights, so a missing hook makes a test fail.
"""
import pytest
import torch
from torch import nn

import worm
from worm.ticket import MaskHandle


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _random_ticket(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {m.weight: torch.rand(m.weight.shape, generator=g) > 0.5
            for m in model if isinstance(m, nn.Linear)}


def _make_opt(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)


def _warm(model, opt, steps=3):
    """Fill the optimizer's state (momentum buffer / Adam moments) before pruning."""
    x, y = _batch(seed=7)
    for _ in range(steps):
        _step(model, opt, x, y)


def _pruned_values(ticket):
    return torch.cat([p.detach()[~keep] for p, keep in ticket.items()])


def _kept_values(ticket):
    return torch.cat([p.detach()[keep] for p, keep in ticket.items()])


# --------------------------------------------------------------- the scenarios move weights
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_scenario_would_regrow_pruned_weights_without_masks(kind):
    """Sanity for the tests below: zeroing once is not enough with a warm optimizer."""
    model = _mlp()
    opt = _make_opt(kind, model)
    _warm(model, opt)
    ticket = _random_ticket(model)
    with torch.no_grad():
        for p, keep in ticket.items():
            p.mul_(keep)
    x, y = _batch()
    _step(model, opt, x, y)
    assert _pruned_values(ticket).abs().min() > 0, "the warm optimizer must move every pruned weight"


# --------------------------------------------------------------- with the optimizer passed
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_pruned_weights_exactly_zero_after_every_step_with_optimizer(kind):
    model = _mlp()
    opt = _make_opt(kind, model)
    _warm(model, opt)
    ticket = _random_ticket(model)
    before = {p: p.detach().clone() for p in ticket}
    handle = worm.apply_masks(model, ticket, optimizer=opt)
    assert isinstance(handle, MaskHandle)
    assert torch.count_nonzero(_pruned_values(ticket)) == 0   # zeroed at once
    losses = []
    for i in range(8):
        x, y = _batch(seed=100 + i)
        losses.append(_step(model, opt, x, y))
        # right after the step, before any forward: the step post-hook re-zeroed them
        assert torch.count_nonzero(_pruned_values(ticket)) == 0, f"step {i}"
        for p in ticket:
            assert torch.count_nonzero(p.grad[~ticket[p]]) == 0, "gradient hook must zero pruned grads"
    # the kept weights really train
    for p, keep in ticket.items():
        assert not torch.equal(p.detach()[keep], before[p][keep])
    assert model(_batch()[0]).isfinite().all()


def test_adamw_moments_never_see_pruned_gradients():
    """The gradient hook zeroes pruned grads, so a fresh AdamW's moments stay zero there."""
    model = _mlp()
    ticket = _random_ticket(model)
    opt = _make_opt("adamw", model)
    worm.apply_masks(model, ticket, optimizer=opt)
    for i in range(4):
        _step(model, opt, *_batch(seed=200 + i))
    for p, keep in ticket.items():
        st = opt.state[p]
        assert torch.count_nonzero(st["exp_avg"][~keep]) == 0
        assert torch.count_nonzero(st["exp_avg_sq"][~keep]) == 0
        assert torch.count_nonzero(st["exp_avg"][keep]) > 0


# --------------------------------------------------------------- without the optimizer
class _Seen:
    """Records the weights each Linear multiplies with, as the forward uses them."""

    def __init__(self, model):
        self.seen = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model if isinstance(m, nn.Linear)]

    def _hook(self, mod, args, out):
        x = args[0]
        self.seen[mod.weight] = mod.weight.detach().clone()
        # the output is computed from the weights as they were during this forward
        torch.testing.assert_close(out, nn.functional.linear(x, mod.weight, mod.bias), rtol=0, atol=0)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_pruned_weights_zero_at_every_forward_without_optimizer(kind):
    model = _mlp()
    opt = _make_opt(kind, model)
    _warm(model, opt)
    ticket = _random_ticket(model)
    reference = _mlp(seed=5)    # a second copy, masked by hand, to compare outputs
    worm.apply_masks(model, ticket)       # no optimizer: the forward pre-hook does the work
    seen = _Seen(model)
    moved = False
    for i in range(6):
        x, y = _batch(seed=300 + i)
        _step(model, opt, x, y)
        # between step and forward the warm optimizer has moved pruned entries ...
        moved |= bool(_pruned_values(ticket).abs().max() > 0)
        # ... but every forward, in train and eval mode, uses them as exactly zero
        model.train(i % 2 == 0)
        out = model(x)
        for p, keep in ticket.items():
            assert torch.count_nonzero(seen.seen[p][~keep]) == 0, f"step {i}"
            assert torch.count_nonzero(p.detach()[~keep]) == 0
        with torch.no_grad():
            reference.load_state_dict(model.state_dict())
            for (name, rp), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
                if p in ticket:
                    rp.mul_(ticket[p])
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    assert moved, "the scenario must exercise the forward pre-hook (see the sanity test)"
    seen.remove()
    model.eval()
    with torch.no_grad():
        model(_batch()[0])
    assert torch.count_nonzero(_pruned_values(ticket)) == 0


def test_pruned_grads_are_zero_and_kept_grads_are_not():
    model = _mlp()
    ticket = _random_ticket(model)
    worm.apply_masks(model, ticket)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    for p, keep in ticket.items():
        assert torch.count_nonzero(p.grad[~keep]) == 0
        assert torch.count_nonzero(p.grad[keep]) > 0
    # parameters outside the ticket (the biases) are untouched by the hooks
    assert torch.count_nonzero(model[0].bias.grad) > 0


def test_kept_weights_train_and_loss_falls():
    model = _mlp()
    ticket = _random_ticket(model)
    opt = _make_opt("sgd", model)
    worm.apply_masks(model, ticket, optimizer=opt)
    x, _ = _batch(n=64)
    y = x[:, :3].argmax(1)   # learnable labels
    first = _step(model, opt, x, y)
    for _ in range(40):
        last = _step(model, opt, x, y)
    assert last < 0.8 * first
    assert torch.count_nonzero(_pruned_values(ticket)) == 0
    assert torch.count_nonzero(_kept_values(ticket)) == int(sum(k.sum() for k in ticket.values()))


def test_state_dict_keys_unchanged_and_sparsity():
    model = _mlp()
    keys = list(model.state_dict())
    ticket = _random_ticket(model)
    handle = worm.apply_masks(model, ticket)
    assert list(model.state_dict()) == keys
    pruned = sum(int((~k).sum()) for k in ticket.values())
    total = sum(k.numel() for k in ticket.values())
    assert handle.sparsity() == pytest.approx(pruned / total)


# --------------------------------------------------------------- removing the masks
def test_remove_masks_lets_pruned_weights_regrow():
    model = _mlp()
    opt = _make_opt("sgd", model)
    ticket = _random_ticket(model)
    worm.apply_masks(model, ticket, optimizer=opt)
    _step(model, opt, *_batch(seed=11))
    assert torch.count_nonzero(_pruned_values(ticket)) == 0
    worm.remove_masks(model)
    x, y = _batch(seed=12)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.count_nonzero(p.grad[~k]) > 0 for p, k in ticket.items())
    opt.zero_grad()
    _step(model, opt, x, y)
    model(x)   # no pre-hook re-zeroes them any more
    assert torch.count_nonzero(_pruned_values(ticket)) > 0
    worm.remove_masks(model)   # a second removal is a no-op


def test_reapplying_replaces_the_previous_ticket():
    model = _mlp()
    opt = _make_opt("sgd", model)
    first = _random_ticket(model, seed=3)
    worm.apply_masks(model, first, optimizer=opt)
    second = {p: torch.ones_like(k) for p, k in first.items()}
    second[model[0].weight] = ~first[model[0].weight] | first[model[0].weight]  # keep all
    worm.apply_masks(model, second, optimizer=opt)
    for _ in range(3):
        _step(model, opt, *_batch(seed=13))
    # the first ticket's hooks are gone: its pruned entries regrew
    assert torch.count_nonzero(_pruned_values(first)) > 0


# --------------------------------------------------------------- bad input
def test_bad_tickets_raise_clear_errors():
    model = _mlp()
    w = model[0].weight
    with pytest.raises(ValueError, match="empty"):
        worm.apply_masks(model, {})
    with pytest.raises(ValueError, match="shape"):
        worm.apply_masks(model, {w: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        worm.apply_masks(model, {w: torch.ones_like(w)})
    with pytest.raises(TypeError, match="bool"):
        worm.apply_masks(model, {w: [[True] * 6] * 16})
    stranger = nn.Parameter(torch.randn(16, 6))
    with pytest.raises(ValueError, match="not a parameter"):
        worm.apply_masks(model, {stranger: torch.ones(16, 6, dtype=torch.bool)})


def test_bad_ticket_keeps_the_ticket_already_applied():
    """A rejected ticket must not silently drop the masks that were in force."""
    model = _mlp()
    opt = _make_opt("sgd", model)
    _warm(model, opt)
    ticket = _random_ticket(model)
    worm.apply_masks(model, ticket, optimizer=opt)
    with pytest.raises(ValueError):
        worm.apply_masks(model, {model[0].weight: torch.ones(2, dtype=torch.bool)})
    _step(model, opt, *_batch(seed=14))
    assert torch.count_nonzero(_pruned_values(ticket)) == 0


# --------------------------------------------------------------- a search's ticket
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_apply_ticket_of_a_search(scope):
    model = _mlp(seed=4)
    weights = [model[0].weight, model[2].weight]
    opt = worm.WormSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    # a loose stop so that the ticket is found once the window is full
    search = worm.EarlyBird(model, opt, mode="worm", layers=weights, prune_ratio=0.5,
                            window=2, stop=1.0, delta=0.0, r=3e-3, scope=scope)
    x, y = _batch(seed=20, n=64)
    for _ in range(5):
        _step(model, opt, x, y)
        if search.step().found:
            break
    assert search.found
    ticket = search.ticket
    search.close()
    assert isinstance(ticket, worm.Ticket) and list(ticket) == ["0.weight", "2.weight"]
    assert ticket.kind == "entries" and ticket.found and ticket.scope == scope
    # the ticket is the search's mask: p = 0.5 of the entries pruned (no ties in random floats)
    if scope == "global":
        n = sum(w.numel() for w in weights)
        assert sum(int((~k).sum()) for k in ticket.values()) == round(0.5 * n)
        assert sum(ticket.pruned_share[n] * w.numel() for n, w in zip(ticket, weights)) == round(0.5 * n)
    else:
        for w in weights:
            assert int((~ticket[w]).sum()) == round(0.5 * w.numel())
    # the pruned entries are the smallest magnitudes
    pruned_mag = torch.cat([w.detach()[~ticket[w]].abs() for w in weights])
    kept_mag = torch.cat([w.detach()[ticket[w]].abs() for w in weights])
    if scope == "global":
        assert pruned_mag.max() < kept_mag.min()

    worm.apply_masks(model, ticket, optimizer=opt)
    bound = ticket.bind(model)
    for i in range(5):
        _step(model, opt, *_batch(seed=30 + i))
        assert torch.count_nonzero(_pruned_values(bound)) == 0
    assert torch.count_nonzero(_kept_values(bound)) == int(sum(k.sum() for k in ticket.values()))
