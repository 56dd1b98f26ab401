"""One table of kernel timings vs the pure-PyTorch ways, with a JSON+markdown record.

    python3 bench/table.py --out bench/results            # full sizes (GPU)
    python3 bench/table.py --sizes small --out /tmp/x      # smoke test, seconds

GB/s counts the minimum bytes each op must move (read every score once; truncation
reads and writes the grad and reads the bits; SGD reads param, grad, buffer, bits and
writes param and buffer), shown against a big tensor copy's bandwidth from this run.
On CPU the Triton rows are skipped (the interpreter is not a benchmark).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cases as CS  # noqa: E402


def timeit(fn, device, reps=None):
    fn()  # warm up (compiles Triton kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        # Few reps for slow rows (the pure-PyTorch ways at 1e9 entries take seconds).
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        first = time.perf_counter() - t0
        n = reps or max(3, min(50, int(1.0 / max(first, 1e-6))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n / 1e3, torch.cuda.max_memory_allocated() - base
    n = reps or 5
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n, float("nan")


def copy_bandwidth(device):
    n = (256 << 20) // 4 if device.type == "cuda" else (32 << 20) // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    t, _ = timeit(lambda: b.copy_(a), device)
    return 2 * a.numel() * 4 / t / 1e9


def rows_for(name, shapes, device, triton_ok):
    ts = CS.make_set(shapes, device)
    n = sum(t.numel() for t in ts)
    k = CS.k_of(ts)
    score_bytes = n * 4
    rows = []

    def add(op, impl, fn, nbytes, skip=None):
        rows.append((name, n, op, impl, fn, nbytes, skip))

    add("threshold", "sort", lambda: CS.thr_sort(ts, k), score_bytes)
    add("threshold", "kthvalue", lambda: CS.thr_kthvalue(ts, k), score_bytes)
    add("threshold", "topk", lambda: CS.thr_topk(ts, k), score_bytes,
        None if n <= (1 << 26) or device.type == "cuda" else "too slow on CPU")
    add("threshold", "quantile", lambda: CS.thr_quantile(ts, k), score_bytes,
        None if n <= 16_000_000 else "torch.quantile: > 16M elements")
    add("threshold", "triton", lambda: CS.thr_triton(ts, k), score_bytes,
        None if triton_ok else "needs CUDA")
    grads = [torch.randn_like(t) for t in ts]
    bufs = [torch.zeros_like(t) for t in ts]
    keep = [torch.rand(t.shape, device=device) < 0.5 for t in ts]
    keep_f = [torch.where(m, 1.0, 3e-3) for m in keep]
    from worm import reference as R
    bits = [R.pack([m]) for m in keep]
    add("truncate", "foreach_mul_", lambda: CS.trunc_foreach(grads, keep_f), n * 12)
    add("truncate", "triton", lambda: __import__("worm_kernels").truncate_(grads, bits, 3e-3),
        n * 8 + n // 8, None if triton_ok else "needs CUDA")
    add("trunc+sgd", "foreach", lambda: CS.sgd_foreach(ts, grads, bufs, keep_f), n * 4 * 6)
    if device.type == "cuda":
        ps = [torch.nn.Parameter(t.clone()) for t in ts]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)
        add("sgd(no trunc)", "optim.SGD fused", opt.step, n * 4 * 5)
    kw = dict(r=3e-3, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False)
    add("trunc+sgd", "triton", lambda: __import__("worm_kernels").sgd_step_(ts, grads, bufs, [0] * len(ts), bits, **kw),
        n * 4 * 5 + n // 8, None if triton_ok else "needs CUDA")
    _backend_rows(add, ts, grads, bufs, bits, k, n, device, triton_ok, kw)
    return rows


def _backend_rows(add, ts, grads, bufs, bits, k, n, device, triton_ok, kw):
    """The whole sampling step (threshold + packed mask + window distances) and the
    truncation ops through each backend of worm's dispatch, reference included."""
    from worm import _backends
    from worm import reference as R
    window = 5
    ring = torch.zeros(window, R.byte_offsets([t.numel() for t in ts])[-1], dtype=torch.uint8,
                       device=device)
    names = ["reference", "triton", "cuda"] if device.type == "cuda" else ["reference", "cpp"]
    for name in names:
        why = _backends.unusable(name, device)
        if name == "triton" and not triton_ok:
            why = why or "needs CUDA"
        be = None if why else _backends.load(name)
        slow = name == "reference" and n > (20_000_000 if device.type == "cpu" else 300_000_000)

        def sample(be=be):
            thr, _ = be.select_thresholds(ts, [k], "global")
            return be.mask_update_(ts, thr, ring, 0)

        # one read of the scores plus the packed mask against `window` rows
        add("sample", f"{name} backend", sample, n * 4 + window * n // 8,
            why or ("reference too slow at this size on CPU" if slow else None))
        if name != "triton":  # the Triton truncate/sgd rows are above
            add("truncate", f"{name} backend", lambda be=be: be.truncate_(grads, bits, 3e-3),
                n * 8 + n // 8, why)
            add("trunc+sgd", f"{name} backend",
                lambda be=be: be.sgd_step_(ts, grads, bufs, [0] * len(ts), bits, **kw),
                n * 4 * 5 + n // 8, why)
    add("read scores", "foreach L1 norm", lambda: torch._foreach_norm(ts, 1), n * 4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", choices=sorted(CS.SIZES), default="full")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sets", default="", help="comma-separated subset of the size set's names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    triton_ok = device.type == "cuda"
    if triton_ok:
        try:
            import worm_kernels  # noqa: F401
        except ImportError as e:
            print(f"Triton rows skipped: {e}")
            triton_ok = False
    else:
        print("No CUDA device: the Triton rows need CUDA (the interpreter is not a benchmark); "
              "running the pure-PyTorch rows only.")
    bw = copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {dev_name}; copy bandwidth {bw:.1f} GB/s")
    records = []
    for name, shapes in CS.SIZES[args.sizes].items():
        if args.sets and name not in args.sets.split(","):
            continue
        print(f"set {name}", flush=True)
        try:
            rows = rows_for(name, shapes, device, triton_ok)
        except torch.OutOfMemoryError:
            print(f"{name}: does not fit in memory, skipped")
            continue
        for set_name, n, op, impl, fn, nbytes, skip in rows:
            rec = dict(set=set_name, n=n, op=op, impl=impl)
            if skip:
                rec["skipped"] = skip
            else:
                try:
                    t, mem = timeit(fn, device)
                    gbs = nbytes / t / 1e9
                    rec.update(time_ms=t * 1e3, gb_s=gbs, of_copy=gbs / bw, peak_mem_mb=mem / 2**20)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    rec["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            records.append(rec)
            print(" ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()},
                  flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = "| set | entries | op | impl | time (ms) | GB/s | of copy | peak MB |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['set']} | {r['n']} | {r['op']} | {r['impl']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['set']} | {r['n']} | {r['op']} | {r['impl']} | {r['time_ms']:.4f} | "
                         f"{r['gb_s']:.1f} | {r['of_copy']:.0%} | {r['peak_mem_mb']:.1f} |")
    table = "\n".join(lines)
    print(table)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    meta = dict(device=dev_name, device_type=device.type, torch=torch.__version__, triton=tv,
                python=platform.python_version(), copy_gb_s=bw, sizes=args.sizes,
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    os.makedirs(args.out, exist_ok=True)
    stem = "".join(c if c.isalnum() else "-" for c in dev_name).strip("-")[:40]
    stem = f"{stem}_{datetime.date.today().isoformat()}_{args.sizes}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=records), f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"# Kernel benchmarks: {dev_name}\n\n{json.dumps(meta)}\n\n{table}\n")
    print(f"wrote {os.path.join(args.out, stem)}.json/.md")


if __name__ == "__main__":
    main()
