"""The search: stop/trigger rules on hand-made mask sequences, resume, bad input."""
import io

import pytest
import torch
from torch import nn

import worm
from worm import reference as ref

N = 20
# keep-sets (10 of 20 entries): each swap of a kept and a pruned entry moves 2 bits (d = 0.1)
A = set(range(10))
B = (A - {9}) | {10}
C = (B - {8}) | {11}
D = set(C)
E = (D - {0, 1}) | {12, 13}
SEQ = [A, B, C, D, E, set(E), set(E)]


def _set(x, keep):
    with torch.no_grad():
        x.fill_(1.0)
        x[sorted(keep)] = 2.0


def _run(mode, seq=SEQ):
    x = nn.Parameter(torch.ones(N))
    opt = worm.WormSGD([x], lr=0.1)
    s = worm.EarlyBird(None, opt, mode=mode, layers=[x], prune_ratio=0.5, window=3,
                       stop=0.1, delta=0.04, r=3e-3)
    recs, trunc = [], []
    for keep in seq:
        _set(x, keep)
        recs.append(s.step())
        trunc.append(opt.truncation)
        assert torch.equal(s.mask[x], torch.tensor([i in keep for i in range(N)]))
    return s, recs, trunc, x


def test_distances_on_hand_made_sequence():
    s, recs, _, _ = _run("eb")
    assert [r.d_max for r in recs[:2]] == [None, None]  # nothing before the window is full
    assert recs[2].distances == [0.2, 0.1] and recs[2].d_max == 0.2
    assert recs[3].distances == [0.1, 0.0]
    assert recs[4].distances == [0.2, 0.2]


def test_eb_stops_exactly_when_dmax_below_s_and_never_truncates():
    s, recs, trunc, x = _run("eb")
    assert recs[3].d_max == 0.1 and not recs[3].found  # d_max == s does not stop
    assert [r.found for r in recs] == [False] * 6 + [True]
    assert not any(r.truncating for r in recs) and all(t is None for t in trunc)
    assert s.found and torch.equal(s.ticket[x], torch.tensor([i in E for i in range(N)]))
    assert s.step() is recs[-1]  # after the ticket nothing more is sampled
    assert len(s.history) == 7


def test_worm_triggers_exactly_when_davg_below_s_plus_delta_and_stays_on():
    s, recs, trunc, x = _run("worm")
    assert recs[2].d_avg == pytest.approx(0.15) and not recs[2].truncating  # 0.15 >= 0.14
    assert recs[3].d_avg == pytest.approx(0.05) and recs[3].truncating      # triggers here
    assert recs[4].d_avg == pytest.approx(0.2) and recs[4].truncating       # stays on
    assert recs[5].truncating and recs[6].found and not recs[6].truncating  # search ended
    assert trunc[2] is None and trunc[3] == {"r": 3e-3, "params": 1} and trunc[6] is None
    assert [r.found for r in recs] == [False] * 6 + [True]


def test_truncation_uses_the_newest_mask():
    x = nn.Parameter(torch.ones(N))
    opt = worm.WormSGD([x], lr=1.0)
    s = worm.EarlyBird(None, opt, mode="truncate", layers=[x], prune_ratio=0.5, window=3, stop=0.1)
    _set(x, A)
    assert s.step().truncating  # from the first sampling step, window not full
    assert torch.equal(opt._worm_truncation.bits[x], ref.pack([s.mask[x]]))
    before = x.detach().clone()
    x.grad = torch.ones(N)
    opt.step()
    moved = before - x.detach()
    keep = torch.tensor([i in A for i in range(N)])
    assert torch.equal(moved[keep], torch.ones(10)) and torch.allclose(moved[~keep], torch.full((10,), 3e-3))


def test_bn_mask_covers_weight_and_bias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = worm.EarlyBird(m, opt, mode="truncate", window=2)
    with torch.no_grad():
        m[1].weight.copy_(torch.arange(1.0, 9.0))
    s.step()
    keep = s.mask[m[1].weight]
    assert keep.tolist() == [False] * 4 + [True] * 4
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the pre-hook truncates before SGD's step
    for p in (m[1].weight, m[1].bias):
        assert torch.equal(p.grad, torch.where(keep, torch.ones(8), torch.full((8,), 3e-3)))
    assert torch.equal(m[0].weight.grad, torch.ones_like(m[0].weight))


# ------------------------------------------------------------------- resume
def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _objects(kind, every):
    m = _net()
    opt = (worm.WormSGD(m.parameters(), lr=0.05, momentum=0.9) if kind == "wormsgd"
           else torch.optim.AdamW(m.parameters(), lr=1e-2))
    s = worm.EarlyBird(m, opt, mode="worm", prune_ratio=0.5, window=3, stop=0.02, delta=0.3, every=every)
    return m, opt, s


def _epoch(m, opt, s, epoch, every):
    g = torch.Generator().manual_seed(100 + epoch)
    for _ in range(5):
        x = torch.randn(32, 8, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    if every is None:
        s.step()


@pytest.mark.parametrize("kind,every", [("wormsgd", None), ("adamw", None), ("wormsgd", 3)])
def test_resume_mid_window_gives_identical_history_and_ticket(kind, every):
    epochs, cut = 9, 4
    m1, o1, s1 = _objects(kind, every)
    for e in range(epochs):
        _epoch(m1, o1, s1, e, every)
    assert any(r.truncating for r in s1.history), "the test needs truncation to be on at the cut"

    m2, o2, s2 = _objects(kind, every)
    for e in range(cut):
        _epoch(m2, o2, s2, e, every)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "search": s2.state_dict()}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    m3, o3, s3 = _objects(kind, every)
    m3.load_state_dict(sd["model"])
    o3.load_state_dict(sd["opt"])
    s3.load_state_dict(sd["search"])
    for e in range(cut, epochs):
        _epoch(m3, o3, s3, e, every)

    strip = lambda h: [(r.index, r.epoch, r.step, r.d_max, r.d_avg, r.truncating, r.found) for r in h]
    assert strip(s1.history) == strip(s3.history)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    assert s1.found == s3.found
    for (p1, k1), (p3, k3) in zip(s1.mask.items(), s3.mask.items()):
        assert torch.equal(k1, k3)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_problem():
    x = nn.Parameter(torch.ones(4))
    opt = worm.WormSGD([x], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        worm.EarlyBird(None, opt, layers=[])
    with pytest.raises(ValueError, match="prune_ratio"):
        worm.EarlyBird(None, opt, layers=[x], prune_ratio=1.0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        worm.EarlyBird(nn.Linear(2, 2), opt)
    with pytest.raises(ValueError, match="mode"):
        worm.EarlyBird(None, opt, layers=[x], mode="fast")
    with pytest.raises(ValueError, match="window"):
        worm.EarlyBird(None, opt, layers=[x], window=1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        worm.EarlyBird(None, opt, layers=[nn.Parameter(torch.ones(3))])
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    s = worm.EarlyBird(m, worm.WormSGD(m.parameters(), lr=0.1), window=2)
    with torch.no_grad():
        m[1].weight[1] = float("nan")
    with pytest.raises(ValueError, match=r"1\.weight"):
        s.step()
    assert s.history == []  # nothing half-recorded


def test_state_dict_mismatch_is_refused():
    x = nn.Parameter(torch.ones(8))
    a = worm.EarlyBird(None, worm.WormSGD([x], lr=0.1), layers=[x], window=3)
    b = worm.EarlyBird(None, worm.WormSGD([x], lr=0.1), layers=[x], window=4)
    with pytest.raises(ValueError, match="window"):
        b.load_state_dict(a.state_dict())
