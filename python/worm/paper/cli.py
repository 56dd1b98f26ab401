"""``worm``: the paper's experiments from the command line.

    worm compare                 EB Train vs WORM (Tables 2/3 and 4-6, Figures 1/2)
    worm sweep-r                 truncation from the start for several r (Table 1)
    worm backend                 which kernel backend runs, and why not the others
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

TEXT_TASKS = ("minilm-rt", "csv")
# The CSV's test split: this share of its rows, held out (--test-share).
CSV_TEST_SHARE = 0.2
# Examples per split for the text study unless --n-train/--n-test say otherwise.
TEXT_N = 256


class _Parser(argparse.ArgumentParser):
    """Bad input ends in one line on stderr (exit 2), never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    """An argparse type: ``kind`` (int/float), finite, within [lo, hi] (open ends as told)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            left = "any" if lo is None else f"{'(' if lo_open else '['}{lo}"
            right = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
            rng = f"{left}, {right or 'inf)'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {rng}{f' ({what})' if what else ''}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _or_auto(parse):
    """An argparse type: the word ``auto`` (the threshold-free rule), else ``parse``."""
    def parse_auto(text):
        return "auto" if text == "auto" else parse(text)
    parse_auto.__name__ = parse.__name__
    return parse_auto


_POS_INT = _number(int, 1)
_NONNEG_INT = _number(int, 0)
_POS_FLOAT = _number(float, 0, lo_open=True)
_NONNEG_FLOAT = _number(float, 0)

# Paper defaults: CNN s 0.1, delta 0.05, window 5; BERT s 0.01, delta 0.005, window 3.
CNN_DEFAULTS = {"stop": 0.1, "delta": 0.05, "window": 5, "l1": 1e-4}
CNN_RUN_DEFAULTS = {"max_epochs": 30, "retrain_epochs": 5, "lr": 0.01}
# `worm compare` with neither --dataset nor --model: the smallest task found where the
# search runs on after the window fills (distances fall, WORM truncates, its ticket
# comes earlier) and 3 seeds with the controls finish in minutes on a 2-core CPU
# (README, "Results"). Any of these flags given replaces its value only.
DEFAULT_TASK = {"dataset": "fashion-mnist", "model": "vgg11_bn", "width": 0.25, "train_subset": 1000,
                "test_subset": 1000, "batch_size": 64, "max_epochs": 15, "retrain_epochs": 5}
PROTOCOLS = ("channels", "weights")
TEXT_DEFAULTS = {"stop": 0.01, "delta": 0.005, "window": 3}


def _add_common(p: argparse.ArgumentParser, text: bool) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=None,
                   help="digits | fashion-mnist | cifar10. With neither --dataset nor --model, the "
                        "default task: vgg11_bn at width 0.25 on 1000 Fashion-MNIST training and "
                        "1000 test images, batch 64, 15 search and 5 retraining epochs (digits with "
                        "the small cnn when Fashion-MNIST is not installed)")
    g.add_argument("--data-root", default=None, help="folder of the dataset (cifar10: torchvision layout)")
    g.add_argument("--model", default=None,
                   help="cnn | resnet18 | vgg11_bn (built in, 32x32), or a torchvision model name "
                        "built with random weights: mobilenet_v3_small, efficientnet_b0, "
                        "regnet_x_400mf, densenet121; torchvision.NAME picks torchvision even for "
                        "resnet18 (default: cnn, or the default task's; see --dataset)")
    g.add_argument("--width", type=_POS_FLOAT, default=None,
                   help="channel width multiplier (default 2.0 for cnn, 1.0 otherwise)")
    g.add_argument("--train-subset", type=_POS_INT, default=None, help="use N training images (seeded, stratified)")
    g.add_argument("--test-subset", type=_POS_INT, default=None, help="use N test images")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=_NONNEG_INT, nargs="+", default=[0, 1, 2])
    g.add_argument("--max-epochs", type=_POS_INT, default=None,
                   help=f"search epochs at most (CNN default {CNN_RUN_DEFAULTS['max_epochs']})")
    g.add_argument("--retrain-epochs", type=_NONNEG_INT, default=None,
                   help=f"retraining epochs after pruning, the same for every variant (CNN default "
                        f"{CNN_RUN_DEFAULTS['retrain_epochs']})")
    g.add_argument("--batch-size", type=_POS_INT, default=None)
    g.add_argument("--lr", type=_POS_FLOAT, default=None,
                   help=f"CNN: SGD lr, static (default {CNN_RUN_DEFAULTS['lr']})")
    g.add_argument("--momentum", type=_NONNEG_FLOAT, default=0.9)
    g.add_argument("--threads", type=_POS_INT, default=None, help="torch CPU threads")
    g = p.add_argument_group("search (paper defaults)")
    g.add_argument("--prune-ratio", type=_number(float, 0, 1, hi_open=True), default=0.5)
    g.add_argument("--window", type=_number(int, 2, what="distances need an older mask"), default=None,
                   help="5 for CNNs, 3 for text")
    g.add_argument("--stop", type=_or_auto(_number(float, 0, 1, lo_open=True, hi_open=False)), default=None,
                   help="s: 0.1 for CNNs, 0.01 for text; auto: no threshold (docs/method.md)")
    g.add_argument("--delta", type=_or_auto(_NONNEG_FLOAT), default=None,
                   help="0.05 for CNNs, 0.005 for text; auto: truncate at d_avg's elbow "
                        "(the default with --stop auto)")
    g.add_argument("--r", type=_number(float, 0, 1, what="truncation factor"), default=3e-3,
                   help="truncation factor r in [0, 1] (default 3e-3)")
    g.add_argument("--l1", type=_NONNEG_FLOAT, default=None,
                   help="CNN: network-slimming penalty on the BN gammas, both arms (default 1e-4, "
                        "Early-Bird's recipe; 0 = off)")
    g.add_argument("--floor", type=_number(float, 0, 1, hi_open=True, what="largest share of a layer's "
                                           "channels that may go"), default=None,
                   help="CNN: per-layer floor when pruning the global ticket: no layer loses more "
                        "than this share of its channels (Torch-Pruning's max_pruning_ratio; "
                        "default off, as Early-Bird). The remedy when a run warns that the global "
                        "ranking left a layer with its last channel")
    g = p.add_argument_group("pruning (CNN)")
    g.add_argument("--prune", choices=PROTOCOLS, default="channels",
                   help="channels: Early-Bird's protocol, the BN ticket's channels removed "
                        "(a smaller model; default); weights: the paper authors' code, global "
                        "unstructured magnitude pruning of conv and linear weights at "
                        "--prune-ratio after the search, masks kept through retraining")
    g.add_argument("--recal-batches", type=_NONNEG_INT, default=None,
                   help="training batches for worm.recalibrate_bn after pruning; retraining "
                        "starts from the recalibrated model (default 20; 0: off)")
    if not text:
        return _add_tail(p)
    g.add_argument("--no-controls", action="store_true",
                   help="leave out the controls (dense, random ticket, uniform ticket), all "
                        "built from EB Train's searched weights and retrained the same budget")
    g = p.add_argument_group("text (the paper's BERT study)")
    g.add_argument("--task", default=None, choices=TEXT_TASKS,
                   help="minilm-rt: all-MiniLM-L6-v2 on Rotten Tomatoes; csv: your --csv file")
    g.add_argument("--csv", default=None, help="CSV with a text and a label column (with --task csv)")
    g.add_argument("--text-col", default="text", help="--task csv: the text column (default text)")
    g.add_argument("--label-col", default="label", help="--task csv: the label column (default label)")
    g.add_argument("--test-share", type=_number(float, 0, 1, lo_open=True, hi_open=True), default=None,
                   help=f"--task csv: share of the rows held out as the test split (default {CSV_TEST_SHARE})")
    g.add_argument("--n-train", type=_POS_INT, default=None,
                   help=f"training examples (default {TEXT_N}; a CSV: at most its training split)")
    g.add_argument("--n-test", type=_POS_INT, default=None,
                   help=f"test examples (default {TEXT_N}; a CSV: at most its test split, see --test-share)")
    g.add_argument("--every", type=_NONNEG_INT, default=None,
                   help="text: sample every N optimizer steps; 0 = at each epoch end (the paper)")
    _add_tail(p)


def _add_tail(p) -> None:
    p.add_argument("--out", default=None, help="output folder (default worm-runs/<kind>-<data>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    ap = _Parser(prog="worm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"worm {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compare", help="EB Train vs WORM from the same initialisation, several seeds")
    _add_common(p, text=True)
    p = sub.add_parser("sweep-r", help="truncation from the first epoch for several r (Table 1)")
    _add_common(p, text=False)
    p.add_argument("--rs", type=_number(float, 0, 1, what="truncation factor"), nargs="+",
                   default=[1.0, 0.5, 0.1, 0.05, 0.01], metavar="R",
                   help="truncation factors r in [0, 1], one run each, truncating from the first "
                        "sampling step (default 1 0.5 0.1 0.05 0.01; r = 1 is plain training)")
    sub.add_parser("backend", help="which kernel backend runs on this machine")
    ap.commands = sub.choices  # name -> subparser, for errors found after parsing
    return ap


def _stop_delta(ap, a, defaults) -> tuple:
    """(stop, delta): the flags, else the defaults; --stop auto takes delta auto too."""
    stop = _given(a.stop, defaults["stop"])
    if stop == "auto" and a.delta not in (None, "auto"):
        ap.error(f"--delta {a.delta} is a margin over s, and --stop auto has no s: "
                 "use --delta auto or leave it out")
    return stop, _given(a.delta, "auto" if stop == "auto" else defaults["delta"])


def _given(value, default):
    """The flag's value when given (0 included: never ``value or default``)."""
    return default if value is None else value


