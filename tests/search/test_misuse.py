"""Misuses a new user hit (found by trying the package): each is refused with one clear
message instead of a silently wrong search or a traceback."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import worm
from worm import ops


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_step_is_refused_when_the_search_samples_by_itself():
    m = _net()
    opt = worm.WormSGD(m.parameters(), lr=0.1)
    s = worm.EarlyBird(m, opt, window=2, every=1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    assert len(s.history) == 1  # the hook sampled
    with pytest.raises(RuntimeError, match="samples by itself every 1"):
        s.step()
    assert len(s.history) == 1 and not s.found  # nothing pushed, no fake ticket


def test_r_above_one_is_refused_at_build():
    m = _net()
    with pytest.raises(ValueError, match="amplify"):
        worm.EarlyBird(m, worm.WormSGD(m.parameters(), lr=0.1), r=5)
    worm.EarlyBird(m, worm.WormSGD(m.parameters(), lr=0.1), r=1.0).close()  # 1: plain step


@pytest.mark.parametrize("ks", [0.5, [0.5], [True], "5"])
def test_select_thresholds_says_ks_are_counts(ks):
    with pytest.raises(TypeError, match="num_pruned"):
        ops.select_thresholds([torch.randn(10)], ks)
    thr, _ = ops.select_thresholds([torch.randn(10)], [5.0])  # a whole float is a count
    assert thr.shape == (1,)


@pytest.mark.parametrize("args,expect", [
    (["compare", "--model", "nosuchnet"], "--model nosuchnet: unknown"),
    (["compare", "--dataset", "foo"], "--dataset foo: unknown"),
    (["compare", "--task", "minilm-rt", "--model", "resnet18"], "applies to CNN runs"),
    (["compare", "--r", "5"], "outside [0, 1]"),
    (["sweep-r", "--model", "x"], "--model x: unknown"),
])
def test_cli_names_and_ranges_are_usage_errors(args, expect):
    r = subprocess.run([sys.executable, "-m", "worm", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr  # usage line + error line
    assert expect in lines[-1]


def test_state_dict_is_sgds_while_a_search_truncates():
    m = _net()
    opt = worm.WormSGD(m.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(_net().parameters(), lr=0.1, momentum=0.9)
    s = worm.EarlyBird(m, opt, mode="truncate", window=2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    s.step()
    assert s.truncating
    assert set(opt.state_dict()) == set(ref.state_dict())  # the search saves its own bits
    opt.set_truncation({m[0].weight: torch.ones(6, 4, dtype=torch.bool)}, r=0.5)
    assert set(opt.state_dict()) - set(ref.state_dict())  # masks set by hand travel along


@pytest.mark.parametrize("opt_kind", ["wormsgd", "sgd", "adamw"])
def test_l1_penalty_does_not_depend_on_the_amp_loss_scale(opt_kind):
    """A fused step under GradScaler unscales after the pre-step pass: the penalty added
    there must be scaled with the gradient it joins (found by review)."""
    out = []
    for scale in (1.0, 65536.0):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
        make = {"wormsgd": lambda p: worm.WormSGD(p, lr=0.1, fused=True),
                "sgd": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
                "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)}[opt_kind]
        opt = make(m.parameters())
        s = worm.EarlyBird(m, opt, mode="eb", l1=0.5)
        sc = torch.amp.GradScaler("cpu", init_scale=scale)
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        sc.scale(m(x).pow(2).mean()).backward()
        sc.step(opt)
        sc.update()
        out.append(m[1].weight.detach().clone())
        s.close()
    assert torch.equal(out[0], out[1])


def test_resume_refuses_another_l1_and_an_r_above_one():
    m = _net()
    opt = worm.WormSGD(m.parameters(), lr=0.1)
    sd = worm.EarlyBird(m, opt, mode="eb", l1=0.01).state_dict()
    m2 = _net()
    s2 = worm.EarlyBird(m2, worm.WormSGD(m2.parameters(), lr=0.1), mode="eb", l1=0.0)
    with pytest.raises(ValueError, match="l1"):
        s2.load_state_dict(sd)
    m3 = _net()
    s3 = worm.EarlyBird(m3, worm.WormSGD(m3.parameters(), lr=0.1), mode="worm")
    bad = s3.state_dict()
    bad["config"] = dict(bad["config"], r=5.0)
    with pytest.raises(ValueError, match="amplify"):
        s3.load_state_dict(bad)
