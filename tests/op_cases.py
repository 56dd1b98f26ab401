"""Shared cases for every backend's op tests (Triton, C++, CUDA): one list, no copies.

Each case builds a list of tensors from a seed; ``id`` names it in test output.
"""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rand(n, g, dtype, device):
    return torch.randn(n, generator=g).to(dtype).to(device)


def _make(kind, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        return [_rand(1, g, dtype, device)]
    if kind == "n31":
        return [_rand(31, g, dtype, device)]
    if kind == "n4097":
        return [_rand(4097, g, dtype, device).reshape(17, 241)]
    if kind == "n1000003":
        return [_rand(1000003, g, dtype, device)]
    if kind == "many_small":
        sizes = [1, 3, 8, 9, 15, 16, 17, 31, 33, 64, 100, 7, 2, 255, 256, 257]
        return [_rand(s, g, dtype, device) for s in sizes]
    if kind == "small_and_large":
        return [_rand(5, g, dtype, device), _rand(70007, g, dtype, device).reshape(7, 10001),
                _rand(13, g, dtype, device)]
    if kind == "all_ties":
        return [torch.full((s,), 0.5, dtype=dtype, device=device) for s in (7, 40, 3)]
    if kind == "half_ties":
        out = []
        for s in (50, 21, 129):
            t = _rand(s, g, dtype, device)
            t[: s // 2] = -0.25  # ties of both signs: |w| equal
            t[: s // 4] = 0.25
            out.append(t)
        return out
    if kind == "bn_like":  # BatchNorm gammas: few distinct values, many ties
        return [(torch.randint(0, 5, (c,), generator=g).float() / 4 + 0.5).to(dtype).to(device)
                for c in (64, 64, 128, 128, 256, 256, 512, 512)]
    if kind == "zeros":
        return [torch.zeros(19, dtype=dtype, device=device), _rand(9, g, dtype, device)]
    raise KeyError(kind)


SMALL_KINDS = ("one", "n31", "n4097", "many_small", "all_ties", "half_ties", "bn_like", "zeros")
LARGE_KINDS = ("n1000003", "small_and_large")
KINDS = SMALL_KINDS + LARGE_KINDS
RATIOS = (0.0, 0.3, 0.5, 0.9)


def make(kind, dtype=torch.float32, device="cpu", seed=0):
    return _make(kind, dtype, device, seed)


def k_edge_ratios(tensors, scope="global"):
    """Ratios that give k = 0, k = 1 and k = N - 1 for the global set."""
    n = sum(t.numel() for t in tensors)
    out = [0.0]
    if n > 1:
        out.append(1.0 / n)
        out.append((n - 1) / n)
    return [r for r in out if r < 1.0]
