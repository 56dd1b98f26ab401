"""``worm``: the paper's experiments from the command line.

    worm compare                 EB Train vs WORM (Tables 2/3 and 4-6, Figures 1/2)
    worm sweep-r                 truncation from the start for several r (Table 1)
    worm backend                 which kernel backend runs, and why not the others
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TEXT_TASKS = ("minilm-rt", "csv")

# Paper defaults: CNN s 0.1, delta 0.05, window 5; BERT s 0.01, delta 0.005, window 3.
CNN_DEFAULTS = {"stop": 0.1, "delta": 0.05, "window": 5}
TEXT_DEFAULTS = {"stop": 0.01, "delta": 0.005, "window": 3}


def _add_common(p: argparse.ArgumentParser, text: bool) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits", help="digits | fashion-mnist | cifar10 (default: digits)")
    g.add_argument("--data-root", default=None, help="folder of the dataset (cifar10: torchvision layout)")
    g.add_argument("--model", default="cnn", help="cnn | resnet18 | vgg11_bn (default: cnn)")
    g.add_argument("--width", type=float, default=None,
                   help="channel width multiplier (default 2.0 for cnn, 1.0 otherwise)")
    g.add_argument("--train-subset", type=int, default=None, help="use N training images (seeded, stratified)")
    g.add_argument("--test-subset", type=int, default=None, help="use N test images")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--max-epochs", type=int, default=None, help="search epochs at most (CNN default 30)")
    g.add_argument("--retrain-epochs", type=int, default=None, help="retraining epochs after pruning (CNN default 3)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="CNN: SGD lr, static (default 0.01)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("search (paper defaults)")
    g.add_argument("--prune-ratio", type=float, default=0.5)
    g.add_argument("--window", type=int, default=None, help="5 for CNNs, 3 for text")
    g.add_argument("--stop", type=float, default=None, help="s: 0.1 for CNNs, 0.01 for text")
    g.add_argument("--delta", type=float, default=None, help="0.05 for CNNs, 0.005 for text")
    g.add_argument("--r", type=float, default=3e-3, help="truncation factor r (default 3e-3)")
    if text:
        g = p.add_argument_group("text (the paper's BERT study)")
        g.add_argument("--task", default=None, choices=TEXT_TASKS,
                       help="minilm-rt: all-MiniLM-L6-v2 on Rotten Tomatoes; csv: your --csv file")
        g.add_argument("--csv", default=None, help="CSV with text,label columns (with --task csv)")
        g.add_argument("--n-train", type=int, default=None)
        g.add_argument("--n-test", type=int, default=None)
        g.add_argument("--every", type=int, default=None,
                       help="text: sample every N optimizer steps; 0 = at each epoch end (the paper)")
    p.add_argument("--out", default=None, help="output folder (default worm-runs/<kind>-<data>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="worm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compare", help="EB Train vs WORM from the same initialisation, several seeds")
    _add_common(p, text=True)
    p = sub.add_parser("sweep-r", help="truncation from the first epoch for several r (Table 1)")
    _add_common(p, text=False)
    p.add_argument("--rs", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.05, 0.01])
    sub.add_parser("backend", help="which kernel backend runs on this machine")
    return ap


def _cnn_config(a):
    from .experiments import CNNConfig, default_width
    d = CNNConfig()
    return CNNConfig(
        dataset=a.dataset, model=a.model,
        width=a.width if a.width is not None else default_width(a.model), train_subset=a.train_subset,
        test_subset=a.test_subset, data_root=a.data_root, seeds=tuple(a.seeds),
        max_epochs=a.max_epochs or d.max_epochs, retrain_epochs=a.retrain_epochs or d.retrain_epochs,
        batch_size=a.batch_size or d.batch_size, lr=a.lr or d.lr, momentum=a.momentum,
        prune_ratio=a.prune_ratio,
        window=a.window or CNN_DEFAULTS["window"],
        stop=a.stop if a.stop is not None else CNN_DEFAULTS["stop"],
        delta=a.delta if a.delta is not None else CNN_DEFAULTS["delta"],
        r=a.r, threads=a.threads, progress=not a.quiet)


def _out_dir(a, kind, what) -> Path:
    if a.out:
        out = Path(a.out)
    else:
        out = Path("worm-runs") / f"{kind}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write(result: dict, out: Path, plots) -> None:
    from .experiments import format_table, nan_to_none, write_csv
    result = nan_to_none(result)
    (out / "record.json").write_text(json.dumps(result, indent=1, default=str))
    write_csv(result, out / "runs.csv")
    table = format_table(result)
    (out / "table.md").write_text(table + "\n")
    for fn, name in plots:
        try:
            fn(result, out / name)
        except Exception as e:  # a missing plotting backend must not lose the record
            print(f"worm: could not draw {name}: {e}", file=sys.stderr)
    print(table)
    print(f"\nrecord: {out / 'record.json'}, {out / 'runs.csv'}; plots: "
          + ", ".join(str(out / n) for _, n in plots))


def _compare(a) -> int:
    from .experiments import compare, plot_distances
    if a.task:
        if a.task == "csv" and not a.csv:  # before any slow import or training
            raise SystemExit("worm compare --task csv needs --csv PATH (columns text,label)")
        from .experiments_text import plot_losses, run_text_compare
        kw = dict(task=a.task, seeds=tuple(a.seeds), progress=not a.quiet,
                  window=a.window or TEXT_DEFAULTS["window"],
                  stop=a.stop if a.stop is not None else TEXT_DEFAULTS["stop"],
                  delta=a.delta if a.delta is not None else TEXT_DEFAULTS["delta"],
                  r=a.r, prune_ratio=a.prune_ratio)
        for key, val in (("n_train", a.n_train), ("n_test", a.n_test), ("max_epochs", a.max_epochs),
                         ("batch_size", a.batch_size), ("lr", a.lr),
                         ("retrain_epochs", a.retrain_epochs), ("csv", a.csv)):
            if val is not None:
                kw[key] = val
        if a.every is not None:
            kw["every"] = a.every or None  # 0: per epoch
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        result = run_text_compare(**kw)
        result.setdefault("kind", "compare")
        out = _out_dir(a, "compare", a.task)
        _write(result, out, [(plot_losses, "loss.png"), (plot_distances, "distances.png")])
        return 0
    cfg = _cnn_config(a)
    print(f"worm compare: {cfg.model} (width {cfg.width}) on {cfg.dataset}"
          f"{f', {cfg.train_subset} train images' if cfg.train_subset else ''}, seeds {list(cfg.seeds)}, "
          f"s={cfg.stop} delta={cfg.delta} window={cfg.window} p={cfg.prune_ratio} r={cfg.r}")
    result = compare(cfg)
    out = _out_dir(a, "compare", f"{cfg.dataset}-{cfg.model}")
    _write(result, out, [(plot_distances, "distances.png")])
    return 0


def _sweep(a) -> int:
    from .experiments import plot_distances, sweep_r
    cfg = _cnn_config(a)
    result = sweep_r(cfg, tuple(a.rs))
    out = _out_dir(a, "sweep-r", f"{cfg.dataset}-{cfg.model}")
    _write(result, out, [(plot_distances, "distances.png")])
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "backend":
        import torch
        from . import backend, backend_info
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            try:
                print(f"{dev}: {backend(dev)}")
            except (ValueError, RuntimeError) as e:  # WORM_BACKEND names one that cannot run
                print(f"{dev}: none ({e})")
            for name, why in backend_info(dev).items():
                print(f"  {name:10s} {why}")
        return 0
    if a.cmd == "compare":
        return _compare(a)
    return _sweep(a)


if __name__ == "__main__":
    sys.exit(main())
