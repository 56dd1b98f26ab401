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
import worm
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
        ("transformer", "worm", "layer", "sgd"), ("transformer", "eb", "global", "sgd"),
        ("cnn", "worm", "layer", "sgd", torch.float64)],        # float64 under FSDP2
    4: [("cnn", "worm", "layer", "sgd"), ("cnn", "eb", "global", "sgd"),
        ("transformer", "eb", "layer", "sgd"), ("transformer", "worm", "global", "adamw"),
        ("transformer", "worm", "global", "adamw", torch.float64)],
}


# One process group per world size: spawning costs more than the checks. The 2-rank
# group writes checkpoints (FSDP2 and replicated) that the 4-rank group and this one
# process then load: resume across world sizes and layouts.
def test_fsdp2_on_2_and_4_ranks_equals_one_process_and_resumes_across_layouts(tmp_path):
    # also: WormSGD's fused step on the shards == torch.optim.SGD + a truncating hook
    ckpt = str(tmp_path)
    _spawn(2, [("check_equal_to_one_process", (CASES[2],)),
               ("check_resume", (str(tmp_path / "ckpt"),)),  # torch.distributed.checkpoint
               ("check_ddp", ()),                            # replicated: no communication
               ("check_wormsgd_equals_sgd_with_hooks", ()),
               ("check_select_every_dtype", ()),             # sampled/exact plans, 4 dtypes
               ("check_ranks_cannot_drift", ()),
               ("check_stale_parameters", ()),
               ("check_layouts", (ckpt,))])                  # FSDP2 <-> replicated on 2 ranks
    _spawn(4, [("check_equal_to_one_process", (CASES[4],)),
               ("check_select_every_dtype", ()),
               ("check_ranks_cannot_drift", ()),
               ("check_stale_parameters", ()),
               ("check_layouts", (ckpt,)),                   # on 4 ranks
               ("check_layouts", (ckpt, 2))])                # saved on 2 ranks, loaded on 4
    for saved_by in (2, 4):                                  # loaded in one process
        dist_cases.check_layouts(0, 1, ckpt, saved_by)


# ----------------------------------------------------- the select, in one process
def _kth(x, k):
    return float("-inf") if k == 0 else torch.kthvalue(x, k).values.item()


def _sample_alone(tensors, ks, scope, ring, head=1):
    """The sharded step on one rank (no process group): the same plan, nothing to sum."""
    from worm.collective import Collective
    from worm.shard_select import sample_sharded
    T = len(tensors)
    seg_of = [0] * T if scope == "global" else list(range(T))
    Ns = [sum(t.numel() for t in tensors)] if scope == "global" else [t.numel() for t in tensors]
    return sample_sharded(tensors, seg_of, ks, Ns, [f"t{i}" for i in range(T)], ring, head,
                          Collective(None, 1, "test"))


def _check_step(tensors, ks, scope, seed=0):
    from worm.packing import pack, popcount
    g = torch.Generator().manual_seed(seed)
    B = sum((t.numel() + 7) // 8 for t in tensors)
    ring = torch.randint(0, 256, (4, B), dtype=torch.uint8, generator=g)
    old = ring.clone()
    counts, thr = _sample_alone(tensors, ks, scope, ring)
    flat = [t.float().abs().reshape(-1) for t in tensors]
    if scope == "global":
        th = [_kth(torch.cat(flat), ks[0])] * len(tensors)
    else:
        th = [_kth(f, k) for f, k in zip(flat, ks)]
    new = pack([f > t for f, t in zip(flat, th)])
    assert torch.equal(ring[1], new)
    assert torch.equal(thr, torch.tensor(th[:len(ks)] if scope == "global" else th, dtype=torch.float32))
    for j in (0, 2, 3):  # the head row's own count is not a distance
        assert counts[j].item() == popcount(new ^ old[j]).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k_of", [lambda n: 0, lambda n: 1, lambda n: n // 2, lambda n: n])
def test_sharded_step_is_kthvalue_with_ties_zeros_extremes_and_empty_pieces(k_of, dtype):
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(37, generator=g), torch.zeros(5), torch.full((9,), 0.25),
              torch.tensor([min(torch.finfo(dtype).max, torch.finfo(torch.float32).max), 1e-45, 1e-38], dtype=dtype), torch.empty(0)]
    pieces = [p.to(dtype) for p in pieces]
    n = sum(p.numel() for p in pieces)
    _check_step(pieces, [k_of(n)], "global")
    some = [p for p in pieces if p.numel()]
    _check_step(some, [k_of(p.numel()) for p in some], "layer")


