"""Benchmark sets and the rows (op implementations) shared by table.py and bench_kernels.py."""
from __future__ import annotations

import torch

SIZES = {
    "small": {"resnet18_bn": [64] * 5 + [128] * 4 + [256] * 4 + [512] * 5 + [64, 128],
              "tiny_qk": [(128, 128)] * 4},
    "cpu": {"resnet18_bn": [64] * 5 + [128] * 4 + [256] * 4 + [512] * 5 + [64, 128],
            "bert_base_qk": [(768, 768)] * 24},
    "full": {"resnet18_bn": [64] * 5 + [128] * 4 + [256] * 4 + [512] * 5 + [64, 128],
             "bert_base_qk": [(768, 768)] * 24, "bert_large_qk": [(1024, 1024)] * 48,
             "7b_qk": [(4096, 4096)] * 64},
}


def make_set(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s if isinstance(s, tuple) else (s,), generator=g).to(dtype).to(device)
            for s in shapes]


def k_of(ts, p=0.5):
    return int(round(p * sum(t.numel() for t in ts)))


# --- thresholds: the ways users take the global k-th smallest |w| today
def thr_sort(ts, k):      # Early-Bird's code: sort the concatenated scores, index
    s = torch.cat([t.detach().float().abs().reshape(-1) for t in ts])
    return torch.sort(s)[0][k - 1]


def thr_kthvalue(ts, k):
    s = torch.cat([t.detach().float().abs().reshape(-1) for t in ts])
    return torch.kthvalue(s, k).values


def thr_topk(ts, k):
    s = torch.cat([t.detach().float().abs().reshape(-1) for t in ts])
    return torch.topk(s, k, largest=False, sorted=False).values.max()


def thr_quantile(ts, k):  # torch.quantile refuses > 16M elements
    s = torch.cat([t.detach().float().abs().reshape(-1) for t in ts])
    return torch.quantile(s, (k - 1) / max(1, s.numel() - 1), interpolation="lower")


def thr_triton(ts, k):
    import worm_kernels
    return worm_kernels.select_thresholds(ts, [k], "global")[0]


# --- truncation + SGD
def trunc_foreach(grads, keep_f):  # keep_f: float masks (1 or r), what users write today
    torch._foreach_mul_(grads, keep_f)


def sgd_foreach(params, grads, bufs, keep_f, lr=0.1, m=0.9):
    torch._foreach_mul_(grads, keep_f)
    torch._foreach_mul_(bufs, m)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)
