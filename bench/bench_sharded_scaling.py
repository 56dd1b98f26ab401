"""The sharded sampling step against one process's step and one all-gather, 1M..270M entries.

    nice python3 bench/bench_sharded_scaling.py --world 2 --sizes 1M 4M 16M 67M 270M \
        --out bench/results

W gloo processes on CPU (one thread each) hold a Q/K-like set (8 tensors of
[rows, 1024], fp32) sharded on dim 0 as DTensors. Per size, every rank times (median):

* ``sharded``: ``EarlyBird.step()`` on the sharded set (window 5): the local passes of
  worm.shard_ops (C++) plus the step's all-reduces;
* ``single``: one process's fused C++ step (``sample_mask_``) on this rank's own shard,
  the target's unit (the issue: sharded <= 2 x single + the all-reduce latency);
* ``allreduce``: one all-reduce of the step's largest payload (16 KB), its latency;
* ``allgather``: gathering the set's weights (``full_tensor()`` of every shard), what a
  pruner that selects on one device needs before it can even start.

Peak memory: the rise of the peak RSS (VmHWM, reset before each measurement through
/proc/self/clear_refs) over the RSS with the shards and the ring already allocated.
Rank 0 reports; the slowest rank's time is what the step costs, so times are maxed
over ranks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time

import torch

WINDOW = 5
UNITS = {"K": 10 ** 3, "M": 2 ** 20}


def parse_size(s: str) -> int:
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure(fn, reps):
    """(median seconds, peak RSS rise in MB over the current RSS)."""
    import torch.distributed as dist
    ts, peak = [], 0
    for _ in range(reps):
        dist.barrier()
        base = _rss_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        peak = max(peak, _rss_kb("VmHWM") - base)
    return statistics.median(ts), peak / 1024


def _worker(rank, world, port, sizes, reps, q):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import worm
    from worm import ops
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows_out = []
    for n in sizes:
        rows = max(1, n // 8 // 1024)
        g = torch.Generator().manual_seed(rank)
        params = []
        for _ in range(8):
            chunk = -(-rows // world)
            mine = max(0, min(rows, (rank + 1) * chunk) - min(rows, rank * chunk))
            loc = torch.randn(mine, 1024, generator=g)
            params.append(torch.nn.Parameter(DTensor.from_local(
                loc, mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, 1024)),
                stride=(1024, 1))))
        search = worm.EarlyBird(None, None, mode="eb", layers=params, window=WINDOW, stop=1e-9)
        search.step()  # warm: first-touch of the ring
        with torch.no_grad():
            locs = [p.to_local() for p in params]
            for t in locs:
                t.mul_(1.0001)
        t_sh, m_sh = _measure(search.step, reps)
        bytes_step = search._window.bytes_reduced // (reps + 1)

        ring = torch.zeros(WINDOW, sum((t.numel() + 7) // 8 for t in locs), dtype=torch.uint8)
        k_local = sum(t.numel() for t in locs) // 2
        ops.sample_mask_(locs, [k_local], "global", ring, 0)
        t_1, m_1 = _measure(lambda: ops.sample_mask_(locs, [k_local], "global", ring, 1), reps)
        del ring

        payload = torch.zeros(2048, dtype=torch.int64)
        t_ar, _ = _measure(lambda: dist.all_reduce(payload), max(reps, 5))

        def gather():
            full = [p.full_tensor() for p in params]
            del full
        t_ag, m_ag = _measure(gather, reps)
        got = torch.tensor([t_sh, t_1, t_ar, t_ag, m_sh, m_1, m_ag], dtype=torch.float64)
        dist.all_reduce(got, op=dist.ReduceOp.MAX)
        entries = rows * 1024 * 8
        if rank == 0:
            r = dict(zip(["sharded_s", "single_own_shard_s", "allreduce_s", "allgather_s",
                          "sharded_peak_MB", "single_peak_MB", "allgather_peak_MB"], got.tolist()))
            r.update(entries=entries, world=world, reps=reps, bytes_per_step=bytes_step,
                     shard_MB=entries * 4 / world / 2 ** 20, window_MB=WINDOW * entries / 8 / world / 2 ** 20,
                     target_s=2 * r["single_own_shard_s"] + r["allreduce_s"])
            r["meets_target"] = r["sharded_s"] <= r["target_s"]
            r["beats_allgather"] = r["sharded_s"] < r["allgather_s"]
            rows_out.append(r)
            print(json.dumps(r), flush=True)
        del params, search, locs
    if rank == 0:
        q.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, sizes, reps: int) -> list:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, port, sizes, reps, q), nprocs=world)
    return q.get()


def table(rows) -> list:
    lines = ["| world | entries | sharded step s | single step on own shard s | target 2x+AR s | "
             "all-reduce s | all-gather s | sharded peak +MB | single peak +MB | all-gather peak +MB | "
             "window MB/rank | bytes/step |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['world']} | {r['entries']:,} | {r['sharded_s']:.4f} | {r['single_own_shard_s']:.4f} | "
                     f"{r['target_s']:.4f} | {r['allreduce_s']:.5f} | {r['allgather_s']:.4f} | "
                     f"{r['sharded_peak_MB']:.1f} | {r['single_peak_MB']:.1f} | {r['allgather_peak_MB']:.1f} | "
                     f"{r['window_MB']:.1f} | {r['bytes_per_step']:,} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2])
    ap.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    rows = []
    for w in args.world:
        rows += run(w, sizes, args.reps)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    rec = {"torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "load_avg_after": load, "threads_per_rank": 1, "rows": rows}
    text = "\n".join([f"# Sharded sampling step vs one process and one all-gather (CPU, gloo, window {WINDOW})",
                      "", f"{rec['date']}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"load average after the run {' '.join(load)}", "", *table(rows)])
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "sharded_scaling_cpu_gloo")
        with open(stem + ".json", "w") as f:
            json.dump(rec, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
