"""The paper's CNN experiments: EB Train vs WORM (Tables 2/3, Figure 1) with controls,
and the truncation sweep (Table 1), on the built-in datasets.

Every seed starts both searches from the same initial weights and the same data
order; every pruned variant is retrained on the same batches; accuracy is always
measured on the test split. The controls (``cfg.controls``) are built from EB
Train's searched weights, so they differ from EB Train's row in one thing each:

* ``dense``: EB's searched model, not pruned, trained on for the retraining budget
  (as long as EB's search + retraining);
* ``random ticket``: in every layer as many channels (entries) as EB's ticket keeps
  there, chosen at random;
* ``uniform ticket``: every layer pruned by the same share p (same total).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import controls as _ctl
from . import data as _data
from . import models as _models
from ..bn import recalibrate_bn
from ..optim import WormSGD
from ..prune import prune_report
from ..search import EarlyBird
# the reporting helpers live in .report; re-exported for callers of this module
from .report import (COLUMNS, format_table, nan_to_none, plot_distances, summary_rows,  # noqa: F401
                     window_note, write_csv, _events)

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(it=None, **kw):
        return it


# The tiny "cnn" at width 1 (16-32-32 channels) reaches only ~80% on digits before the
# window fills and barely recovers from losing half its channels; at width 2 it reaches
# ~96% and recovers within an epoch or two, and 3 seeds still run in minutes on 2 cores.
DEFAULT_WIDTH = {"cnn": 2.0}

METHODS = {"eb": "EB Train", "worm": "WORM"}
CONTROL_LABELS = {"dense": "dense (no pruning)", "random": "random ticket", "uniform": "uniform ticket"}


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
    retrain_epochs: int = 5
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
    prune: str = "channels"     # "channels" (Early-Bird's) | "weights" (the paper authors')
    controls: bool = True       # compare: dense, random and uniform tickets beside the methods
    recal_batches: int = 20     # training batches for worm.recalibrate_bn after pruning (0: off)
    latency: bool = True        # measure CPU latency dense vs pruned (worm.prune_report)
    threads: Optional[int] = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.width is None:
            self.width = default_width(self.model)
        if self.prune not in _ctl.PROTOCOLS:
            raise ValueError(f"prune must be one of {_ctl.PROTOCOLS}, got {self.prune!r}")


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
    if pruned is not None and pruned >= goal:
        return 0
    for i, a in enumerate(accs, start=1):
        if a >= goal:
            return i
    return None


def _recalibrated(model, train, cfg, seed) -> bool:
    """Fresh BN statistics from ``cfg.recal_batches`` training batches; False when off."""
    if cfg.recal_batches <= 0:
        return False
    loader = _loader(train, cfg.batch_size, seed=seed * 1000 + 999, shuffle=True)
    batches = [b for _, b in zip(range(cfg.recal_batches), loader)]
    recalibrate_bn(model, batches)
    return True


def search_one(cfg: CNNConfig, seed: int, mode: str, init_state: dict, train, test, info,
               label: Optional[str] = None, r: Optional[float] = None):
    """One search from ``init_state``: ``(model, ticket, fields)``."""
    torch.manual_seed(seed)
    model = _models.build(cfg.model, info["in_channels"], info["num_classes"], cfg.width)
    model.load_state_dict(init_state)
    opt = WormSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    search = EarlyBird(model, opt, mode=mode, layers="bn", prune_ratio=cfg.prune_ratio,
                       window=cfg.window, stop=cfg.stop, delta=cfg.delta,
                       r=cfg.r if r is None else r, l1=cfg.l1)
    label = label or mode
    losses, epoch_times = [], []
    for epoch in range(1, cfg.max_epochs + 1):
        # data order depends on (seed, epoch) only: identical for both methods
        loader = _loader(train, cfg.batch_size, seed=seed * 1000 + epoch, shuffle=True)
        t0 = time.perf_counter()
        losses.append(train_epoch(model, opt, loader, f"{label} s{seed} e{epoch}", cfg.progress))
        found = search.step().found
        epoch_times.append(time.perf_counter() - t0)
        if found:
            break
    test_loader = _loader(test, 512)
    pre_acc = evaluate(model, test_loader)
    ticket = search.ticket if search.found else search.mask
    search.close()
    probe = copy.deepcopy(model)
    pre_recal = evaluate(probe, test_loader) if _recalibrated(probe, train, cfg, seed) else None
    hist = search.history
    fields = {
        "seed": seed, "method": label, "mode": mode, "r": search.r,
        "found": search.found, "search_epochs": len(hist),
        "truncation_epoch": next((h.index for h in hist if h.truncating), None),
        "pre_prune_acc": pre_acc, "pre_prune_recal_acc": pre_recal,
        "l1": cfg.l1, "max_pruning_ratio": cfg.max_pruning_ratio,
        "search_time_s": sum(epoch_times), "epoch_time_s": statistics.fmean(epoch_times),
        "epoch_times_s": epoch_times,
        # the median: a process's first sampling step also pays one-time set-up
        "sampling_ms": 1000 * statistics.median(h.seconds for h in hist),
        "d_max": [h.d_max for h in hist], "d_avg": [h.d_avg for h in hist], "train_loss": losses,
    }
    return model, _ctl.as_param_ticket(model, ticket), fields


def retrain(cfg, seed, model, train, test, label, masks=None):
    """``cfg.retrain_epochs`` of plain SGD on the shared retraining batches:
    ``(accuracy after each epoch, seconds per epoch)``."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    _ctl.keep_masks(model, masks, opt)
    test_loader = _loader(test, 512)
    accs, times = [], []
    for e in range(1, cfg.retrain_epochs + 1):
        loader = _loader(train, cfg.batch_size, seed=seed * 1000 + 500 + e, shuffle=True)
        t0 = time.perf_counter()
        train_epoch(model, opt, loader, f"{label} s{seed} retrain {e}", cfg.progress)
        times.append(time.perf_counter() - t0)
        accs.append(evaluate(model, test_loader))
    return accs, times