def _check_text_flags(ap, a) -> None:
    """Text-task flag combinations, refused before any slow import or training."""
    csv_only = [f for f, v in (("--csv", a.csv), ("--test-share", a.test_share)) if v is not None]
    csv_only += [f for f, v, d in (("--text-col", a.text_col, "text"), ("--label-col", a.label_col, "label"))
                 if v != d]
    if a.task != "csv" and csv_only:
        ap.error(f"{', '.join(csv_only)} {'go' if len(csv_only) > 1 else 'goes'} only with --task csv")
    if a.task == "csv" and not a.csv:
        ap.error("--task csv needs --csv PATH (a CSV with a text and a label column)")
    cnn_only = [f for f, given in (("--l1", a.l1 is not None), ("--floor", a.floor is not None),
                                   ("--prune", a.prune != "channels"),
                                   ("--recal-batches", a.recal_batches is not None)) if given]
    if a.task is not None and cnn_only:
        ap.error(f"{', '.join(cnn_only)} {'apply' if len(cnn_only) > 1 else 'applies'} to CNN runs, "
                 "not --task")
    if a.task is None:
        text_only = [f for f, v in (("--n-train", a.n_train), ("--n-test", a.n_test), ("--every", a.every))
                     if v is not None]
        if text_only:
            ap.error(f"{', '.join(text_only)} {'go' if len(text_only) > 1 else 'goes'} only with "
                     "--task (the text study)")


