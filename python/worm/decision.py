"""The search's decision rule (docs/method.md, "The search and its trigger"), pure.

Distances in, (found, truncating) out: no tensors, no state, no model. The mask
window produces the distances; :class:`worm.EarlyBird` applies the decision.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

MODES = ("worm", "eb", "truncate")

__all__ = ["MODES", "Decision", "decide", "summarize"]


class Decision(NamedTuple):
    found: bool        # the ticket is found: the search stops
    truncating: bool   # gradient truncation is on after this sampling step


def summarize(distances: Sequence[float]) -> tuple:
    """(d_max, d_avg) of the distances between the newest mask and the older ones."""
    d = list(distances)
    return max(d), sum(d) / len(d)


def decide(distances: Optional[Sequence[float]], *, mode: str, stop: float, delta: float,
           truncating: bool) -> Decision:
    """The decision after one sampling step.

    ``distances``: the newest mask's distance to each older mask of a full window, or
    None while the window is not full (then nothing is decided, except that
    ``mode="truncate"`` truncates from the first step). ``truncating``: whether
    truncation was on before; once on it stays on until the ticket is found.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    found = False
    if distances is not None:
        d_max, d_avg = summarize(distances)
        if d_max < stop:
            found = True
        elif mode == "worm" and d_avg < stop + delta:
            truncating = True
    if mode == "truncate":
        truncating = True
    if found:
        truncating = False
    return Decision(found, truncating)
