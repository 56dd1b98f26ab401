"""Scaling curve of a sampling step (``sample_mask_``: select + packed mask + XOR counts
against a window of 5) from 1e4 to 1e9 entries, against one read of the same scores
(``torch.sum``, same run), per backend.

    PYTHONPATH=python:. python3 bench/scaling.py [--device cuda] [--max 1e9] [--out bench/results]

Writes <device>_<date>_scaling.{json,png}: time per step, GB/s over the minimum bytes
(4 B per score read once + the window: 5 rows read, 1 written, at 1/8 B per entry),
the ratio to one read (``torch.sum`` of the scores, same run) and to the physical-limit
plan's bytes (~8.6 B per fp32 entry with a window of 5, issue 12). Sizes that do not
fit in memory are skipped and say so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "python"), os.path.join(HERE, "..")]
from worm import _backends  # noqa: E402
from worm import reference as R  # noqa: E402
from table import copy_bandwidth  # noqa: E402

WINDOW = 5
LIMIT_BYTES = 8.6  # per fp32 entry: two-level select + mask against the window


def _time(fn, device, budget=1.5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    reps = max(3, min(50, int(budget / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max", type=float, default=1e9)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG of a recorded run")
    a = ap.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            rec = json.load(f)
        return plot(rec["rows"], rec["meta"]["device"], a.replot[:-len(".json")])
    dev = torch.device(a.device)
    names = [n for n in _backends.available(dev) if n != "reference"]
    if dev.type == "cpu":
        names = [n for n in names if n != "triton"]  # the interpreter is not a benchmark
    bw = copy_bandwidth(dev)
    sizes = [int(10 ** e) for e in (4, 5, 6, 7, 8, 9) if 10 ** e <= a.max]
    rows = []
    for n in sizes:
        try:
            g = torch.Generator().manual_seed(n)
            # a set of 1024-wide rows, like a model's weight matrices
            shapes = [(max(1, n // 1024), min(n, 1024))]
            ts = [torch.randn(s, generator=g).to(dev) for s in shapes]
            n_eff = sum(t.numel() for t in ts)
            win = torch.zeros(WINDOW, R.byte_offsets([t.numel() for t in ts])[-1], dtype=torch.uint8,
                              device=dev)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            rows.append(dict(n=n, skipped=f"does not fit: {str(e).splitlines()[0][:60]}"))
            continue
        k = n_eff // 2
        t_read = _time(lambda: [torch.sum(t) for t in ts], dev)
        for name in names + (["reference"] if n_eff <= 2e7 else []):
            impl = _backends.load(name)

            def step():
                return impl.sample_mask_(ts, [k], "global", win, 0)

            t = _time(step, dev)
            nbytes = n_eff * 4 + (WINDOW + 1) * n_eff / 8
            rows.append(dict(n=n_eff, backend=name, ms=t * 1e3, gb_s=nbytes / t / 1e9,
                             x_read=t / t_read, x_limit=t / (n_eff * LIMIT_BYTES / (bw * 1e9)),
                             read_ms=t_read * 1e3))
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in rows[-1].items()},
                  flush=True)
        del ts, win
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(),
                copy_gb_s=bw, date=datetime.datetime.now().isoformat(timespec="seconds"))
    stem = os.path.join(a.out, "".join(c if c.isalnum() else "-" for c in name)[:30]
                        + f"_{datetime.date.today().isoformat()}_scaling")
    os.makedirs(a.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, name, stem)


def plot(rows, name, stem):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for b in sorted({r["backend"] for r in rows if "backend" in r}):
        rs = [r for r in rows if r.get("backend") == b]
        ax[0].loglog([r["n"] for r in rs], [r["ms"] for r in rs], "o-", label=b)
        ax[1].loglog([r["n"] for r in rs], [r["x_read"] for r in rs], "o-", label=b)
    rd = sorted({(r["n"], r["read_ms"]) for r in rows if "read_ms" in r})
    ax[0].loglog([x for x, _ in rd], [y for _, y in rd], "k--", label="one read")
    ax[0].set(xlabel="entries", ylabel="ms per sampling step", title=f"{name}: sampling step")
    ax[1].set(xlabel="entries", ylabel="x one read", title="ratio to one read of the scores")
    for x in ax:
        x.legend()
        x.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print("wrote", stem + ".json/.png")


if __name__ == "__main__":
    main()