def _csv_sizes(ap, a) -> tuple:
    """(n_train, n_test) for --task csv: the defaults shrunk to the CSV's splits, and the
    flags checked against them, so a small CSV runs and a too-big ask is one line."""
    from .text import load_csv
    share = a.test_share if a.test_share is not None else CSV_TEST_SHARE
    try:
        train, test = load_csv(a.csv, a.text_col, a.label_col, test_share=share)
    except (OSError, ValueError) as e:
        ap.error(f"--csv {a.csv}: {e}")
    sizes = []
    for flag, n, pool, what in (("--n-train", a.n_train, len(train), "training"),
                                ("--n-test", a.n_test, len(test), "test")):
        if n is not None and n > pool:
            ap.error(f"{flag} {n} does not fit: the CSV's {what} split holds {pool} rows "
                     f"(--test-share {share} of {len(train) + len(test)} rows)")
        sizes.append(n if n is not None else min(TEXT_N, pool))
    if min(sizes) == 0:
        ap.error(f"--csv {a.csv}: the {'training' if sizes[0] == 0 else 'test'} split is empty "
                 f"(--test-share {share} of {len(train) + len(test)} rows); change --test-share")
    return tuple(sizes)


def _check_cnn_flags(ap, a) -> None:
    """--dataset/--model name what exists (one usage line, before any training); the
    CNN-only flags are refused with --task. Fills in the defaults (digits, cnn)."""
    cnn_only = [f for f, v in (("--dataset", a.dataset), ("--model", a.model)) if v is not None]
    if getattr(a, "task", None) is not None:
        if cnn_only:
            ap.error(f"{', '.join(cnn_only)} {'apply' if len(cnn_only) > 1 else 'applies'} to CNN "
                     "runs, not --task (the text study uses MiniLM)")
        return
    from .data import DATASETS, DatasetNotFound, check_available
    if a.dataset is None and a.model is None:
        try:
            check_available(DEFAULT_TASK["dataset"], a.data_root)
            for key, value in DEFAULT_TASK.items():
                if getattr(a, key, None) is None:
                    setattr(a, key, value)
        except DatasetNotFound:
            print("worm: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist), so "
                  "the default task cannot run; running the small CNN on digits instead", file=sys.stderr)
    a.dataset = a.dataset or "digits"
    a.model = a.model or "cnn"
    if a.dataset not in DATASETS:
        ap.error(f"--dataset {a.dataset}: unknown; choose one of {', '.join(DATASETS)}")
    try:
        check_available(a.dataset, a.data_root)
    except DatasetNotFound as e:
        msg = str(e).replace("pass root=ROOT", "pass --data-root ROOT").replace(
            "point root= /", "point --data-root /")
        ap.error(f"--dataset {a.dataset}: {msg}")
    from .models import MODELS
    if a.model not in MODELS:
        name = a.model.split(".", 1)[1] if a.model.startswith("torchvision.") else a.model
        try:
            import torchvision
        except ImportError:
            ap.error(f"--model {a.model}: not built in ({', '.join(MODELS)}) and torchvision is "
                     "not installed (pip install 'worm[cnn]')")
        if name not in set(torchvision.models.list_models(module=torchvision.models)):
            ap.error(f"--model {a.model}: unknown; choose one of {', '.join(MODELS)} or a "
                     "torchvision classification model (e.g. mobilenet_v3_small, efficientnet_b0)")


