"""CPU benchmark of the C++ ops (worm._C), in one run, on the sets of issue 12.

Sampling step (``sample_mask_``: select + packed mask + XOR counts against a window
of 5), for the ResNet-18 BN set, BERT-base and BERT-large Q/K and (with --big, 4.3 GB)
a 7B-class Q/K set, global and layer scope, against
* one read of the scores (``torch.sum`` of every tensor, same run): target <= 4x at
  BERT-base (issue 12), stretch <= 3x;
* the physical-limit plan's bytes (~8.6 B per fp32 entry at window 5, issue 12), at
  the read's bandwidth: ``x limit`` < 1 means fewer bytes' worth of time than that plan;
* GB/s over the minimum bytes (4 B per score + 6/8 B of window per entry);
* the same step as two ops (select_thresholds, then mask_update_) and the reference.
Plus the WormSGD step with truncation against torch's SGD without it (<= 1.10x).

    PYTHONPATH=python:. python3 bench/bench_native.py [--quick] [--big]

`rows(device, sizes)` returns the measured rows for other tables (bench/table.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from worm import reference as R
from worm import ops as be

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BERT_QK = (24, 768, 768)
WINDOW = 5
LIMIT_BYTES = 8.6  # per fp32 entry: the two-level plan of issue 12 at window 5
SETS = {  # name: list of shapes
    "resnet18_bn": [(64,)] * 5 + [(128,)] * 4 + [(256,)] * 4 + [(512,)] * 5 + [(64,), (128,)],
    "bert_base_qk": [(768, 768)] * 24,
    "bert_large_qk": [(1024, 1024)] * 48,
    "7b_qk": [(4096, 4096)] * 64,
}


def _time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sampling_rows(name, shapes, reps=9, reference=True):
    """Rows for one set: the fused step (global, layer), two ops, the reference."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(sh, generator=g) for sh in shapes]
    n = sum(t.numel() for t in ts)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(WINDOW, nbytes, dtype=torch.uint8)
    k = [R.num_pruned(n, 0.5)]
    ks_layer = [R.num_pruned(t.numel(), 0.5) for t in ts]

    def fused(scope="global"):
        return lambda: be.sample_mask_(ts, k if scope == "global" else ks_layer, scope, win, 0)

    def two_ops():
        thr, _ = be.select_thresholds(ts, k, "global")
        return be.mask_update_(ts, thr, win, 0)

    def one_read():
        return [torch.sum(t) for t in ts]

    ref_win = win.clone()
    got = be.sample_mask_(ts, k, "global", win, 0)[2]
    if reference:  # the fused step must give the reference's mask and counts
        thr = R.thresholds(ts, 0.5, "global")
        want = R.mask_update_(ts, thr, ref_win, 0)
        assert torch.equal(got, want) and torch.equal(win, ref_win), f"{name}: differs from the reference"
    # interleaved, so machine noise hits every variant alike
    timed = {"fused": fused(), "layer": fused("layer"), "two_ops": two_ops, "read": one_read}
    ts_ = {key: [] for key in timed}
    for fn in timed.values():
        fn()
    for _ in range(reps):
        for key, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            ts_[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in ts_.items()}
    t_ref = None
    if reference:
        def ref_sample():
            thr = R.thresholds(ts, 0.5, "global")
            return R.mask_update_(ts, thr, ref_win, 0)
        t_ref = _time(ref_sample, max(1, reps // 4))
    read = med["read"]
    min_bytes = n * 4 + (WINDOW + 1) * n / 8
    out = []
    for key, label in (("fused", "sample_mask_ (global)"), ("layer", "sample_mask_ (layer)"),
                       ("two_ops", "select_thresholds + mask_update_")):
        t = med[key]
        out.append(dict(set=name, entries=n, op=label, ms=t * 1e3, read_ms=read * 1e3,
                        x_read=t / read, x_limit=t / (read * LIMIT_BYTES / 4),
                        gb_s=min_bytes / t / 1e9,
                        x_reference=(t_ref / t) if t_ref else None,
                        reference_ms=t_ref * 1e3 if t_ref else None))
    return out


def rows(device="cpu", sizes=BERT_QK, reps=5, window=3):
    """Measured rows (dicts) for the C++ ops on `device` (CPU only)."""
    if torch.device(device).type != "cpu":
        raise ValueError("bench_native measures the C++ (CPU) ops")
    # The public ops (checks and routing included), forced onto the C++ kernels.
    os.environ["WORM_BACKEND"] = "cpp"
    if be.backend("cpu") != "cpp":
        raise RuntimeError(f"the C++ ops cannot run: {be.backend_info('cpu')['cpp']}")
    n_t, rows_, cols = sizes
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(rows_, cols, generator=g) for _ in range(n_t)]
    n = sum(t.numel() for t in ts)
    out = []
    for r in sampling_rows("bert_qk", [(rows_, cols)] * n_t, reps=reps):
        if r["op"] != "sample_mask_ (global)":
            continue
        out.append(dict(op="mask sampling (sample_mask_)", entries=n, native_ms=r["ms"],
                        baseline="reference sampling", baseline_ms=r["reference_ms"],
                        ratio=r["x_reference"], target=">= 15x faster", ok=r["x_reference"] >= 15))
        out.append(dict(op="mask sampling vs one read (torch.sum)", entries=n, native_ms=r["ms"],
                        baseline="one read of the scores", baseline_ms=r["read_ms"],
                        ratio=r["x_read"], target="<= 4x one read (issue 12)", ok=r["x_read"] <= 4))

    # SGD: ours with truncation vs torch's without.
    params = [t.clone() for t in ts]
    grads = [torch.randn(t.shape, generator=g) for t in ts]
    bits = [R.pack([torch.rand(t.shape, generator=g) < 0.5]) for t in ts]
    bufs = [torch.zeros_like(t) for t in ts]
    kw = dict(r=3e-3, lr=1e-3, weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False)

    def native_sgd():
        be.sgd_step_(params, grads, bufs, bits, **kw)

    def torch_sgd(foreach):
        ps = [torch.nn.Parameter(t.clone()) for t in ts]
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt = torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=foreach)
        opt.step()  # allocate the buffers outside the timing
        return opt.step

    t_sgd = _time(native_sgd, reps)
    t_fe = _time(torch_sgd(True), reps)
    t_st = _time(torch_sgd(False), reps)
    best = min(t_fe, t_st)
    out.append(dict(op="WormSGD step with truncation", entries=n, native_ms=t_sgd * 1e3,
                    baseline=f"torch SGD ({'foreach' if t_fe <= t_st else 'single-tensor'}), no truncation",
                    baseline_ms=best * 1e3, ratio=t_sgd / best, target="<= 1.10x",
                    ok=t_sgd / best <= 1.10,
                    extra=dict(torch_foreach_ms=t_fe * 1e3, torch_single_ms=t_st * 1e3)))
    return out


