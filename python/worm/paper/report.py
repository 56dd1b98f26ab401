"""The tables, the CSV and the distance plot of the CNN and text comparisons."""
from __future__ import annotations

import math
import statistics
from typing import Optional

COLUMNS = [  # (key, header, kind)
    ("search_epochs", "search epochs", "num"),
    ("total_epochs", "training epochs", "num"),
    ("pre_prune_acc", "pre-prune acc", "pct"),
    ("pre_prune_recal_acc", "pre-prune acc, BN recal", "pct"),
    ("pruned_acc", "acc after pruning", "pct"),
    ("pruned_recal_acc", "after pruning, BN recal", "pct"),
    ("retrain1_acc", "acc after 1 retrain epoch", "pct"),
    ("gain", "gain after 1 epoch", "pct"),
    ("final_acc", "acc after all retraining", "pct"),
    ("restore_epochs", "epochs to 90% restore", "reach"),  # None: not reached in the run
    ("found", "ticket found", "frac"),
    ("params_kept", "params kept", "pct"),
    ("flops_kept", "MACs kept", "pct"),
    ("latency_ratio_b1", "CPU latency pruned/dense, batch 1", "pct"),
    ("latency_ratio_b32", "CPU latency pruned/dense, batch 32", "pct"),
    ("ticket_departure", "channels departing from ticket", "pct"),
    ("epoch_time_vs_plain", "epoch time / plain training", "num"),
    ("sampling_ms", "sampling ms/step (median)", "num"),
    ("time_s", "wall time (s)", "num"),
]


def _value(run, key):
    if key == "gain":
        a, b = run.get("retrain1_acc"), run.get("pre_prune_acc")
        return None if a is None or b is None else a - b
    if key in ("params_kept", "flops_kept"):
        what = key.split("_")[0]
        if not run.get(f"{what}_before"):
            return None
        return run[f"{what}_after"] / run[f"{what}_before"]
    v = run.get(key)
    if isinstance(v, bool):
        return float(v)
    return v


def _fmt(values, kind):
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached" if kind == "reach" else "n/a"
    miss = len(values) - len(vals)
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    if kind == "pct":
        s = f"{100 * mean:.2f}% ± {100 * sd:.2f}"
    elif kind == "frac":
        s = f"{sum(vals):g}/{len(vals)}"
    else:
        s = f"{mean:.2f} ± {sd:.2f}"
    return s + (f" ({miss} not reached)" if miss else "")