@pytest.mark.parametrize("k_frac", [0.0001, 0.5, 0.9999])
def test_sharded_step_sampled_plan_rows_of_different_scale_and_massive_ties(k_frac):
    # >= 2^19 entries: the sampled level one (and its exact rerun on ties) is exact too
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(600, 1000, generator=g) * torch.linspace(0.01, 5, 600)[:, None]
    ties = torch.cat([torch.zeros(500_000), torch.randn(100_000, generator=g)])
    for ts in ([rows, torch.randn(77, generator=g)], [ties]):
        n = sum(t.numel() for t in ts)
        _check_step(ts, [int(k_frac * n)], "global")


def test_native_passes_equal_the_torch_ones():
    from worm import shard_ops
    if not shard_ops.native([torch.zeros(1)]):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(70_001, generator=g), torch.randn(5000, generator=g).bfloat16(),
          torch.randn(333, generator=g).half(), torch.zeros(0), torch.randn(9000, generator=g).double(),
          torch.tensor([float("nan"), 1.0, float("inf")])]
    seg = [0, 1, 0, 1, 0, 1]
    torch_pass = {"native": lambda ts: False}
    for stride in (1, 4):
        for lo, hi, sh, b in [([0, 0], [1 << 31, 1 << 31], [20, 20], 2048),
                              ([0x3F000000, 0x3E000000], [0x3F800000, 0x3F000000], [13, 13], 2048),
                              ([5, 5], [5, 5], [0, 0], 16)]:
            a = shard_ops.key_histogram(ts, seg, lo, hi, sh, b, stride)
            with pytest.MonkeyPatch.context() as mp_:
                mp_.setattr(shard_ops, "native", torch_pass["native"])
                r = shard_ops.key_histogram(ts, seg, lo, hi, sh, b, stride)
            assert torch.equal(a, r)
    B = sum((t.numel() + 7) // 8 for t in ts)
    ring = torch.randint(0, 256, (5, B), dtype=torch.uint8, generator=g)
    lo, hi = [0x3F000000] * 6, [0x3F400000] * 6
    r1, r2 = ring.clone(), ring.clone()
    a = shard_ops.window_split_(ts, lo, hi, r1, 2, 10 ** 9)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(shard_ops, "native", torch_pass["native"])
        b = shard_ops.window_split_(ts, lo, hi, r2, 2, 10 ** 9)
    assert torch.equal(r1, r2) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    o1, o2 = torch.argsort(a[3]), torch.argsort(b[3])
    assert torch.equal(a[3][o1], b[3][o2]) and torch.equal(a[2][o1], b[2][o2])


def test_bytes_per_sample_is_tens_of_kb():
    bert = [768 * 768] * 24
    assert wd.bytes_per_sample(bert, "global", 3) < 64 * 1024
    assert wd.bytes_per_sample(bert, "layer", 3) < 200 * 1024


def test_search_over_replaced_parameters_says_so():
    # load_state_dict(assign=True) swaps the parameters the search was built on
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    search = worm.EarlyBird(model, None, mode="eb", window=2)
    search.step()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match="no longer the model's parameter '1.weight'"):
        search.step()
    assert search._window.count == 1 and len(search.history) == 1


def test_state_from_another_model_is_refused_naming_both_layouts_and_dcp_errors_are_exceptions(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    other = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    s1 = worm.EarlyBird(model, None, mode="eb", window=2)
    s2 = worm.EarlyBird(other, None, mode="eb", window=2)
    s2.step()
    sd = s2.state_dict()
    sd["config"] = s1.state_dict()["config"]  # same config: only the window differs
    with pytest.raises(ValueError, match="saved by a one-process search over 2 parameters, this search "
                                         "is a one-process search over 1 parameters"):
        s1.load_state_dict(sd)
    wd.save({"search": s2.state_dict()}, str(tmp_path / "c"))
    try:
        wd.load({"search": s2.state_dict(), "missing": torch.zeros(3)}, str(tmp_path / "c"))
    except Exception as e:  # noqa: BLE001 - the point: DCP's BaseException arrives as an Exception
        assert isinstance(e, wd.CheckpointError) and "could not load" in str(e)
    else:
        raise AssertionError("loading a key the checkpoint lacks should fail")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=60),
       st.lists(st.integers(0, 60), max_size=4), st.data())
def test_sharded_step_matches_kthvalue_on_any_split(values, cuts, data):
    # |w| of arbitrary finite floats (signed zeros, subnormals, repeats), split into pieces
    # as shards would split them; the threshold and the mask must not depend on the split
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, x.numel()))
    bounds = sorted({min(c, x.numel()) for c in cuts} | {0, x.numel()})
    _check_step([x[a:b] for a, b in zip(bounds, bounds[1:])], [k], "global")
