"""CPU benchmark of the C++ ops (worm._C) against the reference, in one run.

At BERT-base Q/K size (24 tensors of 768x768 = 14.2M entries):
* mask sampling (select_thresholds + mask_update_) vs the reference sampling
  (worm.reference thresholds + mask_update_) and vs one read of the scores (torch.sum);
* the WormSGD step with truncation (momentum 0.9, wd 1e-4) vs the faster of
  torch.optim.SGD foreach / single-tensor without truncation.
Targets: sampling >= 15x faster than the reference and within 4x of one read (issue 12);
SGD step within 1.10x of the faster torch SGD.

    PYTHONPATH=python:. python3 bench/bench_native.py [--quick]

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
    k = R.num_pruned(n, 0.5)
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    win = torch.zeros(window, nbytes, dtype=torch.uint8)
    ref_win = win.clone()
    out = []

    def native_sample():
        thr, _ = be.select_thresholds(ts, [k], "global")
        return be.mask_update_(ts, thr, win, 0)

    def ref_sample():
        thr = R.thresholds(ts, 0.5, "global")
        return R.mask_update_(ts, thr, ref_win, 0)

    def one_read():
        return [torch.sum(t) for t in ts]

    assert torch.equal(native_sample(), ref_sample()) and torch.equal(win, ref_win)
    t_nat = _time(native_sample, reps)
    t_ref = _time(ref_sample, max(1, reps // 2))
    t_read = _time(one_read, reps)
    t_sel = _time(lambda: be.select_thresholds(ts, [k], "global"), reps)
    out.append(dict(op="mask sampling (select + mask_update_)", entries=n, native_ms=t_nat * 1e3,
                    baseline="reference sampling", baseline_ms=t_ref * 1e3,
                    ratio=t_ref / t_nat, target=">= 15x faster", ok=t_ref / t_nat >= 15))
    out.append(dict(op="mask sampling vs one read (torch.sum)", entries=n, native_ms=t_nat * 1e3,
                    baseline="one read of the scores", baseline_ms=t_read * 1e3,
                    ratio=t_nat / t_read, target="<= 4x one read (issue 12)", ok=t_nat / t_read <= 4))
    out.append(dict(op="select_thresholds alone", entries=n, native_ms=t_sel * 1e3,
                    baseline="one read of the scores", baseline_ms=t_read * 1e3,
                    ratio=t_sel / t_read, target="-", ok=True))

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 tensors, 3 repetitions")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    sizes = (4, 768, 768) if args.quick else BERT_QK
    res = rows("cpu", sizes, reps=3 if args.quick else 7)
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
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "native_cpu" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=res), f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
