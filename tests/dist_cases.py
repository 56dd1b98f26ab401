"""Worker side of tests/test_distributed.py: FSDP2 (and DDP) runs against one process.

Every rank trains on the *same* batches, so FSDP2's gradient reduce-scatter sums W
identical values with W a power of two (exact), and BatchNorm sees the same batch
statistics: the single-process run is then the bit-exact oracle for the whole run,
and any difference is the search's (or the optimizer's) fault. With different data
per rank the sum of W gradients rounds differently from one process's mean, which
is torch's business, not worm's.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import worm
from worm import distributed as wd
from worm import reference as ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))


# ----------------------------------------------------------------------- models
def cnn() -> nn.Module:
    # BN widths 6, 5, 3: on 4 ranks shards of 2/2/2/0, 2/2/1/0, 1/1/1/0 entries
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))


class TinyTransformer(nn.Module):
    def __init__(self, d=12, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


KINDS = {
    "cnn": (cnn, "bn", lambda g: torch.randn(8, 3, 8, 8, generator=g)),
    "transformer": (TinyTransformer, "qk", lambda g: torch.randn(6, 5, 12, generator=g)),
}


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    blocks = model.blocks if hasattr(model, "blocks") else [m for m in model if isinstance(m, nn.Conv2d)]
    for b in blocks:
        fully_shard(b)
    fully_shard(model)
    return model


def batch(kind: str, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = KINDS[kind][2](g)
    return x, torch.randint(0, 4, (x.shape[0],), generator=g)


def make_opt(model, opt_name):
    if opt_name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return worm.WormSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def search_for(model, opt, kind, mode, scope):
    # worm: stop tiny and delta large, so truncation switches on once the window is full
    # and stays on; eb: stop large enough that the ticket is usually found in the run.
    stop, delta = (1e-9, 2.0) if mode == "worm" else (0.34, 0.0)
    return worm.EarlyBird(model, opt if mode != "eb" else None, mode=mode,
                          layers=KINDS[kind][1], prune_ratio=0.5, window=3, stop=stop,
                          delta=delta, r=0.3, scope=scope)


def train(model, opt, search, kind, steps, start=0, every=2, record=None):
    for i in range(start, start + steps):
        x, y = batch(kind, i)
        loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % every == 0 and not search.found:
            search.step()
            if record is not None:
                record.append(packed_full(search))


def packed_full(search) -> torch.Tensor:
    """The newest mask of the whole set in the reference's packed layout."""
    if not isinstance(search._window, wd.ShardedMaskWindow):
        return search.packed_mask
    full = wd.full_masks(search.mask)
    return ref.pack([full[r.param] if r.index is None else full[r.param][r.index]
                     for r in search.reps])


def history(search) -> list:
    return [{k: v for k, v in asdict(h).items() if k != "seconds"} for h in search.history]


def full_params(model) -> list:
    return [p.full_tensor() if wd.is_dtensor(p) else p.detach() for p in model.parameters()]


def run(kind, mode, scope, opt_name, sharded, steps=8, dtype=torch.float32):
    model = KINDS[kind][0]().to(dtype)
    if sharded:
        shard(model)
    opt = make_opt(model, opt_name)
    search = search_for(model, opt, kind, mode, scope)
    masks: list = []
    train(model, opt, search, kind, steps, record=masks)
    return model, search, masks


