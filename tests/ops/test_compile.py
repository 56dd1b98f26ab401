"""torch.compile traces WormSGD's fused step through the ops' fake kernels."""
import pytest
import torch
from torch import nn

import worm


def _setup(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.Linear(9, 3))
    opt = worm.WormSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    opt.set_truncation({m[0].weight: torch.rand(9, 6, generator=g) > 0.5,
                        m[1].weight: torch.rand(9, generator=g) > 0.5}, r=3e-3)
    x = torch.randn(16, 6, generator=g)
    for _ in range(2):  # the second backward leaves grads for the step under test
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        if _ == 0:
            opt.step()
    return m, opt


@pytest.mark.skipif(worm.backend("cpu") != "cpp", reason="needs the native extension (built by setup)")
def test_compiled_fused_step_matches_eager():
    m1, o1 = _setup()
    m2, o2 = _setup()
    o1.step()
    torch.compile(o2.step, backend="aot_eager", fullgraph=True)()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(o1.state[p]["momentum_buffer"], o2.state[q]["momentum_buffer"])
