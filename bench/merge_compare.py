"""Merge per-seed `worm compare` folders into one record under bench/results/.

    python3 bench/merge_compare.py OUT_DIR SEED_DIR [SEED_DIR ...] [--times FILE] [--note TEXT]

Each SEED_DIR holds a record.json of one `worm compare --seeds N` run (one process
per seed, so a run stopped half-way still leaves whole seeds). Writes OUT_DIR/
record.json (all runs, the first config, the machine and versions), table.md (the
compare table over the seeds found, plus per-seed times when --times names the
/usr/bin/time log) and distances.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from worm.paper.report import format_table, plot_distances  # noqa: E402


def _machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"device": f"CPU {cpu}, {os.cpu_count()} cores (shared with other jobs)",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


SHORT = [("search_epochs", "search epochs", "num"), ("truncation_epoch", "truncation on at", "num"),
         ("pre_prune_acc", "pre-prune", "pct"), ("pruned_acc", "after pruning", "pct"),
         ("pruned_recal_acc", "+ BN recal", "pct"), ("retrain1_acc", "1 retrain epoch", "pct"),
         ("final_acc", "all retraining", "pct"), ("params_kept", "params kept", "pct"),
         ("flops_kept", "MACs kept", "pct"), ("epoch_time_vs_plain", "epoch time / plain", "num")]


def short_table(result: dict) -> str:
    """The columns the README's "Results" quotes, mean ± sd over seeds (one decimal)."""
    from worm.paper.report import _value
    import statistics
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    lines = ["| method | seeds | " + " | ".join(h for _, h, _ in SHORT) + " |",
             "|" + "---|" * (len(SHORT) + 2)]
    for m in methods:
        runs = [r for r in result["runs"] if r["method"] == m]
        cells = []
        for key, _, kind in SHORT:
            vals = [v for v in (_value(r, key) for r in runs) if v is not None]
            if not vals:
                cells.append("")
                continue
            k = 100 if kind == "pct" else 1
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{k * statistics.fmean(vals):.1f} ± {k * sd:.1f}" if kind == "pct"
                         else f"{statistics.fmean(vals):.2f} ± {sd:.2f}")
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("seed_dirs", nargs="+")
    ap.add_argument("--times", default=None, help="/usr/bin/time log, one line per seed")
    ap.add_argument("--note", default="", help="a sentence put under the table")
    a = ap.parse_args(argv)
    runs, config, warnings, seeds = [], None, [], []
    for d in a.seed_dirs:
        p = Path(d) / "record.json"
        if not p.is_file():
            print(f"merge: {d} has no record.json (seed not finished); left out", file=sys.stderr)
            continue
        rec = json.loads(p.read_text())
        config = config or rec["config"]
        seeds += rec["config"]["seeds"]
        runs += rec["runs"]
        warnings += [w for w in rec.get("warnings", []) if w not in warnings]
    if not runs:
        print("merge: no finished seed", file=sys.stderr)
        return 1
    config = dict(config, seeds=seeds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"kind": "compare", "config": config, "runs": runs, "warnings": warnings,
              "machine": _machine()}
    times = Path(a.times).read_text().strip() if a.times else ""
    result["times"] = times.splitlines()
    (out / "record.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    text = (f"# worm compare: {config['model']} (width {config['width']}) on {config['dataset']}, "
            f"seeds {seeds}\n\n{m['device']}; torch {m['torch']}, Python {m['python']}; {m['date']}.\n"
            f"Config: {json.dumps({k: v for k, v in config.items() if k not in ('extra', 'progress')})}\n\n"
            + short_table(result) + "\n\nAll columns:\n\n" + format_table(result) + "\n")
    if warnings:
        text += "\nWarnings:\n" + "".join(f"- {w}\n" for w in warnings)
    if times:
        text += "\nPer seed (one process each, 1 thread, `nice -n 5`):\n" + "".join(
            f"- {t}\n" for t in times.splitlines())
    if a.note:
        text += f"\n{a.note}\n"
    (out / "table.md").write_text(text)
    try:
        plot_distances(result, out / "distances.png")
    except Exception as e:  # the record matters more than the plot
        print(f"merge: no plot ({e})", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
