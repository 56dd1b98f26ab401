"""Offline datasets: shapes, normalisation, fixed splits, stratified subsets, errors."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from worm.paper import data
from worm.paper.data import DatasetNotFound, load, stratified_subset

FASHION = data.FASHION_MNIST_DIR


def unnormalise(x, info):
    m = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    s = torch.tensor(info["std"]).view(1, -1, 1, 1)
    return torch.round((x * s + m) * 255)


# ------------------------------------------------------------------ subsets
def test_stratified_subset_is_stratified_seeded_and_sorted():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    np.random.default_rng(0).shuffle(labels)
    a = stratified_subset(labels, 100, seed=1)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    counts = np.bincount(labels[a], minlength=3)
    assert np.all(np.abs(counts - np.array([50, 30, 20])) <= 1)
    assert np.array_equal(a, stratified_subset(labels, 100, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 100, seed=2))
    assert len(stratified_subset(labels, 1, seed=0)) == 1
    assert np.array_equal(stratified_subset(labels, 1000, seed=0), np.arange(1000))
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="subset size"):
            stratified_subset(labels, bad, seed=0)


# ------------------------------------------------------------------ digits
def test_digits_shapes_normalisation_and_fixed_split():
    from sklearn.datasets import load_digits

    tr, te, info = load("digits", seed=0)
    x, y = tr.tensors
    assert x.shape == (1437, 1, 32, 32) and x.dtype == torch.float32
    assert te.tensors[0].shape == (360, 1, 32, 32)
    assert y.dtype == torch.int64 and te.tensors[1].dtype == torch.int64
    assert info["in_channels"] == 1 and info["num_classes"] == 10
    assert (info["train_size"], info["test_size"]) == (1437, 360)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # Nearest-neighbour upsampling: every 4x4 block is one source pixel.
    blocks = x.reshape(1437, 8, 4, 8, 4)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    # Stratified test split: 360 of 1797, each class ~1/5 of its images.
    full = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(te.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - full * 360 / 1797) <= 1)
    assert np.array_equal(np.bincount(y.numpy(), minlength=10) + test_counts, full)
    # The split does not move with the run seed.
    tr5, te5, _ = load("digits", seed=5)
    assert torch.equal(te5.tensors[0], te.tensors[0]) and torch.equal(te5.tensors[1], te.tensors[1])
    assert torch.equal(tr5.tensors[0], x)


def test_digits_pixels_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    _, te_idx = train_test_split(np.arange(1797), test_size=360, stratify=ds.target,
                                 random_state=data.DIGITS_SPLIT_SEED)
    first = np.sort(te_idx)[0]
    _, te, info = load("digits")
    raw = unnormalise(te.tensors[0][:1], info)[0, 0, ::4, ::4]
    assert torch.equal(raw, torch.from_numpy(np.round(ds.images[first] * 255 / 16)).float())
    assert int(te.tensors[1][0]) == ds.target[first]


def test_digits_subsets():
    tr, te, info = load("digits", train_subset=200, test_subset=50, seed=3)
    assert len(tr) == 200 and len(te) == 50
    assert info["full_train_size"] == 1437 and info["full_test_size"] == 360
    assert np.all(np.bincount(tr.tensors[1].numpy(), minlength=10) >= 19)
    tr2, te2, _ = load("digits", train_subset=200, test_subset=50, seed=3)
    assert torch.equal(tr.tensors[0], tr2.tensors[0]) and torch.equal(te.tensors[1], te2.tensors[1])
    tr4, _, _ = load("digits", train_subset=200, seed=4)
    assert not torch.equal(tr.tensors[0], tr4.tensors[0])
    # The test subset comes from the test split.
    _, full_te, _ = load("digits")
    idx = stratified_subset(full_te.tensors[1].numpy(), 50, [3, 1])
    assert torch.equal(te.tensors[0], full_te.tensors[0][idx])


# ------------------------------------------------------------------ fashion-mnist
@pytest.fixture(scope="module")
def fashion():
    return load("fashion-mnist")


def test_fashion_mnist_loads(fashion):
    tr, te, info = fashion
    assert tr.tensors[0].shape == (60000, 1, 32, 32) and te.tensors[0].shape == (10000, 1, 32, 32)
    assert tr.tensors[1][:6].tolist() == [9, 0, 0, 3, 0, 2]       # known first labels
    assert te.tensors[1][:6].tolist() == [9, 2, 1, 1, 6, 1]
    assert np.array_equal(np.bincount(tr.tensors[1].numpy()), [6000] * 10)
    assert info["source"] == FASHION and info["classes"][9] == "Ankle boot"
    assert abs(float(tr.tensors[0].mean())) < 1e-3
    # Zero padding around the 28x28 image, and the pixels are the file's pixels.
    raw = unnormalise(tr.tensors[0][:1], info)[0, 0]
    assert raw[:2].abs().sum() == 0 and raw[:, 30:].abs().sum() == 0
    with gzip.open(os.path.join(FASHION, "train-images-idx3-ubyte.gz"), "rb") as f:
        first = np.frombuffer(f.read(16 + 784), dtype=np.uint8, offset=16).reshape(28, 28)
    assert torch.equal(raw[2:30, 2:30], torch.from_numpy(first.astype(np.float32)))


def test_fashion_mnist_subsets(fashion):
    tr_full, te_full, _ = fashion
    tr, te, info = load("fashion-mnist", train_subset=1000, test_subset=200, seed=7)
    assert np.array_equal(np.bincount(tr.tensors[1].numpy()), [100] * 10)
    assert np.array_equal(np.bincount(te.tensors[1].numpy()), [20] * 10)
    idx = stratified_subset(te_full.tensors[1].numpy(), 200, [7, 1])
    assert torch.equal(te.tensors[0], te_full.tensors[0][idx])      # from the test split
    _, _, info_full = fashion
    assert info["mean"] == info_full["mean"] and info["std"] == info_full["std"]


def write_idx(directory, stem, images, labels, gz):
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    n = len(labels)
    with opener(os.path.join(directory, f"{stem}-images-idx3-ubyte{suffix}"), "wb") as f:
        f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        f.write(images.astype(np.uint8).tobytes())
    with opener(os.path.join(directory, f"{stem}-labels-idx1-ubyte{suffix}"), "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_dir_override(tmp_path, monkeypatch, gz):
    rng = np.random.default_rng(0)
    tr_img, te_img = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    tr_lab, te_lab = np.arange(20) % 10, (np.arange(10) * 3) % 10
    write_idx(tmp_path, "train", tr_img, tr_lab, gz)
    write_idx(tmp_path, "t10k", te_img, te_lab, gz)
    monkeypatch.setenv("WORM_FASHION_MNIST_DIR", str(tmp_path))
    tr, te, info = load("fashion-mnist")
    assert info["source"] == str(tmp_path) and len(tr) == 20 and len(te) == 10
    assert tr.tensors[1].tolist() == tr_lab.tolist() and te.tensors[1].tolist() == te_lab.tolist()
    got = unnormalise(te.tensors[0], info)[:, 0, 2:30, 2:30]
    assert torch.equal(got, torch.from_numpy(te_img.astype(np.float32)))


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist", root=str(tmp_path / "nowhere"))
    monkeypatch.setenv("WORM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load("fashion-mnist")


def test_fashion_mnist_rejects_a_wrong_file(tmp_path):
    write_idx(tmp_path, "train", np.zeros((2, 28, 28)), np.zeros(2), gz=True)
    write_idx(tmp_path, "t10k", np.zeros((2, 28, 28)), np.zeros(2), gz=True)
    # Swap images and labels of the test split: the magic numbers catch it.
    a = tmp_path / "t10k-images-idx3-ubyte.gz"
    b = tmp_path / "t10k-labels-idx1-ubyte.gz"
    tmp = tmp_path / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(ValueError, match="magic"):
        load("fashion-mnist", root=str(tmp_path))


# ------------------------------------------------------------------ cifar10
def write_fake_cifar(root, per_batch=20, n_test=10):
    """torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in (np.arange(n) + i) % 10],
                 "filenames": [f"{name}_{j}.png" for j in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)
        batches[name] = entry
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return batches


