"""When does ``stop="auto"`` / ``delta="auto"`` fire, against the paper's fixed s and delta?

    python3 bench/auto_stop.py synthetic --out bench/results/auto-stop
    python3 bench/auto_stop.py cnn --dataset digits --model cnn --seeds 0 1 2 \
        --max-epochs 30 --retrain-epochs 3 --out bench/results/auto-stop

``synthetic``: mask histories made by hand through :class:`worm.EarlyBird` on a plain
tensor (random masks, frozen masks, a random walk, convergence, convergence then a
random walk): the step each rule fires at, or never.

``cnn``: per seed, three search trajectories from one initialisation on the CLI's CNN
task: EB Train, WORM with the paper's trigger (d_avg < 0.15) and WORM with
``delta="auto"``. Each runs until every stop rule that reads it has fired (or the
budget ends); a trajectory does not depend on its stop rule before it stops, so both
stop rules are replayed on the same trajectory through :func:`worm.decision.decide`,
and the model and mask are kept at the step each one fires. Each ticket is then
pruned (worm.prune_channels) and retrained like ``worm compare`` does.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import worm  # noqa: E402
from worm.decision import Trace, decide  # noqa: E402

FIXED_CNN = (0.1, 0.05)
# A stop no sampled distance can pass but 0 (every non-zero distance is >= 1/N),
# so a trajectory runs on; with the written delta, s + delta is exactly 0.15.
NEVER = 1e-12
FIXED_TRIGGER_DELTA = 0.149999999999


# ------------------------------------------------------------------ synthetic
def _scores(kind: str, n: int, steps: int, g: torch.Generator):
    """Score vectors (|w| ranks the mask) for one synthetic history."""
    base = torch.rand(n, generator=g) + 0.5
    if kind == "random masks":          # a fresh random mask every step
        for _ in range(steps):
            yield torch.rand(n, generator=g)
    elif kind == "frozen masks":        # the same mask every step
        for _ in range(steps):
            yield base.clone()
    elif kind.startswith("random walk"):   # `swaps` kept and pruned entries trade places each step
        swaps = int(kind.split("(")[1].split()[0])
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: n - n // 2]] = True
        for _ in range(steps):
            kept, pruned = keep.nonzero().flatten(), (~keep).nonzero().flatten()
            keep[kept[torch.randperm(len(kept), generator=g)[:swaps]]] = False
            keep[pruned[torch.randperm(len(pruned), generator=g)[:swaps]]] = True
            yield keep.float() + 0.5 * torch.rand(n, generator=g)
    elif kind == "convergence":         # noise around a fixed mask, shrinking 20% a step
        for t in range(steps):
            yield base + 2.0 * 0.8 ** t * torch.randn(n, generator=g)
    elif kind == "settled + jitter":    # converges, then borderline entries keep flipping
        for t in range(steps):
            yield base + max(2.0 * 0.8 ** t, 0.01) * torch.randn(n, generator=g)
    elif kind == "converge, then random walk":
        x = base.clone()
        for t in range(steps):
            if t < 15:
                yield base + 2.0 * 0.8 ** t * torch.randn(n, generator=g)
                continue
            order = torch.argsort(x)  # one kept and one pruned entry trade places
            i = order[torch.randint(0, n // 2, (1,), generator=g)]
            j = order[n - n // 2 + torch.randint(0, n - n // 2, (1,), generator=g)]
            x[i], x[j] = x[j].clone(), x[i].clone()
            yield x.clone()
    else:
        raise ValueError(kind)


SYNTHETIC = ("random masks", "frozen masks", "random walk (1 swap/step)", "random walk (4 swaps/step)",
             "convergence", "settled + jitter", "converge, then random walk")


def synthetic_history(kind: str, n: int, steps: int, seed: int, window: int = 5, p: float = 0.5):
    """(distances per step, numel) of one synthetic history, through the real window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.zeros(n))
    s = worm.EarlyBird(None, None, mode="eb", layers=[x], prune_ratio=p, window=window, stop=NEVER)
    out = []
    for scores in _scores(kind, n, steps, g):
        x.data.copy_(scores)
        rec = s.step()
        out.append(rec.distances)
        if s.found:  # all masks of the window identical: the rest is the same
            break
    return out, s.numel


