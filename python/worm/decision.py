"""The search's decision rule (docs/method.md, "The search and its trigger"), pure.

Distances in, (found, truncating) out: no tensors, no model. The mask window produces
the distances; :class:`worm.EarlyBird` applies the decision.

Distances are exact rationals ``popcount / N`` and the thresholds are compared as the
user wrote them (``0.1`` is 1/10), so ``d_avg == s + delta`` is never "below" by a
float rounding. The automatic rules (``stop="auto"``, ``delta="auto"``) read a
:class:`Trace` of the distance history: a pure function of the distances, so every
rank (which sees the same all-reduced counts) decides the same, and a search resumed
from its history decides exactly as one that never stopped.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence, Union

MODES = ("worm", "eb", "truncate")
AUTO = "auto"
# stop="auto": d_max and d_new must fall below this share of their reference level.
STOP_SHARE = Fraction(1, 2)
# delta="auto" (d_avg's elbow): d_avg and d_new below this share of their reference level.
TRIGGER_SHARE = Fraction(3, 4)

__all__ = ["MODES", "AUTO", "STOP_SHARE", "TRIGGER_SHARE", "PERSIST", "Decision", "Trace", "decide",
           "summarize", "check_stop", "check_delta", "exact_distance", "written"]


class Decision(NamedTuple):
    found: bool        # the ticket is found: the search stops
    truncating: bool   # gradient truncation is on after this sampling step


# ------------------------------------------------------------- the arguments
def check_stop(stop) -> Union[float, str]:
    """``stop`` (s) as given: a number in (0, 1], or ``"auto"``. s = 1 stops at the first
    full window unless two masks are complements (distances lie in [0, 1])."""
    if isinstance(stop, str):
        if stop != AUTO:
            raise ValueError(f"stop must be a number in (0, 1] or 'auto', got {stop!r}")
        return stop
    if isinstance(stop, bool) or not isinstance(stop, numbers.Real):
        raise TypeError(f"stop (s) must be a number in (0, 1] or 'auto', got {type(stop).__name__}")
    if not (math.isfinite(stop) and 0 < stop <= 1):
        raise ValueError(f"stop (s) must be a number in (0, 1]: the search stops when d_max < s "
                         f"and distances lie in [0, 1]; got {stop!r} (or use stop='auto')")
    return float(stop)


def check_delta(delta, stop) -> Union[float, str]:
    """``delta`` as given: a number >= 0, ``"auto"``, or None (0.05 with a number s,
    ``"auto"`` with ``stop="auto"``). ``stop`` must already be checked."""
    if delta is None:
        return AUTO if stop == AUTO else 0.05
    if isinstance(delta, str):
        if delta != AUTO:
            raise ValueError(f"delta must be a number >= 0 or 'auto', got {delta!r}")
        return delta
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a number >= 0 or 'auto', got {type(delta).__name__}")
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite number >= 0 (or 'auto'), got {delta!r}")
    if stop == AUTO:
        raise ValueError(f"delta={delta!r} is a margin over s (trigger: d_avg < s + delta), but "
                         "stop='auto' has no s: use delta='auto' (or leave delta unset)")
    return float(delta)


def written(x: float) -> Fraction:
    """A threshold as the user wrote it: the shortest decimal that gives the float
    (``0.1`` -> 1/10), not the binary float's value."""
    return Fraction(repr(float(x)))


def exact_distance(d: float, numel: Optional[int]) -> Fraction:
    """A distance as the exact rational ``popcount / numel`` it came from.

    The window's float ``c / N`` is correctly rounded, so ``round(d * N)`` gives ``c``
    back exactly for any ``c < 2**51``. Without ``numel`` the distance is taken as
    written (its shortest decimal), like the thresholds.
    """
    if numel is None:
        return written(d)
    c = round(d * numel)
    if not 0 <= c <= numel or c / numel != d:
        raise ValueError(f"distance {d!r} is not a count of differing entries over {numel}")
    return Fraction(c, numel)


def summarize(distances: Sequence[float]) -> tuple:
    """(d_max, d_avg) of the distances between the newest mask and the older ones."""
    d = list(distances)
    return max(d), sum(d) / len(d)


def _exact_summary(distances, numel) -> tuple:
    d = [exact_distance(x, numel) for x in distances]
    return max(d), sum(d) / len(d)


