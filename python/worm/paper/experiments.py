"""The paper's CNN experiments: EB Train vs WORM (Tables 2/3, Figure 1) and the
truncation sweep (Table 1), on the built-in datasets.

Every run of a seed starts both methods from the same initial weights and the same
data order; accuracy is always measured on the test split.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import data as _data
from . import models as _models
from ..optim import WormSGD
from ..prune import count_flops, count_params, prune_channels, prune_report
from ..search import EarlyBird

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(it=None, **kw):
        return it


# The tiny "cnn" at width 1 (16-32-32 channels) reaches only ~80% on digits before the
# window fills and barely recovers from losing half its channels; at width 2 it reaches
# ~96% and recovers within an epoch or two, and 3 seeds still run in minutes on 2 cores.
DEFAULT_WIDTH = {"cnn": 2.0}


def default_width(model: str) -> float:
    return DEFAULT_WIDTH.get(model.lower().replace("-", "_"), 1.0)


@dataclass
class CNNConfig:
    dataset: str = "digits"
    model: str = "cnn"
    width: Optional[float] = None   # None: default_width(model)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    data_root: Optional[str] = None
    seeds: tuple = (0, 1, 2)
    max_epochs: int = 30
    retrain_epochs: int = 3
    batch_size: int = 32        # 45 steps per digits epoch: 64 gave too few to train on 1437 images
    lr: float = 0.01            # paper: SGD, lr 0.01 held static, momentum 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0
    prune_ratio: float = 0.5
    window: int = 5
    stop: float = 0.1
    delta: float = 0.05
    r: float = 3e-3
    restore: float = 0.9        # "epochs until 90% of the pre-prune accuracy"
    l1: float = 0.0             # network slimming on the BN gammas (EB's recipe: 1e-4; CLI default)
    max_pruning_ratio: Optional[float] = None   # per-layer floor when pruning (None: off, as EB)
    coupled: str = "any"        # how coupled channels are decided (worm.prune_channels)
    latency: bool = True        # measure CPU latency dense vs pruned (worm.prune_report)
    threads: Optional[int] = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.width is None:
            self.width = default_width(self.model)


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    dev = next(model.parameters()).device
    with torch.no_grad():
        for x, y in loader:
            pred = model(x.to(dev)).argmax(1)
            correct += int((pred == y.to(dev)).sum())
            total += y.numel()
    return correct / max(total, 1)


def train_epoch(model, opt, loader, desc=None, progress=False) -> float:
    model.train()
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    it = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for x, y in it:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
        loss.backward()
        opt.step()
        total += float(loss.detach()) * y.numel()
        n += y.numel()
    return total / max(n, 1)


def _loader(ds, batch_size, seed=None, shuffle=False):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def _restore_epochs(pre: float, pruned: float, accs: list, frac: float):
    """Retraining epochs until accuracy >= frac * pre (0: already); None: not within the run."""
    goal = frac * pre
    if pruned >= goal:
        return 0
    for i, a in enumerate(accs, start=1):
        if a >= goal:
            return i
    return None


def run_one(cfg: CNNConfig, seed: int, mode: str, init_state: dict, train, test, info,
            label: Optional[str] = None, r: Optional[float] = None) -> dict:
    """One search + prune + retrain from ``init_state``; returns the metrics row."""
    dev = torch.device("cpu")
    torch.manual_seed(seed)
    model = _models.build(cfg.model, info["in_channels"], info["num_classes"], cfg.width).to(dev)
    model.load_state_dict(init_state)
    opt = WormSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    search = EarlyBird(model, opt, mode=mode, layers="bn", prune_ratio=cfg.prune_ratio,
                       window=cfg.window, stop=cfg.stop, delta=cfg.delta,
                       r=cfg.r if r is None else r, l1=cfg.l1)
    test_loader = _loader(test, 512)
    label = label or mode
    t0 = time.perf_counter()
    losses = []
    for epoch in range(1, cfg.max_epochs + 1):
        # data order depends on (seed, epoch) only: identical for both methods
        loader = _loader(train, cfg.batch_size, seed=seed * 1000 + epoch, shuffle=True)
        losses.append(train_epoch(model, opt, loader, f"{label} s{seed} e{epoch}", cfg.progress))
        if search.step().found:
            break
    search_time = time.perf_counter() - t0
    pre_acc = evaluate(model, test_loader)
    ticket = search.ticket if search.found else search.mask
    search.close()

    t1 = time.perf_counter()
    example = torch.zeros(1, info["in_channels"], 32, 32)
    small, plan = prune_channels(model, ticket, example, coupled=cfg.coupled,
                                 max_pruning_ratio=cfg.max_pruning_ratio, return_plan=True)
    pruned_acc = evaluate(small, test_loader)
    ropt = torch.optim.SGD(small.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)
    accs = []
    for e in range(1, cfg.retrain_epochs + 1):
        loader = _loader(train, cfg.batch_size, seed=seed * 1000 + 500 + e, shuffle=True)
        train_epoch(small, ropt, loader, f"{label} s{seed} retrain {e}", cfg.progress)
        accs.append(evaluate(small, test_loader))
    retrain_time = time.perf_counter() - t1
    shape = (1, info["in_channels"], 32, 32)
    hist = search.history
    latency = {}
    if cfg.latency:
        rep = prune_report(model, small, example, threads=1)
        latency = {"latency_ms": rep["latency_ms"], "latency_ratio_b1": rep["latency_ratio"][1],
                   "latency_ratio_b32": rep["latency_ratio"][32]}
    return {
        "seed": seed, "method": label, "mode": mode, "r": search.r,
        "found": search.found, "search_epochs": len(hist),
        "truncation_epoch": next((h.index for h in hist if h.truncating), None),
        "pre_prune_acc": pre_acc, "pruned_acc": pruned_acc,
        "retrain1_acc": accs[0] if accs else None, "retrain_accs": accs,
        "restore_epochs": _restore_epochs(pre_acc, pruned_acc, accs, cfg.restore),
        "search_time_s": search_time, "time_s": search_time + retrain_time,
        "sampling_time_s": sum(h.seconds for h in hist),
        "params_before": count_params(model), "params_after": count_params(small),
        "flops_before": count_flops(model, shape), "flops_after": count_flops(small, shape),
        "ticket_departure": plan.departure, "plan": plan.summary(),
        "l1": cfg.l1, "max_pruning_ratio": cfg.max_pruning_ratio, **latency,
        "d_max": [h.d_max for h in hist], "d_avg": [h.d_avg for h in hist],
        "train_loss": losses,
    }


def _prepare(cfg: CNNConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, test, info = _data.load(cfg.dataset, root=cfg.data_root, train_subset=cfg.train_subset,
                                   test_subset=cfg.test_subset, seed=0)
    return train, test, info


def _init_state(cfg, seed, info):
    torch.manual_seed(seed)
    m = _models.build(cfg.model, info["in_channels"], info["num_classes"], cfg.width)
    return copy.deepcopy(m.state_dict())


def compare(cfg: CNNConfig) -> dict:
    """EB Train vs WORM from the same initialisation, for each seed."""
    train, test, info = _prepare(cfg)
    runs = []
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress):
        init = _init_state(cfg, seed, info)
        for mode, label in (("eb", "EB Train"), ("worm", "WORM")):
            runs.append(run_one(cfg, seed, mode, init, train, test, info, label=label))
    return {"kind": "compare", "config": _cfg_dict(cfg), "data": _info(info), "runs": runs}


def sweep_r(cfg: CNNConfig, rs=(1.0, 0.5, 0.1, 0.05, 0.01)) -> dict:
    """Truncation from the first sampling step for each r (the paper's Table 1)."""
    train, test, info = _prepare(cfg)
    runs = []
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress):
        init = _init_state(cfg, seed, info)
        for r in rs:
            runs.append(run_one(cfg, seed, "truncate", init, train, test, info, label=f"r = {r:g}", r=r))
    return {"kind": "sweep-r", "config": _cfg_dict(cfg), "data": _info(info), "runs": runs}


def _cfg_dict(cfg):
    d = dict(cfg.__dict__)
    d["seeds"] = list(cfg.seeds)
    return d


def _info(info):
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, list, tuple, type(None)))}


# ------------------------------------------------------------------ reporting
COLUMNS = [  # (key, header, kind)
    ("search_epochs", "search epochs", "num"),
    ("pre_prune_acc", "pre-prune acc", "pct"),
    ("pruned_acc", "acc after pruning", "pct"),
    ("retrain1_acc", "acc after 1 retrain epoch", "pct"),
    ("gain", "gain after 1 epoch", "pct"),
    ("restore_epochs", "epochs to 90% restore", "reach"),  # None: not reached in the run
    ("found", "ticket found", "frac"),
    ("params_kept", "params kept", "pct"),
    ("flops_kept", "MACs kept", "pct"),
    ("latency_ratio_b1", "CPU latency pruned/dense, batch 1", "pct"),
    ("latency_ratio_b32", "CPU latency pruned/dense, batch 32", "pct"),
    ("ticket_departure", "channels departing from ticket", "pct"),
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
    scalar = [k for k, v in result["runs"][0].items() if not isinstance(v, (list, dict))]
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