def first_fire(history, numel, *, stop, delta=None, window=5, p=0.5, mode="eb"):
    """(step the stop fires or None, step truncation switches on or None)."""
    trace, on = Trace(), False
    on_at = None
    for i, d in enumerate(history, start=1):
        trace = trace.push(d, numel)
        kw = dict(stop=stop, delta=delta if delta is not None else ("auto" if stop == "auto" else 0.05))
        found, on2 = decide(d, mode=mode, truncating=on, numel=numel, trace=trace, prune_ratio=p, **kw)
        if on2 and not on:
            on_at = i
        on = on2
        if found:
            return i, on_at
    return None, on_at


def run_synthetic(a) -> dict:
    rows = []
    for kind in SYNTHETIC:
        for n in a.sizes:
            for seed in a.seeds:
                hist, numel = synthetic_history(kind, n, a.steps, seed)
                full = [d for d in hist if d is not None]
                row = {"history": kind, "N": n, "seed": seed, "steps": len(hist),
                       "d_max_first": max(full[0]) if full else None,
                       "d_max_last": max(full[-1]) if full else None}
                row["fixed_stop"], _ = first_fire(hist, numel, stop=0.1)
                row["auto_stop"], _ = first_fire(hist, numel, stop="auto")
                _, row["fixed_trigger"] = first_fire(hist, numel, stop=0.1, delta=0.05, mode="worm")
                _, row["auto_trigger"] = first_fire(hist, numel, stop="auto", mode="worm")
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"kind": "synthetic", "steps": a.steps, "window": 5, "prune_ratio": 0.5, "rows": rows}


def synthetic_table(res: dict) -> str:
    out = [f"Synthetic histories, window 5, p 0.5, {res['steps']} sampling steps at most; "
           "step at which each rule fires (window full at step 5), per seed; '-' never.", "",
           "| history | N | d_max first -> last | fixed stop (s=0.1) | auto stop | fixed trigger (0.15) | auto trigger |",
           "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in res["rows"]:
        groups.setdefault((r["history"], r["N"]), []).append(r)
    fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
    for (kind, n), rs in groups.items():
        dm = ", ".join(f"{r['d_max_first']:.3f}->{r['d_max_last']:.3f}" for r in rs[:1])
        cells = [" ".join(fmt(r[k]) for r in rs) for k in ("fixed_stop", "auto_stop", "fixed_trigger", "auto_trigger")]
        out.append(f"| {kind} | {n} | {dm} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------ CNN
def run_cnn(a) -> dict:
    from worm.paper import experiments as ex
    from worm.paper import models as _models
    cfg = ex.CNNConfig(dataset=a.dataset, model=a.model, width=a.width, train_subset=a.train_subset,
                       test_subset=a.test_subset, seeds=tuple(a.seeds), max_epochs=a.max_epochs,
                       retrain_epochs=a.retrain_epochs, batch_size=a.batch_size, l1=a.l1,
                       threads=a.threads, progress=False, latency=False)
    train, test, info = ex._prepare(cfg)
    test_loader = ex._loader(test, 512)
    example = torch.zeros(1, info["in_channels"], 32, 32)
    runs = []
    for seed in cfg.seeds:
        init = ex._init_state(cfg, seed, info)
        trajectories = (("EB Train", "eb", 0.05), ("WORM (trigger 0.15)", "worm", FIXED_TRIGGER_DELTA),
                        ("WORM (trigger auto)", "worm", "auto"))
        for label, mode, delta in trajectories:
            torch.manual_seed(seed)
            model = _models.build(cfg.model, info["in_channels"], info["num_classes"], cfg.width)
            model.load_state_dict(init)
            opt = worm.WormSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
            search = worm.EarlyBird(model, opt, mode=mode, prune_ratio=cfg.prune_ratio, window=cfg.window,
                                    stop=NEVER, delta=delta, r=cfg.r, l1=cfg.l1)
            rules = {"fixed s=0.1": 0.1, "auto": "auto"}
            fired: dict = {}
            t0 = time.perf_counter()
            epoch = 0
            for epoch in range(1, cfg.max_epochs + 1):
                loader = ex._loader(train, cfg.batch_size, seed=seed * 1000 + epoch, shuffle=True)
                ex.train_epoch(model, opt, loader)
                search.step()
                hist = [h.distances for h in search.history]
                for name, stop in rules.items():
                    if name in fired:
                        continue
                    at, _ = first_fire(hist, search.numel, stop=stop, window=cfg.window, p=cfg.prune_ratio)
                    if at is not None:
                        names = {id(q): k for k, q in model.named_parameters()}
                        mask = {names[id(q)]: v.clone() for q, v in search.mask.items()}
                        fired[name] = (epoch, copy.deepcopy(model), mask)
                if len(fired) == len(rules) or search.found:
                    break
            traj_s = time.perf_counter() - t0
            on = next((h.index for h in search.history if h.truncating), None)
            search.close()
            for name in rules:
                found = name in fired
                if found:
                    ep, m, by_name = fired[name]
                    params = dict(m.named_parameters())
                    mask = {params[k]: v for k, v in by_name.items()}
                else:
                    ep, m, mask = epoch, model, search.mask
                pre = ex.evaluate(m, test_loader)
                small = worm.prune_channels(m, mask, example)
                pruned = ex.evaluate(small, test_loader)
                ropt = torch.optim.SGD(small.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                accs = []
                for e in range(1, cfg.retrain_epochs + 1):
                    loader = ex._loader(train, cfg.batch_size, seed=seed * 1000 + 500 + e, shuffle=True)
                    ex.train_epoch(small, ropt, loader)
                    accs.append(ex.evaluate(small, test_loader))
                row = {"seed": seed, "trajectory": label, "stop": name, "found": found,
                       "stop_epoch": ep if found else None, "truncation_epoch": on if (on is not None and on < ep) else None,
                       "pre_prune_acc": pre, "pruned_acc": pruned, "retrain_accs": accs,
                       "params_kept": ex.count_params(small) / ex.count_params(m),
                       "distances": [h.distances for h in search.history][:ep],
                       "trajectory_s": traj_s}
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "distances"}), flush=True)
    return {"kind": "cnn", "config": {k: v for k, v in ex._cfg_dict(cfg).items() if k != "extra"},
            "runs": runs}


