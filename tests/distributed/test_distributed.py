"""The search on FSDP2-sharded and DDP-replicated models equals one process's, bit for bit.

Each test spawns gloo processes on CPU (tests/dist_cases.py holds the workers). One
spawn runs many cases, since starting the processes costs more than the cases.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_cases
from worm import distributed as wd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def _spawn(world, jobs):
    mp.spawn(dist_cases.worker, args=(world, dist_cases.free_port(), jobs), nprocs=world, join=True)


# Every (model, mode, scope) runs on 2 or 4 ranks, and each world size sees both models,
# both modes and both scopes; worm with AdamW exercises the truncation pre-hook. 4 ranks
# give uneven and empty shards (BN widths 6, 5, 3 -> 2/2/2/0, 2/2/1/0, 1/1/1/0) and Q/K
# slices that straddle ranks (in_proj_weight rows 9 per rank: Q 9+3, K 6+6, none on rank 3).
CASES = {
    2: [("cnn", "worm", "global", "sgd"), ("cnn", "eb", "layer", "sgd"),
        ("transformer", "worm", "layer", "sgd"), ("transformer", "eb", "global", "sgd")],
    4: [("cnn", "worm", "layer", "sgd"), ("cnn", "eb", "global", "sgd"),
        ("transformer", "eb", "layer", "sgd"), ("transformer", "worm", "global", "adamw")],
}


# One process group per world size: spawning costs more than the checks.
def test_fsdp2_on_2_ranks_equals_one_process_resumes_with_dcp_and_ddp_agrees(tmp_path):
    # also: WormSGD's fused step on the shards == torch.optim.SGD + a truncating hook
    _spawn(2, [("check_equal_to_one_process", (CASES[2],)),
               ("check_resume", (str(tmp_path / "ckpt"),)),  # torch.distributed.checkpoint
               ("check_ddp", ()),                            # replicated: no communication
               ("check_wormsgd_equals_sgd_with_hooks", ())])


def test_fsdp2_on_4_ranks_equals_one_process():
    _spawn(4, [("check_equal_to_one_process", (CASES[4],))])


# ----------------------------------------------------- the select, in one process
def _kth(x, k):
    return torch.tensor(float("-inf")) if k == 0 else torch.kthvalue(x, k).values


@pytest.mark.parametrize("k_of", [lambda n: 0, lambda n: 1, lambda n: n // 2, lambda n: n])
def test_radix_select_is_kthvalue_with_ties_zeros_and_extremes(k_of):
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(37, generator=g).abs(), torch.zeros(5), torch.full((9,), 0.25),
              torch.tensor([3.4e38, 1e-45, 1e-38]), torch.empty(0)]
    flat = torch.cat(pieces)
    k = k_of(flat.numel())
    thr, _ = wd.kth_smallest([pieces], [k], group=False)
    assert torch.equal(thr, _kth(flat, k).reshape(1))
    # per-tensor selections in one call (layer scope)
    segs = [[p] for p in pieces if p.numel()]
    ks = [k_of(p.numel()) for p in pieces if p.numel()]
    thr, _ = wd.kth_smallest(segs, ks, group=False)
    assert torch.equal(thr, torch.stack([_kth(p, kk) for (p,), kk in zip(segs, ks)]))


def test_bytes_per_sample_is_a_few_kb():
    bert = [768 * 768] * 24
    assert wd.bytes_per_sample(bert, "global", 3) == 4 * (256 * 4 + 24) + 8 * 3
    assert wd.bytes_per_sample(bert, "global", 3) < 5 * 1024
    huge = [2 ** 30] * 4  # past 2**31 entries in one selection the counters widen to int64
    assert wd.bytes_per_sample(huge, "global", 3) == 8 * (256 * 4 + 4) + 8 * 3
    assert wd.bytes_per_sample(huge, "layer", 3) == 4 * (4 * 256 * 4 + 4) + 8 * 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=60),
       st.lists(st.integers(0, 60), max_size=4), st.data(), st.sampled_from([torch.int32, torch.int64]))
def test_radix_select_matches_kthvalue_on_any_split(values, cuts, data, dtype):
    # |w| of arbitrary finite floats (signed zeros, subnormals, repeats), split into pieces
    # as shards would split them; the k-th smallest must not depend on the split
    x = torch.tensor(values, dtype=torch.float32).abs()
    k = data.draw(st.integers(0, x.numel()))
    bounds = sorted({min(c, x.numel()) for c in cuts} | {0, x.numel()})
    pieces = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    thr, _ = wd.kth_smallest([pieces], [k], group=False, dtype=dtype)
    assert torch.equal(thr, _kth(x, k).reshape(1))