def _retrained_fields(cfg, pre, pruned, recal, accs):
    return {"pruned_acc": pruned, "pruned_recal_acc": recal,
            "retrain1_acc": accs[0] if accs else None, "final_acc": accs[-1] if accs else None,
            "retrain_accs": accs, "retrain_epochs": len(accs),
            "restore_epochs": _restore_epochs(pre, recal if recal is not None else pruned, accs, cfg.restore)}


def prune_and_retrain(cfg, seed, model, ticket, train, test, info, label, base) -> dict:
    """Prune ``model`` (left unchanged) by ``ticket`` under ``cfg.prune``, recalibrate the
    BN statistics, retrain; ``base``'s fields plus the pruned variant's."""
    t0 = time.perf_counter()
    example = torch.zeros(1, info["in_channels"], 32, 32)
    src = copy.deepcopy(model) if cfg.prune == "weights" else model
    if cfg.prune == "weights" and ticket is None:
        ticket = _ctl.weight_ticket(src, cfg.prune_ratio)
    elif cfg.prune == "weights":   # a ticket of the model's weights: re-key it to the copy
        by_id = dict(zip((id(p) for p in model.parameters()), src.parameters()))
        ticket = {by_id[id(p)]: k for p, k in ticket.items()}
    small, fields, masks = _ctl.make_variant(src, ticket, cfg.prune, example, cfg.coupled,
                                             cfg.max_pruning_ratio, label)
    test_loader = _loader(test, 512)
    if masks:
        _ctl.keep_masks(small, masks, None)   # zeroed before the first evaluation
    pruned = evaluate(small, test_loader)
    recal = evaluate(small, test_loader) if _recalibrated(small, train, cfg, seed) else None
    accs, times = retrain(cfg, seed, small, train, test, label, masks)
    row = dict(base, method=label, protocol=cfg.prune, **fields,
               **_retrained_fields(cfg, base["pre_prune_acc"], pruned, recal, accs))
    row["retrain_epoch_s"] = statistics.fmean(times) if times else None
    row["time_s"] = base.get("search_time_s", 0.0) + time.perf_counter() - t0
    row["total_epochs"] = base.get("search_epochs", 0) + len(accs)
    if cfg.latency and cfg.prune == "channels" and label not in CONTROL_LABELS.values():
        rep = prune_report(model, small, example, threads=1)
        row.update(latency_ms=rep["latency_ms"], latency_ratio_b1=rep["latency_ratio"][1],
                   latency_ratio_b32=rep["latency_ratio"][32])
    return row


