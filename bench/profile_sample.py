"""Where a sampling step's time goes on a GPU: per-kernel device time (torch.profiler)
for one select + mask update through each native backend, at a size set's shapes,
and the launch count and device vs wall time of the ResNet-18 BN step.

    PYTHONPATH=python:. python3 bench/profile_sample.py [--sets resnet18_bn,7b_qk]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as CS  # noqa: E402
from worm import _backends  # noqa: E402
from worm import reference as R  # noqa: E402


def one(backend, name, shapes, reps=5):
    dev = torch.device("cuda")
    ts = CS.make_set(shapes, dev)
    k = CS.k_of(ts)
    ring = torch.zeros(5, R.byte_offsets([t.numel() for t in ts])[-1], dtype=torch.uint8, device=dev)
    be = _backends.load(backend)

    def step():
        thr, _ = be.select_thresholds(ts, [k], "global")
        return be.mask_update_(ts, thr, ring, 0)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kern = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            d = kern.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in kern.values()) / reps
    print(f"\n{backend} {name} ({sum(t.numel() for t in ts)} entries): wall {wall * 1e6:.1f} us/step, "
          f"device {total:.1f} us/step, {sum(v[0] for v in kern.values()) / reps:.1f} device ops/step")
    for n, (c, t) in sorted(kern.items(), key=lambda kv: -kv[1][1]):
        print(f"  {t / reps:10.1f} us  x{c / reps:.0f}  {n[:90]}")
    del ts, ring
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="resnet18_bn,bert_base_qk,7b_qk")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for name in a.sets.split(","):
        for backend in ("cuda", "triton"):
            if _backends.unusable(backend, torch.device("cuda")) is None:
                one(backend, name, CS.SIZES["full"][name])


if __name__ == "__main__":
    main()
