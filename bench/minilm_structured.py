"""Issue 19's study: heads + FFN tickets on the real MiniLM fine-tuned on Rotten Tomatoes.

Per seed, from one initialisation (pretrained all-MiniLM-L6-v2, a seeded fresh head):

* ``dense / EB``: one AdamW fine-tuning run that never truncates carries two EB searches
  (EB does not touch training, so they share it): the structured one at EarlyBERT's
  ratios (1/3 of the heads and 40% of the FFN neurons per layer, scope "layer") and the
  paper's unstructured Q/K one (p = 0.5). The dense model's accuracy is recorded at every
  epoch; each search snapshots the model when its ticket is found.
* ``WORM heads+FFN``: the same search with truncation (s=0.01, delta=0.005, r=3e-3).
* ``WORM Q/K`` (``--worm-qk``): the paper's WORM on the unstructured Q/K set.

Each ticket: accuracy when found, right after pruning (structured: worm.prune_channels,
a smaller BertForSequenceClassification; Q/K: worm.apply_masks), and after one retraining
epoch (fresh AdamW; Q/K with its masks held). Latency and MACs, dense vs pruned, by
worm.prune_report at batch 1 and 32, sequence 128.

    PYTHONPATH=python nice -n 5 python3 bench/minilm_structured.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

import worm
from worm.paper import text as _text
from worm.paper.experiments_text import _Encoded, _Loop, evaluate

STRUCT = dict(layers=("heads", "ffn"), prune_ratio={"heads": 1 / 3, "ffn": 0.4}, scope="layer")
QK = dict(layers="qk", prune_ratio=0.5)
RULE = dict(window=3, stop=0.01, delta=0.005, r=3e-3)


def retrain_one(model, train, cfg, seed, epoch, masks=None) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    handle = worm.apply_masks(model, masks, opt) if masks is not None else None
    t0 = time.perf_counter()
    _Loop(model, opt, train, cfg["batch_size"], seed).epoch(epoch)
    if handle is not None:
        assert all(bool((p.detach()[~m] == 0).all()) for p, m in handle.masks.items())
        handle.remove()
    return time.perf_counter() - t0


def finish(kind, snap_state, ticket, found_epoch, base, train, test, cfg, seed) -> dict:
    model = copy.deepcopy(base)
    model.load_state_dict(snap_state)
    pre = evaluate(model, test)
    if kind == "struct":
        small = worm.prune_channels(model, ticket)
        pruned = evaluate(small, test)
        rs = retrain_one(small, train, cfg, seed, found_epoch)
        after = evaluate(small, test)
        params = sum(p.numel() for p in small.parameters())
    else:
        worm.apply_masks(model, ticket)
        pruned = evaluate(model, test)
        worm.remove_masks(model)
        rs = retrain_one(model, train, cfg, seed, found_epoch, masks=ticket)
        after = evaluate(model, test)
        params = sum(p.numel() for p in model.parameters())
    return {"pre_prune_acc": pre, "pruned_acc": pruned, "retrain1_acc": after,
            "retrain_s": rs, "params": params}


def search_run(mode_sets, base, init, train, test, cfg, seed):
    """Train from ``init`` with the searches ``{key: kwargs}``; snapshot each at its ticket."""
    model = copy.deepcopy(base)
    model.load_state_dict(init)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    searches = {k: worm.EarlyBird(model, opt, **kw, **RULE) for k, kw in mode_sets.items()}
    loop = _Loop(model, opt, train, cfg["batch_size"], seed)
    out, dense_acc, t0 = {}, [], time.perf_counter()
    epoch = 0
    while epoch < cfg["max_epochs"] and len(out) < len(searches):
        loop.epoch(epoch)
        epoch += 1
        acc = evaluate(model, test)
        dense_acc.append(acc)
        for k, s in searches.items():
            if k in out:
                continue
            rec = s.step()
            if rec.found or epoch == cfg["max_epochs"]:
                out[k] = {"found": rec.found, "search_epochs": epoch, "ticket": s.mask,
                          "state": copy.deepcopy(model.state_dict()),
                          "search_s": time.perf_counter() - t0,
                          "history": [(h.d_max, h.d_avg, h.truncating) for h in s.history]}
                s.close()
    for s in searches.values():
        s.close()
    return out, dense_acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--max-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worm-qk", action="store_true")
    ap.add_argument("--out", default="bench/results/minilm-structured")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dict(lr=a.lr, batch_size=a.batch_size, max_epochs=a.max_epochs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "record.json"
    record = json.loads(rec_path.read_text()) if rec_path.exists() else {"runs": []}
    record["config"] = {"n_train": a.n_train, "n_test": a.n_test, "max_epochs": a.max_epochs,
                        "lr": a.lr, "optimizer": "AdamW", "batch_size": a.batch_size,
                        "max_len": a.max_len, "struct": {"layers": "heads+ffn", "ratios": "1/3 heads, "
                                                         "0.4 ffn per layer"},
                        "qk": QK, "rule": RULE, "threads": a.threads,
                        "device": f"{os.cpu_count()}-core CPU ({platform.machine()}), load average "
                                  f"{os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}",
                        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    train_set, test_set = _text.rotten_tomatoes(a.n_train, a.n_test, seed=0)
    for seed in a.seeds:
        torch.manual_seed(seed)
        base, tok = _text.load_minilm(2)
        init = copy.deepcopy(base.state_dict())
        train, test = _Encoded(train_set, tok, a.max_len), _Encoded(test_set, tok, a.max_len)
        runs = {}
        eb, dense_acc = search_run({"eb-struct": dict(mode="eb", **STRUCT),
                                    "eb-qk": dict(mode="eb", **QK)}, base, init, train, test, cfg, seed)
        runs.update(eb)
        sets = {"worm-struct": dict(mode="worm", **STRUCT)}
        if a.worm_qk:
            sets["worm-qk"] = dict(mode="worm", **QK)
        for k, kw in sets.items():
            runs.update(search_run({k: kw}, base, init, train, test, cfg, seed)[0])
        for k, r in runs.items():
            res = finish("struct" if k.endswith("struct") else "qk", r["state"], r["ticket"],
                         r["search_epochs"], base, train, test, cfg, seed)
            e = r["search_epochs"]
            res.update(seed=seed, method=k, found=r["found"], search_epochs=e, search_s=r["search_s"],
                       history=r["history"],
                       dense_acc_same_epochs=dense_acc[e - 1] if e - 1 < len(dense_acc) else None,
                       dense_acc_plus1=dense_acc[e] if e < len(dense_acc) else None)
            record["runs"].append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "history"}), flush=True)
        record["runs"].append({"seed": seed, "method": "dense", "dense_acc_per_epoch": dense_acc})
        if "latency" not in record:  # shapes are the same for every seed: measure once
            t = runs["eb-struct"]["ticket"]
            small = worm.prune_channels(base, t)
            ids = torch.randint(1000, 2000, (1, 128))
            rep = worm.prune_report(base, small, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                    batch_sizes=(1, 32), reps=3, min_time=0.0, threads=a.threads)
            record["latency"] = {k: v for k, v in rep.items() if k != "text"}
            record["latency"]["text"] = rep["text"]
            print(rep["text"], flush=True)
        rec_path.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