def run_one(cfg: CNNConfig, seed: int, mode: str, init_state: dict, train, test, info,
            label: Optional[str] = None, r: Optional[float] = None) -> dict:
    """One search + prune (its own ticket) + retrain from ``init_state``: the metrics row."""
    model, ticket, base = search_one(cfg, seed, mode, init_state, train, test, info, label, r)
    if cfg.prune == "weights":
        ticket = None          # the paper authors' protocol ignores the BN ticket
    return prune_and_retrain(cfg, seed, model, ticket, train, test, info, label or mode, base)


def control_rows(cfg, seed, model, ticket, base, train, test, info) -> list:
    """Dense, random and uniform controls from EB's searched ``model`` and ``ticket``."""
    rows = []
    keep = _ctl.weight_ticket(model, cfg.prune_ratio) if cfg.prune == "weights" else ticket
    common = {k: base[k] for k in ("seed", "mode", "search_epochs", "pre_prune_acc",
                                   "pre_prune_recal_acc", "search_time_s")}
    for kind, variant in (("random", _ctl.random_like(keep, seed)),
                          ("uniform", _ctl.uniform_like(keep, cfg.prune_ratio))):
        rows.append(prune_and_retrain(cfg, seed, model, variant, train, test, info,
                                      CONTROL_LABELS[kind], common))
    dense = copy.deepcopy(model)
    t0 = time.perf_counter()
    accs, times = retrain(cfg, seed, dense, train, test, CONTROL_LABELS["dense"])
    row = dict(common, method=CONTROL_LABELS["dense"], protocol="dense",
               **_retrained_fields(cfg, base["pre_prune_acc"], None, None, accs))
    row.update(pruned_acc=None, epoch_time_s=statistics.fmean(times) if times else None, epoch_times_s=times,
               retrain_epoch_s=statistics.fmean(times) if times else None,
               time_s=base["search_time_s"] + time.perf_counter() - t0,
               total_epochs=base["search_epochs"] + len(accs))
    row["search_epochs"] = None   # it trained on; nothing was searched for it
    rows.insert(0, row)
    return rows


def _overhead(runs: list) -> None:
    """Each search row's seconds per epoch against plain training (the dense control's
    epochs, same model, data and batch size) in the same seed's run."""
    for seed in {r["seed"] for r in runs}:
        same = [r for r in runs if r["seed"] == seed]
        plain = next((r["epoch_time_s"] for r in same if r.get("protocol") == "dense"), None)
        for r in same:
            if plain and (r.get("method") in METHODS.values() or r.get("protocol") == "dense"):
                r["epoch_time_vs_plain"] = r["epoch_time_s"] / plain


def compare(cfg: CNNConfig) -> dict:
    """EB Train vs WORM from the same initialisation, for each seed, with the controls."""
    train, test, info = _prepare(cfg)
    runs = []
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress):
        init = _init_state(cfg, seed, info)
        searched = {}
        for mode, label in METHODS.items():
            searched[mode] = search_one(cfg, seed, mode, init, train, test, info, label)
        for mode, label in METHODS.items():
            model, ticket, base = searched[mode]
            runs.append(prune_and_retrain(cfg, seed, model, None if cfg.prune == "weights" else ticket,
                                          train, test, info, label, base))
        if cfg.controls:
            runs.extend(control_rows(cfg, seed, *searched["eb"], train, test, info))
    _overhead(runs)
    warnings = list(dict.fromkeys(w for r in runs for w in r.get("warnings", [])))
    return {"kind": "compare", "config": _cfg_dict(cfg), "data": _info(info), "runs": runs,
            "warnings": warnings}


def sweep_r(cfg: CNNConfig, rs=(1.0, 0.5, 0.1, 0.05, 0.01)) -> dict:
    """Truncation from the first sampling step for each r (the paper's Table 1)."""
    train, test, info = _prepare(cfg)
    runs = []
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress):
        init = _init_state(cfg, seed, info)
        for r in rs:
            runs.append(run_one(cfg, seed, "truncate", init, train, test, info, label=f"r = {r:g}", r=r))
    warnings = list(dict.fromkeys(w for r in runs for w in r.get("warnings", [])))
    return {"kind": "sweep-r", "config": _cfg_dict(cfg), "data": _info(info), "runs": runs,
            "warnings": warnings}


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


def _cfg_dict(cfg):
    d = dict(cfg.__dict__)
    d["seeds"] = list(cfg.seeds)
    return d


def _info(info):
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, list, tuple, type(None)))}
