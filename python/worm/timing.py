"""Running a model on example inputs, and timing it: shared by the CNN and transformer reports."""
from __future__ import annotations

import statistics
import time
from typing import Mapping

import torch
from torch import nn

__all__ = ["call", "latency_ms"]


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
