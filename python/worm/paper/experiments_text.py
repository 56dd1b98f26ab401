"""The paper's BERT study (section 6, Tables 4-6, Figure 2), sized for a CPU.

EB Train and WORM fine-tune the same pretrained encoder (all-MiniLM-L6-v2 with a
fresh classification head) from the same initialisation per seed: the same head
weights, the same batch order, the same dropout draws until truncation makes the
runs differ. The representative set is every attention layer's query and key weight
(unstructured), with the paper's settings ``s=0.01, delta=0.005, p=0.5, l=3,
r=3e-3``. The paper does not name its BERT optimizer; we use AdamW (lr 1e-4 by
default: the usual fine-tuning range, at its high end because CPU runs are short),
so truncation runs as a step pre-hook that scales the pruned entries' gradients by
``r`` before AdamW's moments see them.

Sampling: per epoch as in the paper (``every=None``), or every ``every`` optimizer
steps, which a short CPU run needs (with a window of 3, per-epoch sampling cannot
find a ticket before epoch 3). Search epochs are then fractional.

After the search (ticket found, or ``max_epochs`` reached: recorded as not found and
pruned with the newest mask all the same) the unstructured ticket is applied with
:func:`worm.apply_masks`, and the model is retrained ``retrain_epochs`` epochs with
a fresh AdamW and the pruned weights held at zero. Accuracy is on the held-out test
split only.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional, Sequence

import torch

from ..search import EarlyBird
from ..ticket import apply_masks, remove_masks
from . import text as _text

__all__ = ["run_text_compare", "plot_losses", "PAPER_BERT"]

PAPER_BERT = dict(layers="qk", prune_ratio=0.5, window=3, stop=0.01, delta=0.005, r=3e-3)
METHODS = ("eb", "worm")


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, leave=False, **kw)


class _Encoded:
    """Token ids tokenised once; batches are padded to their own longest text."""

    def __init__(self, data, tokenizer, max_len: int):
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_len)
        self.ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        self.pad = tokenizer.pad_token_id or 0

    def __len__(self):
        return len(self.ids)

    def batch(self, idx) -> dict:
        seqs = [self.ids[i] for i in idx]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = s
            att[j, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": self.labels[list(idx)]}

    def batches(self, batch_size: int, order: Optional[torch.Tensor] = None):
        idx = order.tolist() if order is not None else list(range(len(self)))
        for i in range(0, len(idx), batch_size):
            yield self.batch(idx[i:i + batch_size])


@torch.no_grad()
def evaluate(model, data: _Encoded, batch_size: int = 64) -> float:
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    for b in data.batches(batch_size):
        labels = b.pop("labels")
        correct += (model(**b).logits.argmax(-1) == labels).sum()
    model.train(was)
    return correct.item() / len(data)


def _order(seed: int, epoch: int, n: int) -> torch.Tensor:
    # The batch order depends on the seed and the epoch only, so both methods see the
    # same batches; retraining epochs continue the same sequence.
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


class _Loop:
    """A plain training loop recording (step, loss) without a sync per step."""

    def __init__(self, model, optimizer, train: _Encoded, batch_size: int, seed: int):
        self.model, self.opt, self.train = model, optimizer, train
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = math.ceil(len(train) / batch_size)
        self.step = 0
        self._losses: list = []      # (step, 0-dim tensor), synced once per epoch
        self.losses: list = []

    def epoch(self, epoch: int, should_stop=lambda: False, progress=False, desc="") -> bool:
        """One epoch; True if ``should_stop()`` cut it short (checked after each step)."""
        self.model.train()
        it = self.train.batches(self.batch_size, _order(self.seed, epoch, len(self.train)))
        stopped = False
        for b in _progress(it, progress, total=self.steps_per_epoch, desc=desc):
            loss = self.model(**b).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self._losses.append((self.step, loss.detach()))
            if should_stop():
                stopped = True
                break
        self.flush()
        return stopped

    def flush(self) -> None:
        if self._losses:
            vals = torch.stack([v for _, v in self._losses]).tolist()
            self.losses.extend((s, float(v)) for (s, _), v in zip(self._losses, vals))
            self._losses = []


def _run_method(method: str, seed: int, init_state: dict, model, train: _Encoded, test: _Encoded,
                cfg: dict, progress: bool) -> dict:
    model.load_state_dict(init_state)
    remove_masks(model)
    torch.manual_seed(seed)  # dropout draws: identical for both methods
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    search = EarlyBird(model, opt, mode=method, every=cfg["every"],
                       **{k: cfg[k] for k in ("layers", "prune_ratio", "window", "stop", "delta", "r")})
    loop = _Loop(model, opt, train, cfg["batch_size"], seed)

    t0 = time.perf_counter()
    epoch = 0
    while epoch < cfg["max_epochs"] and not search.found:
        loop.epoch(epoch, lambda: search.found, progress, f"seed {seed} {method} epoch {epoch + 1}")
        epoch += 1
        if cfg["every"] is None:
            search.step()
    search_s = time.perf_counter() - t0
    if cfg["every"] is None:
        search_epochs = float(epoch)
    else:
        search_epochs = loop.step / loop.steps_per_epoch
    search.close()
    ticket = search.ticket if search.found else search.mask
    if ticket is None:
        raise ValueError(f"no mask was sampled in {loop.step} steps: every={cfg['every']} is larger "
                         "than the run; lower every or raise max_epochs")
    history = [{"index": h.index, "epoch": h.epoch, "step": h.step, "d_max": h.d_max,
                "d_avg": h.d_avg, "truncating": h.truncating, "found": h.found}
               for h in search.history]
    truncated_samples = sum(1 for h in search.history if h.truncating)

    pre_acc = evaluate(model, test)
    t1 = time.perf_counter()
    handle = apply_masks(model, ticket)
    prune_s = time.perf_counter() - t1
    pruned_acc = evaluate(model, test)

    retrain_opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    handle.remove()
    handle = apply_masks(model, ticket, retrain_opt)  # re-zero after each AdamW step too
    retrain = _Loop(model, retrain_opt, train, cfg["batch_size"], seed)
    retrain.step = loop.step
    accs, retrain_s = [], 0.0
    for k in range(cfg["retrain_epochs"]):
        t2 = time.perf_counter()
        retrain.epoch(epoch + k, progress=progress, desc=f"seed {seed} {method} retrain {k + 1}")
        retrain_s += time.perf_counter() - t2
        accs.append(evaluate(model, test))
    zero_ok = all(bool((p.detach()[~m] == 0).all()) for p, m in handle.masks.items())
    handle.remove()
    remove_masks(model)

    n_pruned = sum(int((~m).sum()) for m in ticket.values())
    return {
        "seed": seed, "method": method, "found": bool(search.found),
        "search_epochs": search_epochs, "search_steps": loop.step,
        "pre_prune_acc": pre_acc, "pruned_acc": pruned_acc,
        "retrain1_acc": accs[0] if accs else None,
        "gain": accs[0] - pre_acc if accs else None,
        "retrain_accs": accs,
        "time_s": search_s + prune_s + retrain_s, "search_s": search_s, "retrain_s": retrain_s,
        "samples": len(search.history), "truncated_samples": truncated_samples,
        "pruned_entries": n_pruned, "pruned_stay_zero": zero_ok,
        "loss": loop.losses, "retrain_loss": retrain.losses, "history": history,
    }


def _load_task(task: str, csv: Optional[str], n_train, n_test, split_seed: int,
               text_col: str, label_col: str, test_share: float = 0.2):
    if csv is not None:
        return _text.load_csv(csv, text_col, label_col, n_train=n_train, n_test=n_test, seed=split_seed,
                              test_share=test_share)
    if task in ("minilm-rt", "rt", "rotten_tomatoes"):
        return _text.rotten_tomatoes(n_train, n_test, seed=split_seed)
    raise ValueError(f"unknown text task {task!r}: use 'minilm-rt' or pass csv=PATH")


def run_text_compare(task: str = "minilm-rt", seeds: Sequence[int] = (0, 1, 2),
                     n_train: int = 256, n_test: int = 256, max_epochs: int = 2,
                     batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 0.0,
                     every: Optional[int] = 4, retrain_epochs: int = 1, csv: Optional[str] = None,
                     text_col: str = "text", label_col: str = "label", max_len: int = 48,
                     split_seed: int = 0, methods: Sequence[str] = METHODS,
                     progress: bool = True, threads: Optional[int] = None,
                     prune_ratio: float = PAPER_BERT["prune_ratio"], window: int = PAPER_BERT["window"],
                     stop: float = PAPER_BERT["stop"], delta: float = PAPER_BERT["delta"],
                     r: float = PAPER_BERT["r"], test_share: float = 0.2) -> dict:
    """EB Train vs WORM on MiniLM, same initialisation per seed; see the module docstring.

    Returns ``{"task", "config", "runs": [{"seed", "method", ...metrics...}]}``.
    Cost on the 2-core CPU (measured): one AdamW step on a batch of 16 snippets takes
    about 3 s (forward 1 s, backward 2 s), so CPU runs are small. The defaults (256
    train / 256 test snippets, batches of 16, sampling every 4 steps = 1/4 epoch, at
    most 2 search epochs, 1 retraining epoch) take about 2-3 minutes per method and
    seed, 10-20 minutes for 3 seeds and both methods. The paper's per-epoch sampling
    is ``every=None`` (the window of 3 then needs at least 3 epochs).
    """
    for m in methods:
        if m not in ("eb", "worm", "truncate"):
            raise ValueError(f"unknown method {m!r}: use 'eb', 'worm' or 'truncate'")
    if every is not None and (int(every) != every or every < 1):
        raise ValueError(f"every must be a positive number of steps or None, got {every!r}")
    if max_epochs < 1 or retrain_epochs < 0:
        raise ValueError("max_epochs must be >= 1 and retrain_epochs >= 0")
    if threads is not None:
        torch.set_num_threads(threads)
    train_set, test_set = _load_task(task, csv, n_train, n_test, split_seed, text_col, label_col,
                                     test_share)
    num_labels = max(train_set.num_labels, test_set.num_labels)
    model, tok = _text.load_minilm(num_labels=num_labels)
    train, test = _Encoded(train_set, tok, max_len), _Encoded(test_set, tok, max_len)
    cfg = dict(task=task if csv is None else f"csv:{csv}", model="all-MiniLM-L6-v2",
               n_train=len(train), n_test=len(test), max_epochs=max_epochs,
               batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer="AdamW",
               every=every, steps_per_epoch=math.ceil(len(train) / batch_size),
               retrain_epochs=retrain_epochs, max_len=max_len, split_seed=split_seed,
               seeds=list(seeds), methods=list(methods), num_labels=num_labels,
               majority_acc=max(test_set.labels.count(c) for c in set(test_set.labels)) / len(test_set),
               sampling="per epoch" if every is None else f"every {every} optimizer steps",
               layers="qk", prune_ratio=prune_ratio, window=window, stop=stop, delta=delta, r=r)
    runs = []
    for seed in _progress(list(seeds), progress, desc="seeds"):
        torch.manual_seed(seed)
        fresh, _ = _text.load_minilm(num_labels=num_labels)  # head init drawn from this seed
        init_state = copy.deepcopy(fresh.state_dict())
        del fresh
        for method in methods:
            runs.append(_run_method(method, seed, init_state, model, train, test, cfg, progress))
    return {"task": cfg["task"], "config": cfg, "runs": runs}


def plot_losses(result: dict, path, seed: Optional[int] = None) -> None:
    """Training loss per step for each method (the paper's Figure 2), search then retraining."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    seed = runs[0]["seed"] if seed is None else seed
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"eb": "tab:blue", "worm": "tab:orange", "truncate": "tab:green"}
    labels = {"eb": "EB Train", "worm": "WORM", "truncate": "truncate from start"}
    for run in (r for r in runs if r["seed"] == seed):
        m = run["method"]
        loss = run["loss"] + run.get("retrain_loss", [])
        if not loss:
            continue
        steps, vals = zip(*loss)
        k = max(1, len(vals) // 50)  # a running mean: per-batch loss is noisy
        smooth = [sum(vals[max(0, i - k + 1):i + 1]) / len(vals[max(0, i - k + 1):i + 1])
                  for i in range(len(vals))]
        ax.plot(steps, smooth, color=colors.get(m), label=labels.get(m, m))
        if run["loss"]:
            ax.axvline(run["loss"][-1][0], color=colors.get(m), ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (running mean)")
    ax.set_title(f"{result['task']}, seed {seed}: loss (dotted: ticket applied)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
