"""worm.paper.experiments: the metrics, the table, and the fairness of the comparison
(same initial weights and data order for both methods, accuracy on the test split)."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from worm.paper import data as wdata
from worm.paper import experiments as ex


def _tiny(**kw):
    base = dict(dataset="digits", model="cnn", width=0.5, train_subset=200, test_subset=100,
                seeds=(0,), max_epochs=2, retrain_epochs=1, window=2, batch_size=50,
                progress=False, threads=1)   # one thread: far faster on a busy 2-core machine
    base.update(kw)
    return ex.CNNConfig(**base)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ _restore_epochs
@pytest.mark.parametrize("pre, pruned, accs, frac, want", [
    (0.8, 0.75, [0.1, 0.2], 0.9, 0),        # already >= 90% right after pruning
    (0.5, 0.5, [], 1.0, 0),                 # exactly at the goal counts as restored
    (0.8, 0.10, [0.50, 0.73, 0.80], 0.9, 2),
    (0.8, 0.10, [0.73], 0.9, 1),
    (0.5, 0.10, [0.45, 0.46], 0.9, 1),      # 0.45 == 0.9 * 0.5 in floats
    (0.8, 0.10, [0.50, 0.60], 0.9, None),   # not within the run
    (0.8, 0.10, [], 0.9, None),
    (0.8, 0.10, [0.75, 0.60], 0.9, 1),      # the first epoch that reaches it
    (0.5, 0.10, [0.3, 0.5], 1.0, 2),
])
def test_restore_epochs(pre, pruned, accs, frac, want):
    assert ex._restore_epochs(pre, pruned, accs, frac) == want


# ------------------------------------------------------------------ the table
def _run(method, seed, **kw):
    r = {"seed": seed, "method": method, "search_epochs": 10, "pre_prune_acc": 0.8,
         "pruned_acc": 0.1, "retrain1_acc": 0.7, "restore_epochs": 2, "found": True,
         "params_before": 100, "params_after": 40, "time_s": 5.0, "d_max": [], "d_avg": []}
    r.update(kw)
    return r


def _cells(table):
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = rows[0], rows[2:]
    assert all(len(r) == len(header) for r in rows), "rows must line up with the header"
    return [dict(zip(header, r)) for r in body]


def test_format_table_values_and_not_reached():
    result = {"runs": [
        _run("EB Train", 0, restore_epochs=None, found=False),
        _run("EB Train", 1, restore_epochs=None, search_epochs=12, pre_prune_acc=0.9),
        _run("WORM", 0, restore_epochs=1),
        _run("WORM", 1, restore_epochs=None),
    ]}
    eb, wo = _cells(ex.format_table(result))
    assert eb["method"] == "EB Train" and eb["seeds"] == "2"
    assert eb["epochs to 90% restore"] == "not reached"
    assert wo["epochs to 90% restore"] == "1.00 ± 0.00 (1 not reached)"
    assert eb["search epochs"] == "11.00 ± 1.41"
    assert eb["pre-prune acc"] == "85.00% ± 7.07"
    assert eb["ticket found"] == "1/2" and wo["ticket found"] == "2/2"
    assert wo["gain after 1 epoch"] == "-10.00% ± 0.00"
    assert wo["params kept"] == "40.00% ± 0.00"


def test_format_table_none_accuracies_and_missing_columns():
    result = {"runs": [_run("A", 0, retrain1_acc=None, params_before=None),
                       _run("B", 0, retrain1_acc=0.5, params_before=None)]}
    a, b = _cells(ex.format_table(result))
    assert a["acc after 1 retrain epoch"] == "n/a" and a["gain after 1 epoch"] == "n/a"
    assert b["acc after 1 retrain epoch"] == "50.00% ± 0.00"
    assert "params kept" not in a       # no run has it: the column is left out
    # NaN from a run survives the JSON round trip as None
    clean = ex.nan_to_none({"runs": [_run("A", 0, pruned_acc=float("nan")), _run("B", 0)]})
    assert clean["runs"][0]["pruned_acc"] is None
    a, b = _cells(ex.format_table(clean))
    assert a["acc after pruning"] == "n/a" and b["acc after pruning"] == "10.00% ± 0.00"


def test_write_csv(tmp_path):
    import csv
    result = {"runs": [_run("EB Train", 0), _run("WORM", 0, retrain1_acc=None)]}
    ex.write_csv(result, tmp_path / "runs.csv")
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["EB Train", "WORM"]
    assert float(rows[0]["gain"]) == pytest.approx(-0.1) and rows[1]["gain"] == ""
    assert "d_max" not in rows[0]          # lists stay in record.json


# ------------------------------------------------------------------ fairness
def test_init_state_is_a_function_of_the_seed():
    info = {"in_channels": 1, "num_classes": 10}
    cfg = _tiny()
    a, b, c = ex._init_state(cfg, 0, info), ex._init_state(cfg, 0, info), ex._init_state(cfg, 1, info)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_both_methods_start_from_the_same_weights_and_data(monkeypatch):
    seen = []
    real = ex.search_one

    def spy(cfg, seed, mode, init_state, *args, **kw):
        seen.append((seed, mode, copy.deepcopy(init_state)))
        return real(cfg, seed, mode, init_state, *args, **kw)

    monkeypatch.setattr(ex, "search_one", spy)
    result = ex.compare(_tiny(seeds=(0, 1), max_epochs=2, controls=False))
    assert [(s, m) for s, m, _ in seen] == [(0, "eb"), (0, "worm"), (1, "eb"), (1, "worm")]
    for i in (0, 2):
        eb, wo = seen[i][2], seen[i + 1][2]
        assert eb.keys() == wo.keys() and all(torch.equal(eb[k], wo[k]) for k in eb)
    assert not all(torch.equal(seen[0][2][k], seen[2][2][k]) for k in seen[0][2])
    # Truncation cannot start before the window (2) is full and decided, so both
    # methods' first two epochs are the same computation: same weights, same batches.
    runs = result["runs"]
    for eb, wo in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert (eb["method"], wo["method"]) == ("EB Train", "WORM")
        assert eb["train_loss"][:2] == wo["train_loss"][:2]
        assert eb["d_max"][1] == wo["d_max"][1]
    assert runs[0]["train_loss"][0] != runs[2]["train_loss"][0]


def test_accuracy_is_measured_on_the_test_split(monkeypatch):
    real_load = wdata.load

    def load_with_test_labels(label_fn):
        def load(name, **kw):
            train, test, info = real_load(name, **kw)
            x, y = test.tensors
            return train, TensorDataset(x, label_fn(y)), info
        return load

    cfg = _tiny(max_epochs=2, retrain_epochs=2, controls=False)
    # Labels the network can never predict: accuracy on the test split is exactly 0,
    # on anything else (e.g. the training split) it would not be.
    monkeypatch.setattr(wdata, "load", load_with_test_labels(lambda y: torch.full_like(y, 10)))
    never = ex.compare(cfg)["runs"]
    for r in never:
        assert r["pre_prune_acc"] == 0.0 and r["pruned_acc"] == 0.0
        assert r["retrain_accs"] == [0.0, 0.0]
    # Control: with the real test labels the same runs score above zero.
    monkeypatch.setattr(wdata, "load", load_with_test_labels(lambda y: y))
    real = ex.compare(cfg)["runs"]
    assert all(r["pre_prune_acc"] > 0.0 for r in real)
    assert [r["train_loss"] for r in real] == [r["train_loss"] for r in never]


def test_evaluate_counts_correct_predictions():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(37, 4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:10] = (y[:10] + 1) % 3
    loader = ex._loader(TensorDataset(x, y), 8)
    assert ex.evaluate(model, loader) == pytest.approx(27 / 37)


def test_distance_plot_reads_text_records(tmp_path):
    # text runs keep the search history rather than d_max/d_avg lists
    hist = [{"index": i, "d_max": d, "d_avg": d and d / 2} for i, d in enumerate([None, None, 0.03, 0.008], 1)]
    result = {"config": {"task": "minilm-rt", "window": 3, "stop": 0.01, "delta": 0.005},
              "runs": [{"seed": 0, "method": m, "history": hist} for m in ("eb", "worm")]}
    from worm.paper.experiments import plot_distances
    plot_distances(result, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distance_plot_marks_truncation_and_ticket_and_names_one_point_runs(tmp_path, monkeypatch):
    from worm.paper import experiments as ex
    full = {"seed": 0, "method": "WORM", "d_max": [None] * 4 + [0.3, 0.14, 0.05],
            "d_avg": [None] * 4 + [0.2, 0.1, 0.03], "truncation_epoch": 6, "found": True}
    short = {"seed": 1, "method": "EB Train", "d_max": [None] * 4 + [0.06],
             "d_avg": [None] * 4 + [0.04], "truncation_epoch": None, "found": True}
    hist_short = {"seed": 2, "method": "worm", "history": [
        {"index": 1, "d_max": None, "truncating": False, "found": False},
        {"index": 2, "d_max": 0.004, "truncating": False, "found": True}]}
    assert ex._events(full) == (6, 7, 7)
    assert ex._events(short) == (None, 5, 5)
    assert ex._events(hist_short) == (None, 2, 2)
    assert ex.window_note(full) is None
    assert "window filled at step 5 and the ticket was found there (d_max 0.060)" in ex.window_note(short)
    assert "step 2" in ex.window_note(hist_short)

    drawn = []
    import matplotlib.axes
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append((a, k)) or real_plot(self, *a, **k))
    result = {"config": {"window": 5, "stop": 0.1, "delta": 0.05}, "runs": [full, short]}
    ex.plot_distances(result, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markers = [a[2] for a, _ in drawn if len(a) == 3]
    assert markers.count("^") == 2 and markers.count("*") == 2      # both panels, the full run only
    assert [a[0] for a, _ in drawn if len(a) == 3 and a[2] == "^"] == [[6], [6]]
    assert [a[0] for a, _ in drawn if len(a) == 3 and a[2] == "*"] == [[7], [7]]
    lines = [a for a, _ in drawn if len(a) == 3 and a[2] == "-o"]
    assert [ln[0] for ln in lines] == [[5, 6, 7], [5, 6, 7]]         # the one-point run is not drawn
