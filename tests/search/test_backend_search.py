"""A whole search (WormSGD with truncation, AdamW pre-hook) run through each kernel
backend gives the same history and masks as through the reference."""
import pytest
import torch
from torch import nn

import worm
from worm import _backends


def _available():
    out = []
    for name in ("triton", "cpp"):
        if _backends.unusable(name, torch.device("cpu")) is None:
            out.append(name)
    return out


def _run(backend, opt_kind, monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", backend)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24),
                      nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 4))
    opt = (worm.WormSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
           if opt_kind == "wormsgd" else torch.optim.AdamW(m.parameters(), lr=1e-2))
    s = worm.EarlyBird(m, opt, mode="worm", prune_ratio=0.5, window=3, stop=0.02, delta=0.3)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        for _ in range(4):
            x = torch.randn(32, 8, generator=g)
            y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        if s.step().found:
            break
    assert worm.backend("cpu") == backend
    return m, s


@pytest.mark.parametrize("opt_kind", ["wormsgd", "adamw"])
@pytest.mark.parametrize("backend", _available())
def test_search_history_matches_reference(backend, opt_kind, monkeypatch):
    m_ref, s_ref = _run("reference", opt_kind, monkeypatch)
    m_k, s_k = _run(backend, opt_kind, monkeypatch)
    assert any(r.truncating for r in s_ref.history), "truncation must be exercised"
    strip = lambda h: [(r.index, r.d_max, r.d_avg, r.truncating, r.found) for r in h]
    assert strip(s_k.history) == strip(s_ref.history)
    for k_ref, k_k in zip(s_ref.mask.values(), s_k.mask.values()):
        assert torch.equal(k_ref, k_k)
    assert torch.equal(s_ref.packed_mask, s_k.packed_mask)
    for p, q in zip(m_ref.parameters(), m_k.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)