def _cnn_config(a):
    from .experiments import CNNConfig, default_width
    d = CNNConfig()
    return CNNConfig(
        dataset=a.dataset or "digits", model=a.model or "cnn",
        width=a.width if a.width is not None else default_width(a.model or "cnn"), train_subset=a.train_subset,
        test_subset=a.test_subset, data_root=a.data_root, seeds=tuple(a.seeds),
        max_epochs=_given(a.max_epochs, CNN_RUN_DEFAULTS["max_epochs"]),
        retrain_epochs=_given(a.retrain_epochs, CNN_RUN_DEFAULTS["retrain_epochs"]),
        batch_size=_given(a.batch_size, d.batch_size), lr=_given(a.lr, CNN_RUN_DEFAULTS["lr"]),
        momentum=a.momentum, prune=getattr(a, "prune", "channels"),
        controls=not getattr(a, "no_controls", False),
        recal_batches=_given(getattr(a, "recal_batches", None), d.recal_batches),
        prune_ratio=a.prune_ratio,
        window=_given(a.window, CNN_DEFAULTS["window"]),
        stop=_given(a.stop, CNN_DEFAULTS["stop"]),
        delta=_given(a.delta, "auto" if a.stop == "auto" else CNN_DEFAULTS["delta"]),
        r=a.r, threads=a.threads, progress=not a.quiet,
        l1=a.l1 if a.l1 is not None else CNN_DEFAULTS["l1"], max_pruning_ratio=a.floor)


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
    for w in result.get("warnings") or []:
        print(f"worm: warning: {w}", file=sys.stderr)
    print(f"\nrecord: {out / 'record.json'}, {out / 'runs.csv'}; plots: "
          + ", ".join(str(out / n) for _, n in plots))