def sampling_table(big=False, quick=False):
    names = ["resnet18_bn", "bert_base_qk"] + ([] if quick else ["bert_large_qk"]) \
        + (["7b_qk"] if big else [])
    rows_ = []
    for name in names:
        rows_ += sampling_rows(name, SETS[name], reps=5 if name == "7b_qk" else (5 if quick else 15),
                               reference=name != "7b_qk")
        print(rows_[-3]["set"], "done", flush=True)
    lines = ["| set | entries | op | ms | one read ms | x one read | x limit plan | GB/s (min bytes) | x reference |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows_:
        xr = f"{r['x_reference']:.0f}" if r["x_reference"] else "-"
        lines.append(f"| {r['set']} | {r['entries']:,} | {r['op']} | {r['ms']:.3f} | {r['read_ms']:.3f} "
                     f"| {r['x_read']:.2f} | {r['x_limit']:.2f} | {r['gb_s']:.1f} | {xr} |")
    return rows_, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 tensors, 3 repetitions")
    ap.add_argument("--big", action="store_true", help="also the 7B-class Q/K set (4.3 GB)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    sizes = (4, 768, 768) if args.quick else BERT_QK
    res = rows("cpu", sizes, reps=3 if args.quick else 7)
    samp, samp_lines = sampling_table(big=args.big, quick=args.quick)
    meta = dict(device=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), sizes=list(sizes),
                quick=args.quick)
    lines = [f"# worm C++ ops on CPU ({meta['device']}, {meta['cores']} cores, torch {meta['torch']}, "
             f"{meta['date']})", "", f"Tensors: {sizes[0]} x {sizes[1]}x{sizes[2]} fp32", "",
             "| op | native ms | baseline | baseline ms | ratio | target | ok |",
             "|---|---:|---|---:|---:|---|---|"]
    for r in res:
        lines.append(f"| {r['op']} | {r['native_ms']:.2f} | {r['baseline']} | {r['baseline_ms']:.2f} "
                     f"| {r['ratio']:.2f} | {r['target']} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", f"## Sampling step, window {WINDOW}, p = 0.5 (median of interleaved runs)", "",
              "x limit plan: time over what the ~8.6 B/entry two-level plan of issue 12 would take "
              "at the read's bandwidth.", ""] + samp_lines
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "native_cpu" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=res, sampling=samp), f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