def cnn_table(res: dict) -> str:
    c = res["config"]
    out = [f"{c['model']} (width {c['width']}) on {c['dataset']}"
           f"{', ' + str(c['train_subset']) + ' train images' if c['train_subset'] else ''}, batch "
           f"{c['batch_size']}, at most {c['max_epochs']} search epochs, {c['retrain_epochs']} retraining "
           f"epochs, l1 {c['l1']}, seeds {c['seeds']}. Mean ± sd over seeds; 'stop epoch' counts "
           "only searches that stopped.", "",
           "| trajectory | stop rule | stopped | stop epoch | truncation on (epoch) | pre-prune acc | "
           "right after pruning | after retraining | params kept |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(vals, pct=False):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        m = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.1f} ± {sd:.1f}"

    groups: dict = {}
    for r in res["runs"]:
        groups.setdefault((r["trajectory"], r["stop"]), []).append(r)
    for (traj, stop), rs in groups.items():
        out.append(f"| {traj} | {stop} | {sum(r['found'] for r in rs)}/{len(rs)} | "
                   f"{ms([r['stop_epoch'] for r in rs])} ({', '.join(str(r['stop_epoch'] or '-') for r in rs)}) | "
                   f"{', '.join(str(r['truncation_epoch'] or '-') for r in rs)} | "
                   f"{ms([r['pre_prune_acc'] for r in rs], True)} | {ms([r['pruned_acc'] for r in rs], True)} | "
                   f"{ms([r['retrain_accs'][-1] if r['retrain_accs'] else None for r in rs], True)} | "
                   f"{ms([r['params_kept'] for r in rs], True)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synthetic")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="bench/results/auto-stop")
    p = sub.add_parser("cnn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--l1", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/auto-stop")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": f"{platform.processor() or platform.machine()} CPU", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    if a.cmd == "synthetic":
        res = run_synthetic(a)
        table = synthetic_table(res)
        name = "synthetic"
    else:
        res = run_cnn(a)
        table = cnn_table(res)
        name = f"{a.dataset}-{a.model}"
    res["env"] = env
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