# ---------------------------------------------------------------------- checks
def worker(rank, world, port, jobs):
    """Run ``jobs`` ([(check name, args), ...]) in one process group (spawning is slow)."""
    init(rank, world, port)
    try:
        for name, args in jobs:
            globals()[name](rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def check_equal_to_one_process(rank, world, cases):
    for kind, mode, scope, opt_name, *dtype in cases:
        dtype = dtype[0] if dtype else torch.float32
        what = f"{kind}/{mode}/{scope}/{opt_name}/{dtype} on {world} ranks"
        m1, s1, k1 = run(kind, mode, scope, opt_name, sharded=False, dtype=dtype)
        m2, s2, k2 = run(kind, mode, scope, opt_name, sharded=True, dtype=dtype)
        assert isinstance(s2._window, wd.ShardedMaskWindow), what
        assert history(s1) == history(s2), f"{what}: history differs"
        assert len(k1) == len(k2) and all(torch.equal(a, b) for a, b in zip(k1, k2)), \
            f"{what}: masks differ"
        for a, b in zip(full_params(m1), full_params(m2)):
            assert torch.equal(a, b), f"{what}: weights differ"
        if mode == "worm":
            assert any(h.truncating for h in s1.history), f"{what}: truncation never ran"
        if s1.found:  # the ticket: DTensors in the params' placement, equal when gathered
            t1, t2 = s1.ticket, s2.ticket
            assert list(t1) == list(t2) and t2.sharded, what   # the same names
            assert t2.full() == t1, f"{what}: gathered ticket differs"
            for p1, p2 in zip(s1.params, s2.params):
                assert wd.is_dtensor(t2[p2]) and t2[p2].placements == p2.placements, what
                assert torch.equal(t1[p1], t2[p2].full_tensor()), f"{what}: ticket differs"


def check_resume(rank, world, ckpt_dir):
    """Save mid-search with torch.distributed.checkpoint, load into a fresh run: same future."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    kind = "cnn"

    def fresh():
        model = shard(KINDS[kind][0]())
        opt = make_opt(model, "sgd")
        return model, opt, search_for(model, opt, kind, "truncate", "global")

    m1, o1, s1 = fresh()
    train(m1, o1, s1, kind, 4)  # two samples: window not yet full, truncation on
    assert s1.truncating, "the checkpoint should be taken with truncation on"
    dcp.save({"model": get_model_state_dict(m1), "optim": get_optimizer_state_dict(m1, o1),
              "search": s1.state_dict()}, checkpoint_id=ckpt_dir)
    train(m1, o1, s1, kind, 6, start=4)

    m2, o2, s2 = fresh()
    sd = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, o2),
          "search": s2.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_model_state_dict(m2, sd["model"])
    set_optimizer_state_dict(m2, o2, sd["optim"])
    s2.load_state_dict(sd["search"])
    assert s2.truncating and len(s2.history) == 2
    train(m2, o2, s2, kind, 6, start=4)
    assert history(s1) == history(s2), "resumed history differs"
    assert torch.equal(packed_full(s1), packed_full(s2)), "resumed mask differs"
    for a, b in zip(full_params(m1), full_params(m2)):
        assert torch.equal(a, b), "resumed weights differ"
    # the sharded ticket leaves the job: gathered by save() (rank 0 writes), or shard by
    # shard with torch.distributed.checkpoint
    t1, full = s1.mask, s1.mask.full()
    assert t1.sharded and not full.sharded and list(full) == [f"{i}.weight" for i in (1, 4, 7)]
    t1.save(os.path.join(ckpt_dir, "ticket.pt"))
    dist.barrier()
    assert worm.Ticket.load(os.path.join(ckpt_dir, "ticket.pt")) == full
    dcp.save(t1.state_dict(), checkpoint_id=os.path.join(ckpt_dir, "ticket_dcp"))
    m3, o3, s3 = fresh()
    train(m3, o3, s3, kind, 2)
    sd = s3.mask.state_dict()
    dcp.load(sd, checkpoint_id=os.path.join(ckpt_dir, "ticket_dcp"))
    assert worm.Ticket.from_state_dict(sd).full() == full, "ticket through dcp differs"


def check_ddp(rank, world):
    """Replicated parameters: no communication for masks; the debug check sees agreement."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:
        wd.check_replicas = True
        m1, s1, k1 = run("cnn", "worm", "global", "sgd", sharded=False)
        model = DDP(KINDS["cnn"][0]())
        opt = make_opt(model, "sgd")
        s2 = search_for(model, opt, "cnn", "worm", "global")
        k2: list = []
        train(model, opt, s2, "cnn", 8, record=k2)
        assert not isinstance(s2._window, wd.ShardedMaskWindow)
        assert history(s1) == history(s2) and all(torch.equal(a, b) for a, b in zip(k1, k2))
        for a, b in zip(m1.parameters(), model.module.parameters()):
            assert torch.equal(a, b)
        # a rank whose "replica" differs is caught by the debug check
        with torch.no_grad():
            w = torch.arange(6.0)
            model.module[1].weight.copy_(w if rank == 0 else w.flip(0))
        s3 = search_for(model.module, opt, "cnn", "eb", "global")
        try:
            s3.step()
        except RuntimeError as e:
            assert "differ across ranks" in str(e)
        else:
            raise AssertionError("the replica check did not fire")
    finally:
        wd.check_replicas = False


def check_wormsgd_equals_sgd_with_hooks(rank, world):
    """WormSGD on FSDP2 shards == torch.optim.SGD after a truncating grad hook: its fused
    step (default flags) and torch's own path on the truncated shards (foreach=True)."""
    for flags in ({}, {"foreach": True}):
        _wormsgd_equals_sgd_with_hooks(flags)


def _wormsgd_equals_sgd_with_hooks(flags):
    r = 0.25
    models, opts = [], []
    for cls in (worm.WormSGD, torch.optim.SGD):
        model = shard(KINDS["transformer"][0]())
        models.append(model)
        opts.append(cls(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True, **flags))
    # keep-masks in the params' own placement: a pattern over the full shape, sharded alike
    masks = []
    for model in models:
        ms = {}
        for p in model.parameters():
            full = (torch.arange(p.numel()).reshape(p.shape) % 3) != 0
            ms[p] = wd.distribute_like(full, p)
        masks.append(ms)
    opts[0].set_truncation(masks[0], r=r)
    for i in range(4):
        x, y = batch("transformer", i)
        for model, opt, ms in zip(models, opts, masks):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if not isinstance(opt, worm.WormSGD):  # the hook, by hand on the sharded grads
                for p, m in ms.items():
                    p.grad.mul_(torch.where(m, torch.ones((), dtype=p.dtype),
                                            torch.full((), r, dtype=p.dtype)))
            opt.step()
    for a, b in zip(full_params(models[0]), full_params(models[1])):
        assert torch.equal(a, b), f"WormSGD{flags} on FSDP2 differs from SGD + hooks"


# ------------------------------------------------- issue 22: dtypes, drift, layouts
def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


def _sharded_like(fulls, mesh, dtypes=None):
    """Parameters holding ``fulls`` (the same on every rank) sharded on dim 0 over mesh."""
    from torch.distributed.tensor import DTensor, Shard
    out = []
    for i, full in enumerate(fulls):
        chunk = -(-full.shape[0] // mesh.size())
        a = min(mesh.get_local_rank() * chunk, full.shape[0])
        b = min(a + chunk, full.shape[0])
        loc = full[a:b].clone()
        if dtypes is not None:
            loc = loc.to(dtypes[i])
        out.append(nn.Parameter(DTensor.from_local(loc, mesh, [Shard(0)], run_check=False,
                                                   shape=full.shape, stride=full.stride())))
    return out


def _big_sets(dtype):
    """Sets that take each plan: >= 2^19 entries (sampled level one), small (exact), ties."""
    g = torch.Generator().manual_seed(7)
    big = [torch.randn(700, 800, generator=g) * torch.linspace(0.1, 3, 700)[:, None],  # rows differ
           torch.randn(3, 5, generator=g)]
    ties = [torch.zeros(600, 1000), torch.randn(41, generator=g).round()]
    small = [torch.randn(13, 3, generator=g), torch.randn(2, 2, generator=g), torch.zeros(1, 1)]
    return [[t.to(dtype) for t in s] for s in (big, ties, small)]


def check_select_every_dtype(rank, world):
    """Each dtype the one-process search takes: sharded masks and distances == one process's,
    on the sampled and the exact plans (native passes on CPU), in both scopes."""
    mesh = _mesh(world)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for fulls in _big_sets(dtype):
            for scope in ("global", "layer"):
                what = f"{dtype} {[tuple(f.shape) for f in fulls]} {scope} on {world} ranks"
                params = _sharded_like(fulls, mesh)
                plain = [nn.Parameter(f.clone()) for f in fulls]
                s1 = worm.EarlyBird(None, None, mode="eb", layers=plain, window=3, stop=1e-9, scope=scope)
                s2 = worm.EarlyBird(None, None, mode="eb", layers=params, window=3, stop=1e-9, scope=scope)
                assert isinstance(s2._window, wd.ShardedMaskWindow), what
                g = torch.Generator().manual_seed(3)
                for step in range(4):
                    r1, r2 = s1.step(), s2.step()
                    assert (r1.distances, r1.d_max) == (r2.distances, r2.d_max), f"{what}: distances differ"
                    assert torch.equal(s1.packed_mask, packed_full(s2)), f"{what}: step {step}: masks differ"
                    with torch.no_grad():  # move some weights, the same on both sides
                        for p1, p2 in zip(plain, params):
                            noise = (torch.rand(p1.shape, generator=g) < 0.05).to(p1.dtype)
                            p1.add_(noise)
                            wd.local(p2).copy_(wd.local(wd.distribute_like(p1.detach(), p2)))
    # NaN on one rank: every rank raises the same error, naming the tensor
    fulls = _big_sets(torch.float32)[0]
    fulls[1][2, 1] = float("nan")
    s = worm.EarlyBird(None, None, mode="eb", layers=_sharded_like(fulls, mesh), window=3)
    _raises_everywhere(s.step, ValueError, "NaN or Inf in representative tensor(s) tensor[1]")
    # float64 on one rank only: one clear error on every rank, no collective mismatch
    fulls = _big_sets(torch.float32)[2]
    params = _sharded_like(fulls, mesh, [torch.float64 if rank == 0 else torch.float32] * 3)
    s = worm.EarlyBird(None, None, mode="eb", layers=params, window=3)
    _raises_everywhere(s.step, wd.RankFailure, "disagree on the dtype of tensor[0]")
    assert s._window.count == 0 and not s.history


def _raises_everywhere(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), str(e)
    else:
        raise AssertionError(f"expected {exc.__name__} ({text})")
    flag = torch.ones(1)  # the ranks are still in step: a collective after the error works
    dist.all_reduce(flag)
    assert flag.item() == dist.get_world_size()


def check_ranks_cannot_drift(rank, world):
    """A rank failing after the collectives (building its truncation bits) fails every rank
    with one error and the same rolled-back state; the run then goes on exactly as one
    process's. Ranks whose window counts differ refuse to sample."""
    kind = "cnn"
    m1, s1, k1 = run(kind, "worm", "global", "sgd", sharded=False)
    model = shard(KINDS[kind][0]())
    opt = make_opt(model, "sgd")
    s2 = search_for(model, opt, kind, "worm", "global")
    masks: list = []
    train(model, opt, s2, kind, 4, record=masks)
    w = s2._window
    before = (w.ring.clone(), w.count, len(s2.history), s2.truncating, s2.found)
    build = w._build_bits
    if rank == world - 1:
        def oom(row):
            raise MemoryError("injected: out of memory building the truncation bits")
        w._build_bits = oom
    _raises_everywhere(s2.step, wd.RankFailure, f"failed on 1 of {world} rank(s)")
    w._build_bits = build
    assert torch.equal(w.ring, before[0]) and (w.count, len(s2.history), s2.truncating, s2.found) == before[1:]
    train(model, opt, s2, kind, 4, start=4, record=masks)
    assert history(s1) == history(s2) and all(torch.equal(a, b) for a, b in zip(k1, masks)), \
        "after a failed step the run differs from one process's"
    s3 = search_for(model, None, kind, "eb", "layer")
    s3.step()
    s3._window.count += rank == 0  # a rank out of step: refused on every rank, nothing sampled
    _raises_everywhere(s3.step, wd.RankFailure, "disagree on the window count")
    assert len(s3.history) == 1


def check_stale_parameters(rank, world):
    """A search built before fully_shard says so instead of sampling, on every rank."""
    model = KINDS["cnn"][0]()
    opt = make_opt(model, "sgd")
    s = search_for(model, opt, "cnn", "eb", "global")
    shard(model)
    _raises_everywhere(s.step, RuntimeError, "no longer the model's parameter")
    assert s._window.count == 0


def _search_and_weights(sharded):
    model = KINDS["cnn"][0]()
    if sharded:
        shard(model)
    opt = make_opt(model, "sgd")
    return model, search_for(model, opt, "cnn", "worm", "global")


def _set_weights(model, fulls):
    with torch.no_grad():
        for p, f in zip(model.parameters(), fulls):
            wd.local(p).copy_(wd.local(wd.distribute_like(f, p)) if wd.is_dtensor(p) else f)


def check_layouts(rank, world, ckpt_dir, saved_by=None):
    """Search state moves between FSDP2 (any world size), DDP-style replicas and one process.

    Each layout trains 4 steps, saves with worm.distributed.save and loads into the other
    layout; both then sample the same weights and must agree on everything. With
    ``saved_by`` (a checkpoint written on another world size) only the load is checked."""
    import os
    for src_sharded in (True, False):
        path = os.path.join(ckpt_dir, f"{'fsdp2' if src_sharded else 'plain'}_w{world}")
        if saved_by is None:
            model, s = _search_and_weights(src_sharded)
            train(model, s.optimizer, s, "cnn", 4)
            wd.save({"search": s.state_dict()}, path)
            weights = full_params(model)
            s.step()
            mask = packed_full(s)  # gathers on FSDP2: every rank takes part
            if rank == 0:
                torch.save({"weights": weights, "history": history(s), "mask": mask}, path + ".expect")
            dist.barrier()
        else:
            path = os.path.join(ckpt_dir, f"{'fsdp2' if src_sharded else 'plain'}_w{saved_by}")
        expect = torch.load(path + ".expect")
        for dst_sharded in (True, False) if dist.is_initialized() else (False,):
            model, s2 = _search_and_weights(dst_sharded)
            sd = {"search": s2.state_dict()}
            wd.load(sd, path)
            s2.load_state_dict(sd["search"])
            _set_weights(model, expect["weights"])
            s2.step()
            what = f"{'FSDP2' if src_sharded else 'plain'} on {saved_by or world} -> " \
                   f"{'FSDP2' if dst_sharded else 'plain'} on {world}"
            assert history(s2) == expect["history"], f"{what}: history differs"
            assert torch.equal(packed_full(s2), expect["mask"]), f"{what}: mask differs"
