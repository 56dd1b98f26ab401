"""Running a model on example inputs, and timing it: shared by the CNN and transformer reports."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["call", "latency_ms", "dense_vs_pruned"]


def call(model: nn.Module, inputs):
    """``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def latency_ms(model: nn.Module, x, reps: int, min_time: float) -> float:
    """Median wall time of one forward, in ms, after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            call(model, x)
        times, t_end = [], time.perf_counter() + min_time
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            call(model, x)
            times.append(time.perf_counter() - t0)
            if len(times) >= 10 * reps:
                break
    return 1000 * statistics.median(times)


def dense_vs_pruned(models: Mapping[str, nn.Module], batch_of: Callable[[int], object],
                    batch_sizes: Sequence[int], reps: int, min_time: float,
                    threads: Optional[int]) -> dict:
    """Latency of each of ``models`` ("dense", "pruned") per batch size, with torch's
    thread count set to ``threads`` meanwhile: the report's ``latency_ms``,
    ``latency_ratio``, ``threads`` and its text."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        lat = {}
        for b in batch_sizes:
            x = batch_of(int(b))
            lat[int(b)] = {k: latency_ms(m, x, reps, min_time) for k, m in models.items()}
    finally:
        torch.set_num_threads(old)
    ratio = {b: v["pruned"] / v["dense"] for b, v in lat.items()}
    text = ", ".join(f"batch {b}: {v['dense']:.2f} -> {v['pruned']:.2f} ms "
                     f"({100 * ratio[b]:.0f}%)" for b, v in lat.items())
    return {"latency_ms": lat, "latency_ratio": ratio, "threads": threads or old, "text": text}
