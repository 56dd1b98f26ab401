"""The command line end to end on a tiny configuration (sklearn digits, a narrow CNN).

Settings are chosen so that each run takes a few seconds on a 2-core CPU: 200
training images, a window of 2, at most 3 search epochs and 1 retraining epoch.
"""
import csv
import json
import time

import pytest
import torch

import worm
from worm.paper import cli
from worm.paper.experiments import COLUMNS

TINY = ["--dataset", "digits", "--model", "cnn", "--width", "0.5", "--seeds", "0",
        "--max-epochs", "3", "--retrain-epochs", "1", "--window", "2",
        "--train-subset", "200", "--test-subset", "100", "--batch-size", "50",
        "--threads", "1", "--quiet"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# every raw value a table column is computed from must be in the record
RAW_KEYS = {"search_epochs", "pre_prune_acc", "pruned_acc", "retrain1_acc", "restore_epochs",
            "found", "params_before", "params_after", "time_s", "d_max", "d_avg", "seed", "method"}
CONTROL_KEYS = {"pre_prune_acc", "pruned_acc", "pruned_recal_acc", "retrain1_acc", "final_acc",
                "params_before", "params_after", "layers", "warnings", "seed", "method"}
METHODS = ["EB Train", "WORM", "dense (no pruning)", "random ticket", "uniform ticket"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()   # --threads 1 sets it process-wide
    yield
    torch.set_num_threads(n)


def _table_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("|")]


def _check_outputs(out, methods, n_runs, columns=True):
    rec = json.loads((out / "record.json").read_text())
    assert len(rec["runs"]) == n_runs
    assert {r["method"] for r in rec["runs"]} == set(methods)
    for r in rec["runs"]:
        assert r["time_s"] > 0 and 0.0 <= r["pre_prune_acc"] <= 1.0 and 0.0 <= r["retrain1_acc"] <= 1.0
        if r.get("protocol") == "dense":     # the dense control: nothing searched, nothing pruned
            continue
        assert CONTROL_KEYS <= set(r), CONTROL_KEYS - set(r)
        assert 0.0 <= r["pruned_acc"] <= 1.0
        assert 0 < r["params_after"] < r["params_before"]
        if r["method"] in ("random ticket", "uniform ticket"):
            continue
        assert RAW_KEYS <= set(r), RAW_KEYS - set(r)
        assert 1 <= r["search_epochs"] <= 3
        assert len(r["d_max"]) == r["search_epochs"]
    assert rec["config"]["window"] == 2 and rec["config"]["max_epochs"] == 3

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_runs
    assert [r["method"] for r in rows] == [r["method"] for r in rec["runs"]]
    assert {"seed", "pre_prune_acc", "pruned_acc", "gain", "search_epochs"} <= set(rows[0])
    for row, run in zip(rows, rec["runs"]):
        assert float(row["pre_prune_acc"]) == pytest.approx(run["pre_prune_acc"])

    png = (out / "distances.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000

    table = (out / "table.md").read_text()
    lines = _table_lines(table)
    assert len(lines) == 2 + len(methods)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)  # rows line up
    for key, header, _ in COLUMNS:   # sweep-r has no dense control, so no overhead ratio
        if columns or key != "epoch_time_vs_plain":
            assert header in lines[0], header
    return rec, table


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    t0 = time.perf_counter()
    assert cli.main(["compare", *TINY, "--out", str(out)]) == 0
    elapsed = time.perf_counter() - t0
    printed = capsys.readouterr().out
    rec, table = _check_outputs(out, METHODS, 5)
    assert table.strip() in printed
    for m in METHODS:
        assert f"| {m} |" in printed
    assert [r["method"] for r in rec["runs"]] == METHODS
    # EB's slimming recipe by default, no floor; both recorded, with what pruning did
    assert rec["config"]["l1"] == 1e-4 and rec["config"]["max_pruning_ratio"] is None
    eb, wo, dense, rnd, uni = rec["runs"]
    for r in (eb, wo):
        assert r["l1"] == 1e-4 and 0 <= r["ticket_departure"] < 1
        assert r["latency_ratio_b1"] > 0 and r["latency_ratio_b32"] > 0
        assert 0 < r["flops_after"] < r["flops_before"]
        assert r["epoch_time_vs_plain"] > 0 and r["sampling_ms"] > 0     # the overhead columns
    assert dense["epoch_time_vs_plain"] == 1.0 and dense["total_epochs"] == eb["search_epochs"] + 1
    # the random ticket keeps EB's per-layer widths; every variant retrained the same budget
    assert [x["ticket_kept"] for x in rnd["layers"]] == [x["ticket_kept"] for x in eb["layers"]]
    assert len({len(r["retrain_accs"]) for r in rec["runs"]}) == 1
    assert elapsed < 120, f"the tiny compare took {elapsed:.1f}s"


def test_sweep_r_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep-r", *TINY, "--rs", "1", "0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rec, _ = _check_outputs(out, ["r = 1", "r = 0.01"], 2, columns=False)
    assert "| r = 1 |" in printed and "| r = 0.01 |" in printed
    assert [r["r"] for r in rec["runs"]] == [1.0, 0.01]
    assert all(r["mode"] == "truncate" for r in rec["runs"])
    assert rec["kind"] == "sweep-r"


def test_backend_prints_a_backend(capsys):
    assert cli.main(["backend"]) == 0
    printed = capsys.readouterr().out
    assert f"cpu: {worm.backend('cpu')}" in printed
    assert worm.backend("cpu") in ("triton", "cpp", "cuda", "reference")


def test_text_csv_task_without_csv_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--task", "csv", "--quiet", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--csv" in capsys.readouterr().err


def test_unknown_subcommand_and_dataset_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    with pytest.raises(SystemExit) as e:  # a usage error before any training
        cli.main(["compare", "--dataset", "no-such-data", "--quiet", "--out", str(tmp_path / "y")])
    assert e.value.code == 2
    assert "--dataset no-such-data: unknown" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_l1_and_floor_flags(capsys):
    a = cli._parser().parse_args(["compare", "--l1", "0", "--floor", "0.7", "--model", "mobilenet_v3_small"])
    cfg = cli._cnn_config(a)
    assert (cfg.l1, cfg.max_pruning_ratio, cfg.model, cfg.width) == (0.0, 0.7, "mobilenet_v3_small", 1.0)
    for bad in (["--l1", "-1"], ["--l1", "nan"], ["--floor", "1"], ["--floor", "-0.1"]):
        with pytest.raises(SystemExit) as e:
            cli._parser().parse_args(["compare", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and bad[0] in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--task", "minilm-rt", "--l1", "1e-4", "--quiet"])
    assert e.value.code == 2 and "CNN runs" in capsys.readouterr().err


def test_defaults_match_the_paper():
    """The CLI's search defaults are the paper's CNN settings."""
    a = cli._parser().parse_args(["compare"])
    cfg = cli._cnn_config(a)
    assert (cfg.stop, cfg.delta, cfg.window, cfg.prune_ratio, cfg.r) == (0.1, 0.05, 5, 0.5, 3e-3)
    assert (cfg.lr, cfg.momentum) == (0.01, 0.9)
    # the generic defaults (a dataset or model named): digits, the tiny CNN at width 2, batch 32
    assert (cfg.dataset, cfg.model, cfg.width, cfg.batch_size) == ("digits", "cnn", 2.0, 32)
    assert (cfg.max_epochs, cfg.retrain_epochs, cfg.seeds) == (30, 5, (0, 1, 2))
    assert (cfg.l1, cfg.max_pruning_ratio) == (1e-4, None)   # EB's slimming; floor off
    # the width default is the tiny CNN's only: ResNet-18 stays at full width
    assert cli._cnn_config(cli._parser().parse_args(["compare", "--model", "resnet18"])).width == 1.0
    assert cli._cnn_config(cli._parser().parse_args(["compare", "--width", "0.5"])).width == 0.5


def test_the_default_task_and_its_fallback(monkeypatch, capsys):
    """Neither --dataset nor --model: the default task, each flag given replacing its value
    only; without Fashion-MNIST, the digits task with a note (not an error)."""
    ap = cli._parser()
    a = ap.parse_args(["compare", "--retrain-epochs", "2"])
    cli._check_cnn_flags(ap.commands["compare"], a)
    cfg = cli._cnn_config(a)
    want = dict(cli.DEFAULT_TASK, retrain_epochs=2)
    assert {k: getattr(cfg, k) for k in want} == want
    a = ap.parse_args(["compare", "--dataset", "fashion-mnist"])   # a named dataset: generic defaults
    cli._check_cnn_flags(ap.commands["compare"], a)
    assert (cli._cnn_config(a).model, cli._cnn_config(a).train_subset) == ("cnn", None)
    monkeypatch.setenv("WORM_FASHION_MNIST_DIR", "/no/such/folder")
    a = ap.parse_args(["compare"])
    cli._check_cnn_flags(ap.commands["compare"], a)
    assert (a.dataset, a.model, a.train_subset) == ("digits", "cnn", None)
    assert "running the small CNN on digits instead" in capsys.readouterr().err


def test_compare_stop_auto_end_to_end(tmp_path, capsys):
    """--stop auto reaches the searches (delta auto with it) and the outputs are whole
    (the plot has no s line to draw)."""
    out = tmp_path / "auto"
    assert cli.main(["compare", *TINY, "--stop", "auto", "--no-controls", "--out", str(out)]) == 0
    capsys.readouterr()
    rec, _ = _check_outputs(out, ["EB Train", "WORM"], 2, columns=False)   # no dense row: no ratio
    assert (rec["config"]["stop"], rec["config"]["delta"]) == ("auto", "auto")
