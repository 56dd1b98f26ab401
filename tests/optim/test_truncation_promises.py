"""The optimizer's promises under the setups users run (issue 17), each against an
oracle built from torch alone: ``torch.optim.*`` plus gradient hooks
(``p.register_hook``) or a step pre-hook multiplying ``p.grad``.

* truncate_at="step" (default) == a step pre-hook; truncate_at="backward" == gradient
  hooks; bit for bit whatever runs between backward and step (clipping, accumulation);
* closures (LBFGS, SGD with a closure) are truncated for real;
* a BatchNorm named by module or by weight tensor has its bias truncated, as "bn";
* a second l1 penalty on the same parameters is refused before anything changes;
* a dropped search keeps truncating; WormSGD deep-copies and pickles;
* a refused load or step changes nothing, naming the parameter; numpy scalars work.
"""
import copy
import gc
import pickle

import numpy as np
import pytest
import torch
from testkit import truncating_hook
from torch import nn

import worm

R = 0.25


def _net(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)  # distinct gammas: no ties
        m[1].bias.uniform_(-0.5, 0.5)
    return m


def _make_opt(kind, params):
    params = list(params)
    if kind == "wormsgd":  # torch's own single-tensor path: exact against torch's SGD
        return worm.WormSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    return torch.optim.AdamW(params, lr=1e-2, foreach=False)


def _torch_twin(kind):
    return "sgd" if kind in ("wormsgd", "sgd") else "adamw"


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(m, opt, *, clip, accum, steps=3):
    data = _batches(steps * accum)
    for s in range(steps):
        opt.zero_grad()
        for x, y in data[s * accum:(s + 1) * accum]:
            nn.functional.cross_entropy(m(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        opt.step()


def _search_and_twin(kind, at):
    """A model with a truncating search (masks set), and an untouched copy."""
    m = _net()
    twin = copy.deepcopy(m)
    opt = _make_opt(kind, m.parameters())
    s = worm.EarlyBird(m, opt, mode="truncate", window=2, r=R, truncate_at=at)
    s.step()
    keep = s.mask[m[1].weight]
    assert keep.any() and not keep.all()
    return m, opt, s, twin, keep


def _same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def _pre_hook_oracle(twin, kind, keep):
    opt = _make_opt(_torch_twin(kind), twin.parameters())
    fn = truncating_hook(keep, R)

    def pre(o, args, kwargs):
        for p in (twin[1].weight, twin[1].bias):
            if p.grad is not None:
                p.grad = fn(p.grad)
    opt.register_step_pre_hook(pre)
    return opt


def _hook_oracle(twin, kind, keep):
    for p in (twin[1].weight, twin[1].bias):
        p.register_hook(truncating_hook(keep, R))
    return _make_opt(_torch_twin(kind), twin.parameters())


@pytest.mark.parametrize("kind", ["wormsgd", "sgd", "adamw"])
@pytest.mark.parametrize("clip,accum", [(True, 1), (False, 3), (True, 2)])
def test_truncate_at_step_is_a_step_pre_hook_and_backward_is_gradient_hooks(kind, clip, accum):
    for at, oracle in (("step", _pre_hook_oracle), ("backward", _hook_oracle)):
        m, opt, s, twin, keep = _search_and_twin(kind, at)
        ref_opt = oracle(twin, kind, keep)
        _train(m, opt, clip=clip, accum=accum)
        _train(twin, ref_opt, clip=clip, accum=accum)
        _same(m, twin)
        s.close()


def test_the_two_places_differ_under_clipping_so_the_choice_is_real():
    m, opt, s, twin, keep = _search_and_twin("sgd", "step")
    ref_opt = _hook_oracle(twin, "sgd", keep)
    _train(m, opt, clip=True, accum=1)
    _train(twin, ref_opt, clip=True, accum=1)
    assert not torch.equal(m[0].weight, twin[0].weight)  # clipping saw other gradients


def test_truncate_at_is_checked_at_construction():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="truncate_at must be one of"):
        worm.EarlyBird(m, opt, truncate_at="clip")
    assert not getattr(opt, "_worm_truncation", None) or not opt._worm_truncation._owners


def test_backward_owner_removes_its_hooks_on_close():
    m, opt, s, twin, keep = _search_and_twin("sgd", "backward")
    s.close()
    ref_opt = _make_opt("sgd", twin.parameters())  # plain: no truncation at all
    _train(m, opt, clip=True, accum=1)
    _train(twin, ref_opt, clip=True, accum=1)
    _same(m, twin)


# ------------------------------------------------------------------ closures
@pytest.mark.parametrize("at", ["step", "backward"])
@pytest.mark.parametrize("kind", ["lbfgs", "sgd", "wormsgd"])
def test_closure_optimizers_truncate_the_gradients_the_closure_makes(kind, at):
    def make(params):
        if kind == "lbfgs":
            return torch.optim.LBFGS(params, lr=0.5, max_iter=4)
        if kind == "wormsgd":
            return worm.WormSGD(params, lr=0.1, momentum=0.9, foreach=False)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)

    m = _net()
    m.eval()  # LBFGS re-evaluates: no running-stat drift between the twins' evaluations
    twin = copy.deepcopy(m)
    opt = make(m.parameters())
    s = worm.EarlyBird(m, opt, mode="truncate", window=2, r=R, truncate_at=at)
    s.step()
    keep = s.mask[m[1].weight]
    for p in (twin[1].weight, twin[1].bias):
        p.register_hook(truncating_hook(keep, R))
    ref_opt = make(twin.parameters())
    plain = copy.deepcopy(twin)
    (x, y), = _batches(1)

    def closure_of(model, o):
        def closure():
            o.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(2):
        opt.step(closure_of(m, opt))
        ref_opt.step(closure_of(twin, ref_opt))
    _same(m, twin)
    if kind == "lbfgs":  # and it is not a no-op: untruncated LBFGS ends elsewhere
        for p in plain.parameters():
            p._backward_hooks = None
        plain_opt = torch.optim.LBFGS(plain.parameters(), lr=0.5, max_iter=4)
        for _ in range(2):
            plain_opt.step(closure_of(plain, plain_opt))
        assert not torch.equal(plain[1].weight, m[1].weight)


