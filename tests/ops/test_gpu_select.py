"""The CUDA/Triton sampling ops on a GPU against the reference, on the shapes that pick
the CUDA op's plans: one block for small sets, the two-pass (15-bit + 16-bit) radix
select for large ones, layer scope in batches of 64 tensors, heavy ties (every entry in
one bucket), mixed dtypes, NaN/Inf. Runs only where a CUDA device is present."""
import pytest
import torch

from worm import _backends as B
from worm import reference as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _backends():
    out = []
    for name in ("cuda", "triton"):
        if torch.cuda.is_available() and B.unusable(name, torch.device("cuda")) is None:
            out.append(name)
    return out


def _sets():
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)
    ties = torch.full((1 << 20,), 1.0)
    ties[::7] = 0.5
    ties[3::11] = -1.0
    return {
        "bert_like": [rn(768, 768) for _ in range(3)],
        "all_ties_large": [ties, torch.full((70001,), -1.0)],
        "one_bucket": [1.0 + rn(300000) * 1e-6],     # all keys share the top 15 bits
        "many_layers": [rn(1500 + 37 * i) for i in range(70)],  # > 64: layer-scope batches
        "mixed_dtypes": [rn(40000), rn(50000).bfloat16(), rn(30001).half()],
        "tiny_values": [rn(100000) * 1e-30, rn(70000)],        # subnormal fp32 keys
    }


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(_sets()))
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("p", [0.0, 0.37, 0.5, 0.999])
def test_sampling_step_matches_reference(backend, name, scope, p):
    ts = [t.cuda() for t in _sets()[name]]
    ns = [t.numel() for t in ts]
    ks = [R.num_pruned(sum(ns), p)] if scope == "global" else [R.num_pruned(n, p) for n in ns]
    ref, be = B.load("reference"), B.load(backend)
    thr_r, nf_r = ref.select_thresholds(ts, ks, scope)
    thr_b, nf_b = be.select_thresholds(ts, ks, scope)
    assert torch.equal(nf_b.cpu(), nf_r.cpu())
    assert torch.equal(thr_b.cpu(), thr_r.cpu()), (
        f"{backend} {name} {scope} p={p}: thresholds differ at "
        f"{(thr_b.cpu() != thr_r.cpu()).nonzero().flatten().tolist()[:8]}")
    nbytes = R.byte_offsets(ns)[-1]
    g = torch.Generator().manual_seed(5)
    win = torch.randint(0, 256, (5, nbytes), generator=g, dtype=torch.uint8).cuda()
    win_r = win.clone()
    c_r = ref.mask_update_(ts, thr_r, win_r, 2)
    c_b = be.mask_update_(ts, thr_b, win, 2)
    assert torch.equal(win.cpu(), win_r.cpu())
    assert torch.equal(c_b.cpu(), c_r.cpu())


@pytest.mark.parametrize("backend", _backends())
def test_nonfinite_in_large_set_gives_nan_everywhere(backend):
    ts = [torch.randn(200000).cuda(), torch.randn(5000).cuda()]
    ts[1][17] = float("nan")
    for scope, ks in (("global", [1000]), ("layer", [10, 10])):
        thr, nf = B.load(backend).select_thresholds(ts, ks, scope)
        assert nf.cpu().tolist() == [0, 1]
        assert torch.isnan(thr).all()
