"""stop="auto" / delta="auto" (docs/method.md, "Automatic stop and trigger") and the exact
threshold comparisons: pinned on synthetic mask histories, at the boundaries, on resume,
and on a small real run."""
import random
from fractions import Fraction

import pytest
import torch
from torch import nn

import worm
from worm import decision
from worm.decision import Trace, decide

WINDOW = 5


# ------------------------------------------------------------ synthetic masks
def _random_masks(n, steps, g):
    for _ in range(steps):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: n // 2]] = True
        yield keep


def _frozen(n, steps, g):
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[: n // 2]] = True
    for _ in range(steps):
        yield keep.clone()


def _random_walk(n, steps, g, swaps):
    """``swaps`` kept and ``swaps`` pruned entries trade places every step."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[: n // 2]] = True
    for _ in range(steps):
        kept, pruned = keep.nonzero().flatten(), (~keep).nonzero().flatten()
        keep[kept[torch.randperm(len(kept), generator=g)[:swaps]]] = False
        keep[pruned[torch.randperm(len(pruned), generator=g)[:swaps]]] = True
        yield keep.clone()


def _converging(n, steps, g, rate=0.8, floor=0.0):
    """The top half of fixed scores plus noise that shrinks by ``rate`` a step (down to
    ``floor``: borderline entries then keep flipping)."""
    base = torch.rand(n, generator=g)
    for t in range(steps):
        s = base + max(rate ** t, floor) * torch.randn(n, generator=g)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.topk(s, n // 2).indices] = True
        yield keep


def _history(masks):
    """The distance lists of a window of WINDOW over a mask sequence (oldest first),
    from torch alone: popcount(a ^ b) / N."""
    ring, out = [], []
    for m in masks:
        ring = (ring + [m])[-WINDOW:]
        n = m.numel()
        out.append(None if len(ring) < WINDOW else
                   [int((m ^ old).sum()) / n for old in ring[:-1]])
    return out


def _fire(history, n, stop="auto", delta=None, mode="eb"):
    """(sampling step the search stops at, step truncation switches on), None: never."""
    delta = delta if delta is not None else ("auto" if stop == "auto" else 0.05)
    trace, on, on_at = Trace(), False, None
    for i, d in enumerate(history, start=1):
        trace = trace.push(d, n)
        found, now = decide(d, mode=mode, stop=stop, delta=delta, truncating=on, numel=n,
                            trace=trace, prune_ratio=0.5)
        if now and not on:
            on_at = i
        on = now
        if found:
            return i, on_at
    return None, on_at


@pytest.mark.parametrize("n", [16, 64, 1024])
def test_random_masks_never_stop_or_trigger(n):
    """High but stationary distance (a fresh random mask each step): never fires."""
    g = torch.Generator().manual_seed(n)
    hist = _history(_random_masks(n, 300, g))
    assert _fire(hist, n, mode="worm") == (None, None)


@pytest.mark.parametrize("n, swaps", [(64, 1), (64, 4), (1024, 4), (1024, 64)])
def test_random_walk_never_stops_or_triggers(n, swaps):
    """Masks that keep changing at a steady rate: the fixed s=0.1 stops the slow walks at
    the first full window, the automatic rule never does."""
    g = torch.Generator().manual_seed(n + swaps)
    hist = _history(_random_walk(n, 300, g, swaps))
    assert _fire(hist, n, mode="worm") == (None, None)
    if 2 * swaps * (WINDOW - 1) < 0.1 * n:  # the window's spread stays below s
        assert _fire(hist, n, stop=0.1)[0] == WINDOW


@pytest.mark.parametrize("n", [16, 1024])
def test_frozen_masks_stop_when_the_window_fills(n):
    g = torch.Generator().manual_seed(0)
    assert _fire(_history(_frozen(n, 20, g)), n) == (WINDOW, None)


@pytest.mark.parametrize("floor", [0.0, 0.02])
def test_converging_masks_trigger_then_stop(floor):
    """Masks that settle (exactly, or up to borderline flips): truncation first, then the
    stop, both within a few steps of the fixed rule."""
    n = 1024
    g = torch.Generator().manual_seed(1)
    hist = _history(_converging(n, 80, g, floor=floor))
    stop, on = _fire(hist, n, mode="worm")
    fixed, _ = _fire(hist, n, stop=0.1)
    assert on is not None and stop is not None and WINDOW < on < stop
    assert abs(stop - fixed) <= 5, (stop, fixed)
    dm = [max(d) for d in hist[WINDOW - 1:stop]]
    assert dm[-1] < max(dm) / 2  # it stopped on a fall, not on noise


def test_a_walk_after_settling_does_not_restart_the_rule():
    """Convergence, then a slow walk: the rule stops during the convergence already."""
    n = 1024
    g = torch.Generator().manual_seed(2)
    masks = list(_converging(n, 30, g)) + list(_random_walk(n, 60, g, 2))
    stop, _ = _fire(_history(masks), n)
    assert stop is not None and stop <= 30


# ------------------------------------------------------------- the rule itself
def test_trace_replay_equals_pushes_and_ignores_unfilled_steps():
    hist = [None, None, [0.5, 0.25], [0.25, 0.125]]
    t = Trace()
    for d in hist:
        t = t.push(d, 8)
    assert t == Trace.replay(hist, 8)
    assert t.steps == 2 and t.peaks == (Fraction(1, 2), Fraction(3, 8), Fraction(1, 4))
    assert t.recent[-1] == (Fraction(1, 4), Fraction(3, 16), Fraction(1, 8))


def test_auto_needs_the_trace_of_this_step():
    with pytest.raises(ValueError, match="trace="):
        decide([0.1], mode="eb", stop="auto", delta="auto", truncating=False)
    stale = Trace().push([0.5], 2)
    with pytest.raises(ValueError, match="including this step"):
        decide([0.0], mode="eb", stop="auto", delta="auto", truncating=False, numel=2,
               trace=stale, prune_ratio=0.5)


def test_stop_needs_both_the_spread_and_the_last_change_to_fall_twice():
    """d_max and d_new below half their peak at two full windows running."""
    n = 100
    peak = [0.4, 0.3, 0.2, 0.2]
    below = [0.19, 0.1, 0.05, 0.05]
    hist = [peak, below, below]
    assert _fire(hist, n) == (3, None)
    assert _fire([peak, below, [0.19, 0.1, 0.05, 0.21]], n) == (None, None)  # d_new 0.21 > 0.2/2
    assert _fire([peak, below, [0.21, 0.1, 0.05, 0.05]], n) == (None, None)  # d_max 0.21 > 0.4/2
    assert _fire([peak, [0.0] * 4], n) == (2, None)                          # one mask: settled


# ------------------------------------------------------ exact threshold boundaries
@pytest.mark.parametrize("s", [0.1, 0.3, 0.7, 0.15])
def test_stop_compares_the_exact_distance_with_s_as_written(s):
    num, den = Fraction(repr(s)).as_integer_ratio()
    for n in range(1, 120):
        for c in range(n + 1):
            found, _ = decide([c / n], mode="eb", stop=s, delta=0.0, truncating=False, numel=n)
            assert found == (c * den < num * n), (c, n)


def test_trigger_compares_the_exact_mean_with_s_plus_delta_as_written():
    """d_avg == s + delta does not trigger: the naive float rule does on some of these."""
    s, delta = 0.1, 0.05
    naive_wrong = 0
    rng = random.Random(0)
    for n in list(range(1, 60)) + [rng.randrange(60, 5000) for _ in range(200)]:
        for c1 in range(0, n + 1, max(1, n // 40)):
            c2 = max(0, min(n, round(0.3 * n) - c1))  # around a mean of 0.15
            d = [c1 / n, c2 / n]
            _, on = decide(d, mode="worm", stop=s, delta=delta, truncating=False, numel=n)
            exact = Fraction(c1 + c2, 2 * n) < Fraction(3, 20) and max(c1, c2) * 10 >= n
            assert on == exact, (c1, c2, n)
            naive_wrong += (sum(d) / 2 < s + delta and max(d) >= s) != exact
    assert naive_wrong > 0  # the float rule gets some of these wrong: the test can tell


def test_boundary_through_the_search():
    """Masks 0.3 apart, then back: d = [0.0, 0.3], d_avg exactly 0.15 = s + delta."""
    n = 20
    a = set(range(10))
    b = (a - {7, 8, 9}) | {10, 11, 12}
    for delta, want in ((0.05, False), (0.0501, True)):
        x = nn.Parameter(torch.ones(n))
        opt = worm.WormSGD([x], lr=0.1)
        s = worm.EarlyBird(None, opt, mode="worm", layers=[x], window=3, stop=0.1, delta=delta)
        for keep in (a, b, a):
            with torch.no_grad():
                x.fill_(1.0)
                x[sorted(keep)] = 2.0
            rec = s.step()
        assert rec.distances == [0.0, 0.3] and rec.truncating is want and not rec.found
        s.close()


def test_exact_distance_refuses_a_non_count():
    assert decision.exact_distance(0.3, 10) == Fraction(3, 10)
    with pytest.raises(ValueError, match="not a count"):
        decision.exact_distance(0.123, 10)


# --------------------------------------------------------------- construction
def _search(**kw):
    x = nn.Parameter(torch.randn(16))
    return worm.EarlyBird(None, worm.WormSGD([x], lr=0.1), layers=[x], window=3, **kw), x


@pytest.mark.parametrize("kw, err, says", [
    (dict(stop=0), ValueError, "in (0, 1]"), (dict(stop=1.0000001), ValueError, "in (0, 1]"),
    (dict(stop=1.5), ValueError, "in (0, 1]"), (dict(stop=float("nan")), ValueError, "in (0, 1]"),
    (dict(stop="Auto"), ValueError, "'auto'"), (dict(stop=True), TypeError, "stop"),
    (dict(stop="0.1"), ValueError, "'auto'"),
    (dict(delta=-0.01), ValueError, ">= 0"), (dict(delta=float("inf")), ValueError, ">= 0"),
    (dict(delta="AUTO"), ValueError, "'auto'"), (dict(delta=False), TypeError, "delta"),
    (dict(stop="auto", delta=0.05), ValueError, "use delta='auto'"),
])
def test_bad_stop_and_delta_are_refused_when_built(kw, err, says):
    with pytest.raises(err, match=None) as e:
        _search(**kw)
    assert says in str(e.value), str(e.value)


def test_delta_defaults_follow_stop():
    s, _ = _search()
    assert (s.stop, s.delta) == (0.1, 0.05)
    s.close()
    s, _ = _search(stop="auto")
    assert (s.stop, s.delta) == ("auto", "auto")
    s.close()
    s, _ = _search(stop=0.2, delta="auto")  # elbow trigger with a fixed stop
    assert (s.stop, s.delta) == (0.2, "auto")
    s.close()


# --------------------------------------------------------------------- resume
def test_resume_mid_window_and_mid_run_decides_identically():
    n, steps = 256, 40
    g = torch.Generator().manual_seed(3)
    masks = list(_converging(n, steps, g, rate=0.85))

    def fresh():
        x = nn.Parameter(torch.ones(n))
        opt = worm.WormSGD([x], lr=0.1)
        return worm.EarlyBird(None, opt, mode="worm", layers=[x], window=WINDOW,
                              stop="auto", delta="auto"), x

    def feed(s, x, keep):
        with torch.no_grad():
            x.copy_(keep.float() + 0.5 * torch.rand(n, generator=torch.Generator().manual_seed(0)))
        return s.step()

    ref, xr = fresh()
    for m in masks:
        feed(ref, xr, m)
    recs = list(ref.history)  # after the ticket, step() only repeats the last record
    assert ref.found and any(r.truncating for r in recs)
    for cut in (2, WINDOW + 1, next(i for i, r in enumerate(recs) if r.truncating) + 1):
        a, xa = fresh()
        for m in masks[:cut]:
            feed(a, xa, m)
        sd = a.state_dict()
        b, xb = fresh()
        b.load_state_dict(sd)
        assert b._trace == a._trace == Trace.replay([r.distances for r in recs[:cut]], n)
        got = [feed(b, xb, m) for m in masks[cut:len(recs)]]
        assert [(r.found, r.truncating, r.d_max) for r in got] == \
               [(r.found, r.truncating, r.d_max) for r in recs[cut:]]
        assert [h.distances for h in b.history] == [r.distances for r in recs]
        a.close()
        b.close()
    ref.close()


# ------------------------------------------------------------------- real run
def test_small_real_run_finds_a_ticket():
    """Digits, a narrow CNN whose learning rate halves every epoch, so its masks must
    settle: stop="auto" finds the ticket within the budget, on a fall of d_max, and
    its decisions are the pure rule replayed on the run's own history."""
    from worm.paper import data, models
    from worm.paper.experiments import _loader, train_epoch
    torch.manual_seed(0)
    train, _, info = data.load("digits", train_subset=200, seed=0)
    model = models.build("cnn", info["in_channels"], info["num_classes"], 0.5)
    opt = worm.WormSGD(model.parameters(), lr=0.1, momentum=0.9)
    s = worm.EarlyBird(model, opt, mode="worm", window=3, stop="auto")
    for epoch in range(1, 16):
        train_epoch(model, opt, _loader(train, 50, seed=epoch, shuffle=True))
        for g in opt.param_groups:
            g["lr"] /= 2
        if s.step().found:
            break
    s.close()
    assert s.found, [h.distances for h in s.history]
    dm = [h.d_max for h in s.history if h.d_max is not None]
    assert dm[-1] == 0 or dm[-1] < max(dm) / 2
    trace, on = Trace(), False
    for h in s.history:  # the search decided what the pure rule says of its history
        trace = trace.push(h.distances, s.numel)
        found, on = decide(h.distances, mode="worm", stop="auto", delta="auto", truncating=on,
                           numel=s.numel, trace=trace, prune_ratio=0.5)
        assert (found, on) == (h.found, h.truncating)
    assert sum(int((~m).sum()) for m in s.ticket.values()) == round(0.5 * s.numel)
