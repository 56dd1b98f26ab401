"""The distributed radix select on one CUDA device: equals kthvalue, never syncs the host.

    python3 bench/select_cuda_check.py [--sets bert_base_qk 7b_qk]

Runs ``worm.distributed.kth_smallest`` (world of one, no collective) on the set's
scores under ``torch.cuda.set_sync_debug_mode("error")`` and compares it with
``torch.kthvalue`` on the concatenation; prints the time per call.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cases import SIZES, make_set  # noqa: E402

from worm import distributed as wd  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="*", default=["bert_base_qk", "bert_large_qk", "7b_qk"])
    args = ap.parse_args()
    for name in args.sets:
        ts = [t.abs() for t in make_set(SIZES["full"][name], "cuda")]
        n = sum(t.numel() for t in ts)
        for k in (0, 1, n // 2, n):
            ks = [k]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            thr, _ = wd.kth_smallest([ts], ks, group=False, device="cuda",
                                     dtype=wd.counter_dtype(n))
            torch.cuda.set_sync_debug_mode("default")
            want = float("-inf") if k == 0 else torch.kthvalue(
                torch.cat([t.reshape(-1) for t in ts]), k).values.item()
            assert thr.item() == want, (name, k, thr.item(), want)
        reps = 5
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            wd.kth_smallest([ts], [n // 2], group=False, device="cuda", dtype=wd.counter_dtype(n))
        torch.cuda.synchronize()
        print(f"{name}: {n:,} entries, equal to kthvalue for k in (0, 1, n/2, n), no host sync; "
              f"{(time.perf_counter() - t0) / reps * 1e3:.1f} ms per select on {torch.cuda.get_device_name()}",
              flush=True)
        del ts


if __name__ == "__main__":
    main()