# ------------------------------------------------- what a representative covers
@pytest.mark.parametrize("layers", ["bn", "module", "tensor", "callable"])
def test_a_batchnorm_named_any_way_truncates_its_bias(layers):
    m = _net()
    twin = copy.deepcopy(m)
    spec = {"bn": "bn", "module": [m[1]], "tensor": [m[1].weight],
            "callable": lambda model: [model[1].weight]}[layers]
    opt = _make_opt("wormsgd", m.parameters())
    s = worm.EarlyBird(m, opt, mode="truncate", layers=spec, window=2, r=R)
    s.step()
    bits = opt._worm_truncation.bits
    assert set(map(id, bits)) == {id(m[1].weight), id(m[1].bias)}
    ref_opt = _hook_oracle(twin, "wormsgd", s.mask[m[1].weight])
    _train(m, opt, clip=False, accum=1)
    _train(twin, ref_opt, clip=False, accum=1)
    _same(m, twin)


# ------------------------------------------------------------------ l1 penalty
@pytest.mark.parametrize("kind", ["wormsgd", "adamw"])
def test_a_second_l1_penalty_on_the_same_parameters_is_refused_at_build(kind):
    m = _net()
    twin = copy.deepcopy(m)
    opt = _make_opt(kind, m.parameters())
    s1 = worm.EarlyBird(m, opt, mode="eb", l1=1e-2)
    st = opt._worm_truncation
    owners, terms = dict(st._owners), list(st.l1.terms())
    with pytest.raises(ValueError, match="already has an l1 penalty"):
        worm.EarlyBird(m, opt, mode="eb", l1=1e-2)
    with pytest.raises(ValueError, match="already has an l1 penalty"):
        worm.EarlyBird(m, opt, mode="worm", l1=1e-3, layers=[m[1]])
    assert st._owners == owners and [t[0] for t in st.l1.terms()] == [t[0] for t in terms]
    # the one penalty, against torch: g + l1*sign(w) on the gammas, by a step pre-hook
    ref_opt = _make_opt(_torch_twin(kind), twin.parameters())

    def penalty(o, args, kwargs):
        twin[1].weight.grad.add_(twin[1].weight.detach().sign(), alpha=1e-2)
    ref_opt.register_step_pre_hook(penalty)
    _train(m, opt, clip=False, accum=1)
    _train(twin, ref_opt, clip=False, accum=1)
    _same(m, twin)
    s1.close()
    worm.EarlyBird(m, opt, mode="eb", l1=1e-2)  # free again