@pytest.mark.parametrize("via_env", [False, True])
def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch, via_env):
    batches = write_fake_cifar(tmp_path)
    if via_env:
        monkeypatch.setenv("WORM_CIFAR10_DIR", str(tmp_path))
        tr, te, info = load("cifar10")
    else:
        monkeypatch.delenv("WORM_CIFAR10_DIR", raising=False)
        tr, te, info = load("cifar10", root=str(tmp_path))
    assert tr.tensors[0].shape == (100, 3, 32, 32) and te.tensors[0].shape == (10, 3, 32, 32)
    assert info["in_channels"] == 3 and info["classes"][0] == "airplane"
    train_u8 = np.concatenate([batches[f"data_batch_{k}"]["data"] for k in range(1, 6)])
    want_mean = (train_u8.reshape(-1, 3, 1024).astype(np.float64) / 255).mean(axis=(0, 2))
    np.testing.assert_allclose(info["mean"], want_mean, rtol=1e-5)
    x = tr.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    got = unnormalise(te.tensors[0], info)
    want = torch.from_numpy(batches["test_batch"]["data"].reshape(-1, 3, 32, 32).astype(np.float32))
    assert torch.equal(got, want)
    assert te.tensors[1].tolist() == batches["test_batch"]["labels"]
    assert tr.tensors[1][20:25].tolist() == batches["data_batch_2"]["labels"][:5]
    tr_s, te_s, _ = load("cifar10", root=str(tmp_path), train_subset=30, test_subset=5, seed=2)
    assert len(tr_s) == 30 and len(te_s) == 5
    assert np.array_equal(np.bincount(tr_s.tensors[1].numpy()), [3] * 10)


def test_cifar10_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORM_CIFAR10_DIR", raising=False)
    with pytest.raises(DatasetNotFound, match="WORM_CIFAR10_DIR"):
        load("cifar10")
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        load("cifar10", root=str(tmp_path))
    batches_dir = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(tmp_path)
    (batches_dir / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound, match="data_batch_3"):
        load("cifar10", root=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*fashion-mnist"):
        load("mnist")