def summary_rows(result: dict) -> list:
    methods = []
    for r in result["runs"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    # one column set for all methods, or rows would not line up with the header
    cols = [c for c in COLUMNS if any(_value(r, c[0]) is not None for r in result["runs"])]
    rows = []
    for m in methods:
        runs = [r for r in result["runs"] if r["method"] == m]
        rows.append((m, len(runs), [(h, _fmt([_value(r, k) for r in runs], kind)) for k, h, kind in cols]))
    return rows


def format_table(result: dict) -> str:
    rows = summary_rows(result)
    headers = ["method", "seeds"] + [h for h, _ in rows[0][2]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for m, n, cells in rows:
        lines.append("| " + " | ".join([m, str(n)] + [v for _, v in cells]) + " |")
    return "\n".join(lines)


def write_csv(result: dict, path) -> None:
    import csv
    scalar = []   # every run's scalar keys, first seen first (controls lack some of them)
    for r in result["runs"]:
        scalar += [k for k, v in r.items() if not isinstance(v, (list, dict)) and k not in scalar]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=scalar + ["gain"])
        w.writeheader()
        for r in result["runs"]:
            row = {k: r.get(k) for k in scalar}
            row["gain"] = _value(r, "gain")
            w.writerow(row)


def _events(run: dict):
    """(sampling step where truncation switched on or None, step where the ticket was
    found or None, number of sampling steps) for a CNN or a text record."""
    hist = run.get("history")
    if hist:
        on = next((h.get("index") for h in hist if h.get("truncating")), None)
        found = hist[-1].get("index") if hist[-1].get("found") else None
        return on, found, len(hist)
    n = len(run.get("d_max", []))
    return run.get("truncation_epoch"), n if run.get("found") else None, n


def window_note(run: dict) -> Optional[str]:
    """A sentence for a run whose window filled at the very step its ticket was found
    (one distance, nothing to draw); None for any other run."""
    on, found, _ = _events(run)
    d_max = run["d_max"] if "d_max" in run else [h.get("d_max") for h in run.get("history", [])]
    if found is None or sum(v is not None for v in d_max) > 1:
        return None
    d = d_max[found - 1] if found - 1 < len(d_max) else None
    return (f"{run['method']} seed {run['seed']}: the window filled at step {found} and the ticket "
            f"was found there" + (f" (d_max {d:.3f})" if d is not None else "") + "; not drawn")


def plot_distances(result: dict, path) -> None:
    """d_max and d_avg per sampling step, each method (the paper's Figure 1).

    A triangle marks the step where WORM switched truncation on, a star the step where
    the ticket was found. A run whose window filled at the very step the ticket was
    found has one distance, not a trajectory: it is listed in a note, not drawn.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    colors, notes, labelled = {}, [], set()
    for r in result["runs"]:
        if "d_max" not in r and not r.get("history"):
            continue   # a control: nothing was searched for it
        c = colors.setdefault(r["method"], f"C{len(colors)}")
        # CNN records keep d_max/d_avg lists; text records keep the search history
        series = {k: r[k] if k in r else [h.get(k) for h in r.get("history", [])]
                  for k in ("d_max", "d_avg")}
        xs = [i + 1 for i, v in enumerate(series["d_max"]) if v is not None]
        on, found, n = _events(r)
        note = window_note(r)
        if note:
            notes.append(note)
            continue
        for ax, key in zip(axes, ("d_max", "d_avg")):
            ys = {i + 1: v for i, v in enumerate(series[key]) if v is not None}
            first = r["method"] not in labelled
            ax.plot(xs, [ys[x] for x in xs], "-o", ms=3, color=c, alpha=0.75,
                    label=r["method"] if first else None)
            if on is not None:
                if on in ys:
                    ax.plot([on], [ys[on]], "^", ms=9, color=c, mec="k",
                            label="truncation on" if "on" not in labelled else None)
                else:  # switched on before the window was full ("truncate" mode)
                    ax.axvline(on, color=c, ls=":", lw=1,
                               label="truncation on" if "on" not in labelled else None)
            if found is not None and found in ys:
                ax.plot([found], [ys[found]], "*", ms=12, color=c, mec="k",
                        label="ticket found" if "found" not in labelled else None)
        labelled.add(r["method"])
        if on is not None:
            labelled.add("on")
        if found is not None:
            labelled.add("found")
    stop, delta = cfg.get("stop"), cfg.get("delta")
    for ax, key in zip(axes, ("d_max", "d_avg")):
        if isinstance(stop, (int, float)):  # "auto" has no line to draw
            ax.axhline(stop, color="k", ls="--", lw=1, label=f"stop s = {stop:g}")
        if key == "d_avg" and isinstance(stop, (int, float)) and isinstance(delta, (int, float)):
            ax.axhline(stop + delta, color="gray", ls=":", lw=1, label=f"trigger s + δ = {stop + delta:g}")
        ax.set_xlabel("sampling step" if cfg.get("every") else "epoch (sampling step)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key} over the window (one line per seed)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run with no line to label (stop="auto") has none
            ax.legend(fontsize=8)
    axes[0].set_ylabel("mask distance")
    fig.suptitle(f"{cfg.get('model', '')} on {cfg.get('dataset', cfg.get('task', ''))}: mask distance, "
                 f"window {cfg.get('window')}")
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, 0.04 * len(notes) + 0.02, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
