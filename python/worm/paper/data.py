"""Offline image datasets as 32x32 tensors: Fashion-MNIST, sklearn digits, CIFAR-10.

Nothing here downloads: each dataset is read from local files, and a missing one
raises :class:`DatasetNotFound` saying how to install it.

* ``"fashion-mnist"``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; ``root=`` or ``WORM_FASHION_MNIST_DIR``
  overrides), ``.gz`` or uncompressed. 28x28 images are zero-padded to 32x32.
* ``"digits"``: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped with
  scikit-learn), split once into 1437 train / 360 test, stratified with a fixed
  seed that does not depend on the run's seed, so every run tests on the same
  360 images. Upsampled 8x8 -> 32x32 by nearest neighbour (each pixel a 4x4 block).
* ``"cifar10"``: torchvision's on-disk layout (``cifar-10-batches-py/`` with
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``) under ``root=`` or
  ``WORM_CIFAR10_DIR``. The pickles are read directly rather than through
  ``torchvision.datasets.CIFAR10``, which would md5 every file on each load.

Images are float32 ``N x C x 32 x 32``, normalised per channel with the mean and
std of the dataset's full training split (padding included), so train inputs have
mean 0 and std 1; labels are int64. The test split is always the dataset's own test
split: accuracy is never measured on training images.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "DatasetNotFound", "load", "stratified_subset",
           "FASHION_MNIST_DIR", "DIGITS_SPLIT_SEED"]

DATASETS = ("fashion-mnist", "digits", "cifar10")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_SPLIT_SEED = 20240601   # fixed for ever: the digits test set must not move
DIGITS_TEST_SIZE = 360

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                   "Shirt", "Sneaker", "Bag", "Ankle boot")


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


# ------------------------------------------------------------------ helpers
def _to_tensor(images_u8: np.ndarray) -> Tuple[torch.Tensor, list, list]:
    """uint8 ``N x C x 32 x 32`` -> normalised float32, with the per-channel mean/std
    of exactly these images (the full training split)."""
    x = torch.from_numpy(images_u8).float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x.std(dim=(0, 2, 3))
    return x, mean.float().tolist(), std.float().tolist()


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def stratified_subset(labels: np.ndarray, n: int, seed) -> np.ndarray:
    """Sorted indexes of a seeded random subset of size ``n`` in which every class
    gets ``n * share`` samples, give or take one.

    Each class is shuffled and its members spread evenly over [0, 1) (member r of a
    class of size c sits at ``(r + u_c) / c``, ``u_c`` a random offset); the ``n``
    smallest positions are taken. That is systematic stratified sampling: it needs no
    rounding rule per class and works for any ``n`` down to 1. ``seed``: anything
    ``numpy.random.default_rng`` takes (``load`` passes ``[seed, stream]``).
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not (isinstance(n, (int, np.integer)) and 1 <= n <= total):
        raise ValueError(f"subset size must be an int in [1, {total}], got {n!r}")
    rng = np.random.default_rng(seed)
    pos = np.empty(total, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank = rng.permutation(len(idx))
        pos[idx] = (rank + rng.random()) / len(idx)
    return np.sort(np.argsort(pos, kind="stable")[:n])


def _read_idx(path: str, offset: int, magic: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        buf = f.read()
    got = int.from_bytes(buf[:4], "big")
    if got != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind "
                         f"(magic {got}, expected {magic})")
    return np.frombuffer(buf, dtype=np.uint8, offset=offset)


def _find(directory: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


# ------------------------------------------------------------------ datasets
def _fashion_paths(root: Optional[str]):
    d = root or os.environ.get("WORM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find(d, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DatasetNotFound(
            f"Fashion-MNIST not found in {d!r} (missing {', '.join(m + '[.gz]' for m in missing)}). "
            "Install it with `apt-get install dataset-fashion-mnist` (files go to "
            f"{FASHION_MNIST_DIR}), or point root= / WORM_FASHION_MNIST_DIR at a folder "
            "holding the four IDX files.")
    return d, paths


def _fashion_mnist(root: Optional[str]):
    d, paths = _fashion_paths(root)
    out = []
    for img_path, lab_path in ((paths[0], paths[1]), (paths[2], paths[3])):
        labels = _read_idx(lab_path, 8, 2049).astype(np.int64)
        flat = _read_idx(img_path, 16, 2051)
        if flat.size != len(labels) * 28 * 28:
            raise ValueError(f"{img_path} holds {flat.size} pixels; expected "
                             f"{len(labels)} images of 28x28 to match {lab_path}")
        padded = np.zeros((len(labels), 1, 32, 32), dtype=np.uint8)
        padded[:, 0, 2:30, 2:30] = flat.reshape(-1, 28, 28)
        out.append((padded, labels))
    return out, 1, 10, list(FASHION_CLASSES), d


def _digits(root: Optional[str]):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    # 0..16 -> 0..255 (exact for 16 * 255 / 16), then each pixel a 4x4 block.
    img = np.round(ds.images * (255.0 / 16.0)).astype(np.uint8)
    img = img.repeat(4, axis=1).repeat(4, axis=2)[:, None]
    labels = ds.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_SIZE,
                              stratify=labels, random_state=DIGITS_SPLIT_SEED)
    tr, te = np.sort(tr), np.sort(te)
    return ([(img[tr], labels[tr]), (img[te], labels[te])], 1, 10,
            [str(i) for i in range(10)], "sklearn.datasets.load_digits")


def _cifar_dir(root: Optional[str]) -> str:
    base = root or os.environ.get("WORM_CIFAR10_DIR")
    hint = ("Download the python version of CIFAR-10 (cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, or torchvision.datasets.CIFAR10("
            "root, download=True) on a machine with internet), extract it so that "
            "ROOT/cifar-10-batches-py/ holds data_batch_1..5, test_batch and batches.meta, "
            "and pass root=ROOT or set WORM_CIFAR10_DIR=ROOT.")
    if not base:
        raise DatasetNotFound(f"CIFAR-10 location not given. {hint}")
    for d in (os.path.join(base, "cifar-10-batches-py"), base):
        if os.path.isfile(os.path.join(d, "test_batch")):
            return d
    raise DatasetNotFound(f"CIFAR-10 not found under {base!r} (no cifar-10-batches-py/test_batch). "
                          f"{hint}")


def _cifar10(root: Optional[str]):
    d = _cifar_dir(root)

    def batch(name):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            raise DatasetNotFound(f"CIFAR-10 folder {d!r} lacks {name}; it should hold "
                                  "data_batch_1..5, test_batch and batches.meta")
        with open(p, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        if len(labels) != len(data):
            raise ValueError(f"{p}: {len(data)} images but {len(labels)} labels")
        return data, labels

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = batch("test_batch")
    classes = [str(i) for i in range(10)]
    meta = os.path.join(d, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")["label_names"])
    return [train, test], 3, 10, classes, d


_LOADERS = {"fashion-mnist": _fashion_mnist, "digits": _digits, "cifar10": _cifar10}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}


def check_available(name: str, root: Optional[str] = None) -> None:
    """Raise :class:`DatasetNotFound` (saying how to get it) when ``name``'s files are not
    there; reads nothing but the folder listing, so callers can check before a long run."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "cifar10":
        _cifar_dir(root)
    elif key == "fashion-mnist":
        _fashion_paths(root)


def load(name: str, *, root: Optional[str] = None, train_subset: Optional[int] = None,
         test_subset: Optional[int] = None, seed: int = 0):
    """``(train, test, info)``: two TensorDatasets of (images, labels) and a dict.

    ``train_subset`` / ``test_subset``: optional sizes of seeded, stratified random
    subsets (see :func:`stratified_subset`); the test subset is drawn from the test
    split. Normalisation always uses the full training split's statistics, so a
    subset does not change the inputs' scale. ``info`` holds name, in_channels,
    num_classes, classes, train_size, test_size, full sizes, mean, std, source.
    """
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    (train, test), in_ch, ncls, classes, source = _LOADERS[key](root)
    x_train, mean, std = _to_tensor(train[0])
    x_train = _normalise(x_train, mean, std)
    x_test = _normalise(torch.from_numpy(test[0]).float().div_(255.0), mean, std)
    y_train, y_test = torch.from_numpy(train[1]), torch.from_numpy(test[1])
    full = (len(y_train), len(y_test))
    # Separate streams so the test subset does not shift when train_subset changes.
    if train_subset is not None:
        idx = torch.from_numpy(stratified_subset(train[1], train_subset, [seed, 0]))
        x_train, y_train = x_train[idx], y_train[idx]
    if test_subset is not None:
        idx = torch.from_numpy(stratified_subset(test[1], test_subset, [seed, 1]))
        x_test, y_test = x_test[idx], y_test[idx]
    info = {
        "name": key, "in_channels": in_ch, "num_classes": ncls, "classes": classes,
        "image_size": 32, "train_size": len(y_train), "test_size": len(y_test),
        "full_train_size": full[0], "full_test_size": full[1],
        "mean": mean, "std": std, "source": source,
    }
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), info