def _compare(a, ap) -> int:
    _check_text_flags(ap, a)
    _check_cnn_flags(ap, a)
    from .experiments import compare, plot_distances
    if a.task:
        n_train, n_test = _csv_sizes(ap, a) if a.task == "csv" else (a.n_train, a.n_test)
        from .experiments_text import plot_losses, run_text_compare
        kw = dict(task=a.task, seeds=tuple(a.seeds), progress=not a.quiet,
                  window=_given(a.window, TEXT_DEFAULTS["window"]),
                  **dict(zip(("stop", "delta"), _stop_delta(ap, a, TEXT_DEFAULTS))),
                  r=a.r, prune_ratio=a.prune_ratio)
        for key, val in (("n_train", n_train), ("n_test", n_test), ("max_epochs", a.max_epochs),
                         ("batch_size", a.batch_size), ("lr", a.lr),
                         ("retrain_epochs", a.retrain_epochs), ("csv", a.csv)):
            if val is not None:
                kw[key] = val
        if a.task == "csv":
            kw.update(text_col=a.text_col, label_col=a.label_col,
                      test_share=_given(a.test_share, CSV_TEST_SHARE))
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
    _stop_delta(ap, a, CNN_DEFAULTS)
    cfg = _cnn_config(a)
    print(f"worm compare: {cfg.model} (width {cfg.width}) on {cfg.dataset}"
          f"{f', {cfg.train_subset} train images' if cfg.train_subset else ''}, seeds {list(cfg.seeds)}, "
          f"s={cfg.stop} delta={cfg.delta} window={cfg.window} p={cfg.prune_ratio} r={cfg.r} "
          f"l1={cfg.l1} floor={cfg.max_pruning_ratio} prune={cfg.prune}"
          f"{'' if cfg.controls else ' (no controls)'}")
    result = _run_cnn(ap, cfg, compare)
    out = _out_dir(a, "compare", f"{cfg.dataset}-{cfg.model}")
    _write(result, out, [(plot_distances, "distances.png")])
    return 0


def _run_cnn(ap, cfg, fn):
    """``fn(cfg)``; a dataset that vanished after the check is still a usage error
    (data are loaded first, so nothing has run yet)."""
    from .data import DatasetNotFound
    try:
        return fn(cfg)
    except DatasetNotFound as e:
        ap.error(f"--dataset {cfg.dataset}: {e}")


def _sweep(a, ap) -> int:
    _check_cnn_flags(ap, a)
    from .experiments import plot_distances, sweep_r
    _stop_delta(ap, a, CNN_DEFAULTS)
    cfg = _cnn_config(a)
    result = _run_cnn(ap, cfg, lambda c: sweep_r(c, tuple(a.rs)))
    out = _out_dir(a, "sweep-r", f"{cfg.dataset}-{cfg.model}")
    _write(result, out, [(plot_distances, "distances.png")])
    return 0


def main(argv=None) -> int:
    ap = _parser()
    a, extra = ap.parse_known_args(argv)
    if extra:  # name the subcommand whose flags these are not, as its own errors do
        (ap.commands[a.cmd] if a.cmd in ap.commands else ap).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd == "backend":
        import torch
        from .. import backend, backend_info
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            try:
                print(f"{dev}: {backend(dev)}")
            except (ValueError, RuntimeError) as e:  # WORM_BACKEND names one that cannot run
                print(f"{dev}: none ({e})")
            for name, why in backend_info(dev).items():
                print(f"  {name:10s} {why}")
        return 0
    if a.cmd == "compare":
        return _compare(a, ap.commands["compare"])
    return _sweep(a, ap.commands["sweep-r"])


if __name__ == "__main__":
    sys.exit(main())