# ------------------------------------------------------------ lifetime, copies
def test_a_search_not_kept_in_a_variable_keeps_truncating():
    m = _net()
    twin = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)

    def start():  # the search object dies with this frame
        s = worm.EarlyBird(m, opt, mode="truncate", window=2, r=R)
        s.step()
        return s.mask[m[1].weight].clone()
    keep = start()
    gc.collect()
    ref_opt = _hook_oracle(twin, "sgd", keep)
    _train(m, opt, clip=False, accum=1)
    _train(twin, ref_opt, clip=False, accum=1)
    _same(m, twin)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_wormsgd_copies_like_sgd_and_keeps_its_own_masks(how):
    def copied(obj):
        return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))

    w = nn.Parameter(torch.linspace(-1, 1, 8))
    keep = torch.arange(8) % 3 != 0
    opt = worm.WormSGD([w], lr=0.1, momentum=0.9)
    opt.set_truncation({w: keep}, r=R)
    w.grad = torch.ones(8)
    opt.step()
    ref = torch.optim.SGD([nn.Parameter(w.detach().clone())], lr=0.1, momentum=0.9)
    ref.state[ref.param_groups[0]["params"][0]] = {
        "momentum_buffer": opt.state[w]["momentum_buffer"].clone()}
    ref2 = copied(ref)
    opt2 = copied(opt)
    for o in (opt2, ref2):
        p = o.param_groups[0]["params"][0]
        p.grad = torch.ones(8)
        if o is ref2:
            p.grad = truncating_hook(keep, R)(p.grad)
        o.step()
    a, b = opt2.param_groups[0]["params"][0], ref2.param_groups[0]["params"][0]
    torch.testing.assert_close(a, b, rtol=0, atol=2 * torch.finfo(torch.float32).eps)
    assert opt2.truncation == {"r": R, "params": 1}


def test_pickling_a_search_points_to_state_dict():
    m = _net()
    s = worm.EarlyBird(m, torch.optim.SGD(m.parameters(), lr=0.1))
    for dump in (pickle.dumps, copy.deepcopy):
        with pytest.raises(TypeError, match=r"state_dict\(\)"):
            dump(s)


# ----------------------------------------------- refusals that change nothing
def test_a_refused_wormsgd_load_changes_nothing():
    m = _net()
    opt = worm.WormSGD(m.parameters(), lr=0.1, momentum=0.9)
    worm.EarlyBird(m, opt, mode="truncate", window=2, r=R).step()
    other = worm.WormSGD(_net().parameters(), lr=0.5, momentum=0.1)
    other_params = [p for g in other.param_groups for p in g["params"]]
    other.set_truncation({other_params[2]: torch.ones(8, dtype=torch.bool)}, r=0.5)  # the gamma
    before = opt.state_dict()
    with pytest.raises(ValueError, match="already truncated"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]  # lr, momentum as they were
    assert opt.truncation == {"r": R, "params": 2}


@pytest.mark.parametrize("kind", ["wormsgd", "sgd"])
def test_a_step_refused_on_a_later_group_updates_no_group(kind):
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    groups = [{"params": [a]}, {"params": [b], "lr": 0.2}]
    opt = worm.WormSGD(groups, lr=0.1) if kind == "wormsgd" else torch.optim.SGD(groups, lr=0.1)
    h = worm.truncation_pre_hook(opt)
    h.set({a: torch.tensor([True, False] * 2), b: torch.tensor([False, True] * 2)}, r=R)
    with torch.no_grad():
        b.data = torch.ones(6)  # resized in place after the mask was set
    a.grad, b.grad = torch.ones(4), torch.ones(6)
    with pytest.raises(ValueError, match=r"parameter 1 of the optimizer \(shape \(6,\)\)"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(4)) and torch.equal(b.detach(), torch.ones(6))
    assert torch.equal(a.grad, torch.ones(4))  # nothing truncated either


def test_numpy_scalars_are_taken_where_torch_takes_them():
    m, m2 = _net(), _net()
    o = worm.WormSGD(m.parameters(), lr=np.float32(0.1))
    o2 = worm.WormSGD(m2.parameters(), lr=0.1)
    kw = dict(prune_ratio=np.float64(0.5), window=np.int64(3), stop=np.float32(0.1),
              delta=np.float64(0.05), r=np.float32(0.25), every=np.int64(2), l1=np.float64(1e-4))
    s = worm.EarlyBird(m, o, mode="worm", **kw)
    s2 = worm.EarlyBird(m2, o2, mode="worm", **{k: v.item() for k, v in kw.items()})
    assert s.window == 3 and s.every == 2 and isinstance(s.every, int)
    assert s._config() == s2._config()
    w = nn.Parameter(torch.ones(4))
    opt = worm.WormSGD([w], lr=0.1)
    opt.set_truncation({w: torch.tensor([True, False] * 2)}, r=np.float32(0.5))
    assert opt.truncation == {"r": 0.5, "params": 1}
    for bad in (np.bool_(True), True):
        with pytest.raises((TypeError, ValueError)):
            worm.EarlyBird(m2, o2, mode="eb", window=bad)