# -------------------------------------------------------- the automatic rules
class Trace(NamedTuple):
    """What the automatic rules remember of the distance history (immutable, exact).

    Per full window three statistics: ``d_max``, ``d_avg`` and ``d_new`` (the distance
    between the two newest masks: the last sampling step's change). ``peaks``: the
    largest of each seen so far; ``recent``: the last :data:`PERSIST` triples, oldest
    first. Built by :meth:`push` one sampling step at a time (or :meth:`replay`).
    """

    steps: int = 0                                    # full windows seen
    peaks: tuple = (Fraction(0), Fraction(0), Fraction(0))
    recent: tuple = ()

    def push(self, distances: Optional[Sequence[float]], numel: Optional[int] = None) -> "Trace":
        """The trace after one more sampling step (unchanged while the window is not full)."""
        if distances is None:
            return self
        d = [exact_distance(x, numel) for x in distances]
        now = (max(d), sum(d) / len(d), d[-1])
        return Trace(self.steps + 1, tuple(max(a, b) for a, b in zip(self.peaks, now)),
                     (self.recent + (now,))[-PERSIST:])

    @classmethod
    def replay(cls, history: Sequence[Optional[Sequence[float]]],
               numel: Optional[int] = None) -> "Trace":
        """The trace of a whole history of distance lists (None: window not yet full)."""
        t = cls()
        for d in history:
            t = t.push(d, numel)
        return t


# The last sampling steps that must all pass before an automatic rule fires.
PERSIST = 2
_MAX, _AVG, _NEW = range(3)


def null_level(prune_ratio: float) -> Fraction:
    """Expected distance between two independent random masks of keep share q = 1 - p:
    each entry differs with probability 2q(1 - q) (docs/method.md)."""
    p = written(prune_ratio)
    return 2 * p * (1 - p)


def _fallen(trace: Trace, stat: int, share: Fraction, prune_ratio: float) -> bool:
    """``stat`` and d_new below ``share`` of min(their peak, the random-mask level) at
    each of the last PERSIST full windows; or the newest window all one mask."""
    if trace.steps == 0:
        return False
    if trace.recent[-1][_MAX] == 0:
        return True
    if len(trace.recent) < PERSIST:
        return False
    null = null_level(prune_ratio)
    bar = [share * min(trace.peaks[i], null) for i in range(3)]
    return all(r[stat] < bar[stat] and r[_NEW] < bar[_NEW] for r in trace.recent)


def auto_stop(trace: Trace, prune_ratio: float) -> bool:
    """stop="auto": d_max and d_new each below 1/2 of min(their peak, the random-mask
    level) at the last two full windows, or d_max == 0."""
    return _fallen(trace, _MAX, STOP_SHARE, prune_ratio)


def auto_trigger(trace: Trace, prune_ratio: float) -> bool:
    """delta="auto", d_avg's elbow: d_avg and d_new each below 3/4 of min(their peak,
    the random-mask level) at the last two full windows, or d_max == 0."""
    return _fallen(trace, _AVG, TRIGGER_SHARE, prune_ratio)


# ---------------------------------------------------------------- the decision
def decide(distances: Optional[Sequence[float]], *, mode: str, stop, delta, truncating: bool,
           numel: Optional[int] = None, trace: Optional[Trace] = None,
           prune_ratio: Optional[float] = None) -> Decision:
    """The decision after one sampling step.

    ``distances``: the newest mask's distance to each older mask of a full window, or
    None while the window is not full (then nothing is decided, except that
    ``mode="truncate"`` truncates from the first step). ``truncating``: whether
    truncation was on before; once on it stays on until the ticket is found.
    ``numel``: N, to read the distances as exact ``popcount / N`` (None: as written).
    ``stop="auto"`` / ``delta="auto"`` need ``trace`` (the history including this
    step's distances, :meth:`Trace.push`) and ``prune_ratio``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    auto = AUTO in (stop, delta)
    if auto and (trace is None or prune_ratio is None):
        raise ValueError("stop='auto' / delta='auto' decide from the distance history: pass "
                         "trace= (Trace.push of this step) and prune_ratio=")
    found = False
    if distances is not None:
        d_max, d_avg = _exact_summary(distances, numel)
        if auto and (not trace.recent or trace.recent[-1][:2] != (d_max, d_avg)):
            raise ValueError("trace= must be the history including this step's distances "
                             "(trace.push(distances, numel))")
        if stop == AUTO:
            found = auto_stop(trace, prune_ratio)
        else:
            found = d_max < written(stop)
        if not found and mode == "worm":
            if delta == AUTO:
                truncating = truncating or auto_trigger(trace, prune_ratio)
            elif d_avg < written(stop) + written(delta):
                truncating = True
    if mode == "truncate":
        truncating = True
    if found:
        truncating = False
    return Decision(found, truncating)
