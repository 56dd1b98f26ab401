"""Bytes and time per sampling step: the sharded search vs gathering the weights.

    python3 bench/bench_distributed.py --world 2 --time bert_base_qk --out bench/results

Counted (no processes needed): the payload one rank all-reduces in a typical sampling
step (worm.distributed.bytes_per_sample: two sampled level-one histograms, level two's
counts and collected-key histogram, the commit) and the wire bytes a ring all-reduce moves per rank for it (2 (W-1)/W x
payload), against the bytes one rank receives to all-gather the weights ((W-1)/W x N
x 4 for fp32, x 2 for bf16), which is what a pruner that concatenates the set on one
device needs before it can even select.

Timed (``--time SET ...``): W gloo processes on CPU hold the set sharded on dim 0 as
DTensors; ``EarlyBird.step()`` (exact select + mask update, window 5) against the
gather-based way (all-gather every shard, then one process's select and mask update
on the full tensors). bench_sharded_scaling.py times the step against one process's
step on the rank's own shard over 1M..270M entries, with peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cases import SIZES  # noqa: E402

SETS = {**SIZES["full"], "tiny_qk": SIZES["small"]["tiny_qk"]}
WINDOW = 5


def numel(shapes) -> int:
    n = 0
    for s in shapes:
        n += s[0] * s[1] if isinstance(s, tuple) else s
    return n


def counted(world: int) -> list:
    from worm.distributed import bytes_per_sample
    rows = []
    for name, shapes in SETS.items():
        n = numel(shapes)
        for scope in ("global", "layer"):
            payload = bytes_per_sample([numel([sh]) for sh in shapes], scope, WINDOW)
            rows.append({"set": name, "tensors": len(shapes), "entries": n, "scope": scope,
                         "world": world, "allreduce_payload_B": payload,
                         "allreduce_wire_B_per_rank": round(2 * (world - 1) / world * payload),
                         "allgather_fp32_B_per_rank": round((world - 1) / world * n * 4),
                         "allgather_bf16_B_per_rank": round((world - 1) / world * n * 2)})
    for r in rows:
        r["ratio_fp32"] = r["allgather_fp32_B_per_rank"] / r["allreduce_wire_B_per_rank"]
    return rows


def _timed_worker(rank, world, port, names, reps, q):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import worm
    from worm import ops
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out = []
    for name in names:
        shapes = SETS[name]
        g = torch.Generator().manual_seed(rank)
        params = []
        for s in shapes:
            full = s if isinstance(s, tuple) else (s,)
            chunk = -(-full[0] // world)
            rows = max(0, min(full[0], (rank + 1) * chunk) - min(full[0], rank * chunk))
            loc = torch.randn((rows, *full[1:]), generator=g)
            params.append(torch.nn.Parameter(DTensor.from_local(loc, mesh, [Shard(0)], run_check=False,
                                                                shape=torch.Size(full),
                                                                stride=torch.empty(full, device="meta").stride())))
        search = worm.EarlyBird(None, None, mode="eb", layers=params, window=WINDOW, stop=1e-9)
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            search.step()
            ts.append(time.perf_counter() - t0)
        payload = search._window.bytes_reduced // reps

        # the gather-based way: every rank all-gathers every shard, then selects alone
        ring = torch.zeros(WINDOW, sum((p.numel() + 7) // 8 for p in params), dtype=torch.uint8)
        be = ops  # the public ops, on the backend chosen for CPU
        k = [int(round(0.5 * sum(p.numel() for p in params)))]
        tg = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fulls = [p.full_tensor() for p in params]
            thr, _ = be.select_thresholds(fulls, k, "global")
            be.mask_update_(fulls, thr, ring, 0)
            tg.append(time.perf_counter() - t0)
            del fulls
        if rank == 0:
            out.append({"set": name, "world": world, "reps": reps,
                        "sharded_step_s": statistics.median(ts),
                        "gather_then_select_s": statistics.median(tg),
                        "measured_allreduce_payload_B": payload})
        del params, search
    if rank == 0:
        q.put(out)
    dist.barrier()
    dist.destroy_process_group()


def timed(world: int, names, reps: int) -> list:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_timed_worker, args=(world, port, list(names), reps, q), nprocs=world)
    return q.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--time", nargs="*", default=[], choices=sorted(SETS), metavar="SET")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for a JSON + markdown record")
    args = ap.parse_args(argv)
    from worm import ops
    rec = {"torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
           "cpu_backend": ops.backend("cpu"),
           "counted": counted(args.world), "timed": timed(args.world, args.time, args.reps) if args.time else []}
    lines = [f"# Sharded search: bytes and time per sampling step (world {args.world}, window {WINDOW})", "",
             "| set | entries | scope | all-reduce payload B | all-reduce wire B/rank | all-gather fp32 B/rank | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["counted"]:
        lines.append(f"| {r['set']} | {r['entries']:,} | {r['scope']} | {r['allreduce_payload_B']:,} | "
                     f"{r['allreduce_wire_B_per_rank']:,} | {r['allgather_fp32_B_per_rank']:,} | "
                     f"{r['ratio_fp32']:,.0f}x |")
    if rec["timed"]:
        lines += ["", f"Timed on CPU, gloo, {args.world} processes ({os.cpu_count()} cores, worm backend "
                  f"{rec['cpu_backend']} for both columns), median of {args.reps}:", "",
                  "| set | sharded EarlyBird.step s | all-gather + select s | measured payload B |",
                  "|---|---|---|---|"]
        for r in rec["timed"]:
            lines.append(f"| {r['set']} | {r['sharded_step_s']:.3f} | {r['gather_then_select_s']:.3f} | "
                         f"{r['measured_allreduce_payload_B']:,} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"distributed_cpu_gloo_w{args.world}")
        with open(stem + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
